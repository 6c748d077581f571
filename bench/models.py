"""Whole-model inference: the folded SLABViT (SLA, RepBN folded away) against its softmax +
LayerNorm twin of the same sizes, and against itself unfolded (the fold alone)."""
from __future__ import annotations

from typing import List

import torch

from bench.harness import Case
from leanformer import fold_batchnorm
from leanformer.models import SLABViT, ViTConfig

BATCH = 32


def _with_statistics(model: SLABViT, images: torch.Tensor) -> SLABViT:
    """One training forward gives the norms running statistics, as a trained model has."""
    with torch.no_grad():
        model.train()(images[:4])
    return model.eval()


def cases(device: str, dtype: torch.dtype, quick: bool = False) -> List[Case]:
    cfg = (ViTConfig.tiny(image_size=32, patch_size=8, depth=2, num_classes=10) if quick
           else ViTConfig.tiny(num_classes=1000))
    torch.manual_seed(0)
    images = torch.randn(BATCH if not quick else 4, cfg.in_chans, cfg.image_size, cfg.image_size, device=device)
    slab = _with_statistics(SLABViT(cfg).to(device), images).to(dtype)
    folded = fold_batchnorm(slab)
    twin = SLABViT(cfg.twin()).to(device).to(dtype).eval()
    x = images.to(dtype)

    def infer(model):
        def run():
            with torch.inference_mode():
                model(x)
        return run

    shape = f"ViT-T b{x.shape[0]} {cfg.image_size}px" if not quick else f"ViT b{x.shape[0]} {cfg.image_size}px"
    return [Case("slab_vit_folded", shape, "fwd", infer(folded),
                 {"softmax+LN twin": infer(twin), "unfolded SLAB": infer(slab)},
                 {"softmax+LN twin": 1.3})]
