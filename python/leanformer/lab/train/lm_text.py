"""SLABLM vs its softmax (RoPE) + LayerNorm twin on Python's pydoc topics, byte level, with the
last topics held out: validation perplexity after the same steps (and the training time each
took); then the trained SLAB LM is folded, its predictions compared with the unfolded one, and
its incremental decoding checked against the full forward.

    leanformer train lm-text [--steps 600] [--out bench/results]
"""
from __future__ import annotations

import argparse
import math
import sys
from typing import List, Optional

import torch
import torch.nn.functional as F

from leanformer.fold import fold_batchnorm
from leanformer.lab import results as report
from leanformer.lab.data import pydoc_text
from leanformer.models import LMConfig, SLABLM, save_pretrained
from leanformer.training import random_windows, sequential_windows, train


def config(steps: int, activation: str = "gelu") -> LMConfig:
    # PRepBN's decay ends at 60% of the run (SLAB's authors warn it must end well before training does).
    return LMConfig(vocab_size=256, dim=192, depth=4, num_heads=3, activation=activation,
                    prepbn_steps=int(0.6 * steps))


def lm_loss(model, batch):
    logits = model(batch[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1))


def text_lm_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The options every byte-level pydoc LM trainer shares."""
    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-windows", type=int, default=64, help="validation windows per evaluation")
    p.add_argument("--out", default=report.FOLDER, help="folder of the result files")
    return p


def pydoc_lm_data(length: int, eval_windows: int):
    """Training and held-out tokens, validation windows and the val-perplexity evaluation on them."""
    train_tokens, val_tokens = pydoc_text()
    val = sequential_windows(val_tokens, length)[:eval_windows]

    def evaluate(model):
        losses = [lm_loss(model, chunk).item() for chunk in val.split(16)]
        return {"val_ppl": math.exp(sum(losses) / len(losses))}

    return train_tokens, val_tokens, val, evaluate


def main(argv: Optional[List[str]] = None) -> int:
    p = text_lm_parser("leanformer train lm-text", __doc__)
    p.add_argument("--activation", default="gelu", choices=["gelu", "relu"],
                   help="MLP activation (relu for the Lazy Neuron measurement)")
    p.add_argument("--save", default=None, help="folder to save the trained SLAB LM in")
    args = p.parse_args(argv)
    train_tokens, val_tokens, val, evaluate = pydoc_lm_data(args.length, args.eval_windows)

    curves, models = {}, {}
    for name, cfg in (("SLAB (SLA + PRepBN)", config(args.steps, args.activation)),
                      ("twin (softmax + LayerNorm)", config(args.steps, args.activation).twin())):
        torch.manual_seed(args.seed)
        model = SLABLM(cfg)
        data = random_windows(train_tokens, args.batch, args.length, torch.Generator().manual_seed(args.seed))
        curves[name] = train(model, data, lm_loss, steps=args.steps, lr=args.lr, evaluate=evaluate,
                             eval_every=max(1, args.steps // 20), desc=name)
        models[name] = model.eval()

    slab = models["SLAB (SLA + PRepBN)"]
    folded = fold_batchnorm(slab)
    with torch.no_grad():
        before, after = slab(val[:8, :-1]), folded(val[:8, :-1])
        ids = val[:2, :64]
        n, prefill = ids.shape[1], ids.shape[1] // 2
        cache = slab.new_cache()
        steps = [slab(ids[:, :prefill], cache=cache)] + [slab(ids[:, t:t + 1], cache=cache) for t in range(prefill, n)]
        incremental = (torch.cat(steps, 1) - slab(ids)).abs().max().item()
    summary = {
        "train_bytes": len(train_tokens), "val_bytes": len(val_tokens),
        "val_bytes_evaluated": val.shape[0] * args.length, "steps": args.steps, "batch": args.batch,
        "length": args.length, "config": vars(config(args.steps, args.activation)),
        "final": {k: v[-1] for k, v in curves.items()},
        "fold": {"max_abs_logit_diff": (after - before).abs().max().item(),
                 "same_next_byte": int((after.argmax(-1) == before.argmax(-1)).sum()),
                 "of": before.shape[0] * before.shape[1],
                 "folded_val_ppl": evaluate(folded)["val_ppl"]},
        "incremental_vs_full_max_abs_logit_diff": incremental,
    }
    report.write(report.stem(args.out, "train-lm-text"), summary, curves, "val_ppl",
                 "validation perplexity (bytes)", logy=True)
    if args.save:
        save_pretrained(slab, args.save)
    for name, hist in curves.items():
        h = hist[-1]
        print(f"{name:28s} step {h['step']:5d}  val ppl {h['val_ppl']:.3f}  train time {h['time_s']:.0f} s")
    f = summary["fold"]
    print(f"folded SLAB LM: {f['same_next_byte']}/{f['of']} identical next-byte predictions, max |logit diff| "
          f"{f['max_abs_logit_diff']:.2e}, val ppl {f['folded_val_ppl']:.3f}; prefill+steps vs full forward "
          f"max |diff| {incremental:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
