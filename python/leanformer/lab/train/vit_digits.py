"""SLABViT vs its softmax + LayerNorm twin on scikit-learn's real handwritten digits: the same
steps, data order and seed for both; then the trained SLAB model is folded and its
predictions compared with the unfolded one.

    leanformer train vit-digits [--steps 1500] [--out bench/results]
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

import torch
import torch.nn.functional as F

from leanformer.fold import fold_batchnorm
from leanformer.lab import results as report
from leanformer.lab.data import digits
from leanformer.models import SLABViT, ViTConfig, save_pretrained
from leanformer.training import train


def config(steps: int) -> ViTConfig:
    # 8x8 scans in 2x2 patches: a 4x4 grid of 16 tokens. PRepBN's decay ends at 60% of the run.
    return ViTConfig(image_size=8, patch_size=2, in_chans=1, num_classes=10, dim=64, depth=4,
                     num_heads=4, dwc_kernel_size=3, prepbn_steps=int(0.6 * steps))


def batches(x, y, batch: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    while True:
        for idx in torch.randperm(len(y), generator=g).split(batch):
            if len(idx) == batch:
                yield x[idx], y[idx]


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="leanformer train vit-digits", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=report.FOLDER, help="folder of the result files")
    p.add_argument("--save", default=None, help="folder to save the trained SLAB model in")
    args = p.parse_args(argv)

    x_tr, y_tr, x_te, y_te = digits(seed=args.seed)
    evaluate = lambda m: {"test_accuracy": (m(x_te).argmax(-1) == y_te).float().mean().item(),
                          "test_loss": F.cross_entropy(m(x_te), y_te).item()}
    loss_fn = lambda m, b: F.cross_entropy(m(b[0]), b[1])
    curves, models = {}, {}
    for name, cfg in (("SLAB (SLA + PRepBN)", config(args.steps)), ("twin (softmax + LayerNorm)", config(args.steps).twin())):
        torch.manual_seed(args.seed)
        model = SLABViT(cfg)
        curves[name] = train(model, batches(x_tr, y_tr, args.batch, args.seed), loss_fn, steps=args.steps,
                             lr=args.lr, evaluate=evaluate, eval_every=max(1, args.steps // 20), desc=name)
        models[name] = model.eval()
    slab = models["SLAB (SLA + PRepBN)"]
    folded = fold_batchnorm(slab)
    with torch.no_grad():
        before, after = slab(x_te), folded(x_te)
    summary = {
        "train_images": len(y_tr), "test_images": len(y_te), "steps": args.steps, "batch": args.batch,
        "config": vars(config(args.steps)),
        "final": {k: v[-1] for k, v in curves.items()},
        "fold": {"max_abs_logit_diff": (after - before).abs().max().item(),
                 "same_predictions": int((after.argmax(-1) == before.argmax(-1)).sum()),
                 "of": len(y_te), "folded_test_accuracy": (after.argmax(-1) == y_te).float().mean().item()},
    }
    report.write(report.stem(args.out, "train-vit-digits"), summary, curves, "test_accuracy",
                 "test accuracy (held-out digits)")
    if args.save:
        save_pretrained(slab, args.save)
    for name, hist in curves.items():
        h = hist[-1]
        print(f"{name:28s} step {h['step']:5d}  test accuracy {h['test_accuracy']:.4f}  "
              f"test loss {h['test_loss']:.4f}  train time {h['time_s']:.0f} s")
    f = summary["fold"]
    print(f"folded SLAB: {f['same_predictions']}/{f['of']} identical predictions, max |logit diff| "
          f"{f['max_abs_logit_diff']:.2e}, test accuracy {f['folded_test_accuracy']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
