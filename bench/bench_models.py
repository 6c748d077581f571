"""Whole-model inference: the folded SLABViT (SLA, RepBN folded away) against its softmax +
LayerNorm twin of the same sizes, and against itself unfolded (the fold alone)."""
from __future__ import annotations

from typing import List, Optional

import torch

from bench.case import Case, bench_cases, time_case
from leanformer import fold_batchnorm
from leanformer.models import SLABViT, ViTConfig

BATCH = 32


def _with_statistics(model: SLABViT, images: torch.Tensor) -> SLABViT:
    """One training forward gives the norms running statistics, as a trained model has."""
    with torch.no_grad():
        model.train()(images[:4])
    return model.eval()


def _case(cfg: ViTConfig, batch: int, device: str, dtype: torch.dtype, label: str,
          min_run_time: Optional[float] = None) -> Case:
    torch.manual_seed(0)
    images = torch.randn(batch, cfg.in_chans, cfg.image_size, cfg.image_size, device=device)
    slab = _with_statistics(SLABViT(cfg).to(device), images).to(dtype)
    folded = fold_batchnorm(slab)
    twin = SLABViT(cfg.twin()).to(device).to(dtype).eval()
    x = images.to(dtype)

    def infer(model):
        def run():
            with torch.inference_mode():
                model(x)
        return run

    return Case("slab_vit_folded", f"{label} b{batch} {cfg.image_size}px", "fwd", infer(folded),
                {"softmax+LN twin": infer(twin), "unfolded SLAB": infer(slab)}, {"softmax+LN twin": 1.3},
                min_run_time=min_run_time)


def cases(device: str, dtype: torch.dtype, quick: bool = False) -> List[Case]:
    if quick:
        return [_case(ViTConfig.tiny(image_size=32, patch_size=8, depth=2, num_classes=10), 4, device, dtype, "ViT")]
    # 224px is DeiT's resolution (196 tokens); at 384px (576 tokens) attention's share grows.
    # A forward takes seconds on a small CPU: time each for at least 10 s (a few runs).
    slow = 10.0 if device == "cpu" else None
    return [_case(ViTConfig.tiny(image_size=size), BATCH, device, dtype, "ViT-T", slow) for size in (224, 384)]


@bench_cases(cases)
def test_models(benchmark, case, impl, bench_round):
    time_case(benchmark, case, impl, bench_round)
