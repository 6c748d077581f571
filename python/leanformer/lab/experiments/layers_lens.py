"""The logit lens and the tuned lens on a saved LM: per layer, the perplexity of the lens's
next-token prediction on held-out pydoc text, its KL divergence from the model's final
distribution and its top-1 agreement with the model. The tuned lens trains one affine
translator per layer (KL to the final distribution) on the training text first.

    leanformer layers logit-lens --model DIR [--out bench/results]
    leanformer layers tuned-lens --model DIR [--steps 200] [--out bench/results]
    torchrun --nproc_per_node=2 -m leanformer.lab.experiments.layers_lens --tuned --model DIR   (DDP on gloo)
"""
from __future__ import annotations

import sys
from typing import List, Optional

import torch

from leanformer.lab.data import pydoc_text
from leanformer.lab.experiments.layers_common import load_lm, parser, result_stem, val_windows
from leanformer.lab.results import lines, write_json
from leanformer.layers import distributed
from leanformer.layers.lens import TunedLens, TunedLensLoss, lens_table
from leanformer.training import random_windows, train


def main(argv: Optional[List[str]] = None, tuned: bool = False) -> int:
    name = "tuned-lens" if tuned else "logit-lens"
    p = parser(name, __doc__)
    p.add_argument("--tuned", action="store_true", default=tuned, help="train and report the tuned lens too")
    p.add_argument("--steps", type=int, default=200, help="tuned-lens training steps")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    args = p.parse_args(argv)
    name = "tuned-lens" if args.tuned else "logit-lens"
    rank, world = distributed.setup()
    model = load_lm(args.model)
    val = val_windows(args.length, args.windows)
    tables = {"logit lens": lens_table(model, val)}
    history = None
    if args.tuned:
        lens = TunedLens(model, model.config.dim)
        train_tokens, _ = pydoc_text()
        data = random_windows(train_tokens, args.batch, args.length, torch.Generator().manual_seed(rank))
        objective = distributed.wrap(TunedLensLoss(model, lens))
        history = train(objective, data, lambda m, b: m(b), steps=args.steps, lr=args.lr, weight_decay=0.0,
                        evaluate=lambda m: {"mean_kl": sum(r["kl_to_final"] for r in lens_table(model, val[:16], lens))},
                        eval_every=max(1, args.steps // 5), warmup=max(1, args.steps // 10), desc="tuned lens")
        tables["tuned lens"] = lens_table(model, val, lens)
    if not distributed.is_main():
        return 0
    out = result_stem(args.out, name)
    path = write_json(out, {"model": args.model, "config": vars(model.config), "val_tokens": val[:, 1:].numel(),
                            "tables": tables, "tuned_lens_training": history, "world_size": world})
    lines(out, {k: ([r["layer"] for r in t], [r["kl_to_final"] for r in t]) for k, t in tables.items()},
          "hidden state (0 = embeddings)", "KL(final || lens) (nats / token)",
          title=f"{name} on {args.model}")
    print(f"{name} on {args.model} ({val[:, 1:].numel()} held-out bytes)")
    for k, t in tables.items():
        print(f"\n{k}\n  layer  val ppl  KL to final  top-1 = model")
        for r in t:
            print(f"  {r['layer']:5d}  {r['val_ppl']:7.2f}  {r['kl_to_final']:11.4f}  {r['top1_agreement']:13.3f}")
    print(f"results: {path}")
    return 0


def tuned_main(argv: Optional[List[str]] = None) -> int:
    return main(argv, tuned=True)


if __name__ == "__main__":
    sys.exit(main())
