"""Sorted fine-tuning vs ordinary training of the same LM on pydoc text: the validation
perplexity of every sub-model (the first l layers + the shared final norm and head) after each.
Both models are saved (``--save DIR``: DIR/soft and DIR/ordinary) for the other analyses.

    leanformer layers soft [--steps 300] [--save DIR] [--out bench/results]
    torchrun --nproc_per_node=2 -m leanformer.lab.experiments.layers_soft ...   (DDP on gloo)
"""
from __future__ import annotations

import os
import sys
from typing import List, Optional

import torch

from leanformer.lab.data import pydoc_text
from leanformer.lab.experiments.layers_common import lm_config, parser, result_stem, val_windows
from leanformer.lab.results import lines, write_json
from leanformer.layers import distributed
from leanformer.layers.sorted import SortedLoss, exit_perplexities
from leanformer.models import SLABLM, save_pretrained
from leanformer.training import random_windows, train


def main(argv: Optional[List[str]] = None) -> int:
    p = parser("soft", __doc__, model=False)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=8, help="sequences per step and rank")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--exits", type=int, nargs="*", default=None, help="SoFT exits (default: every layer)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", default=None, help="folder to save both models in (soft/, ordinary/)")
    args = p.parse_args(argv)

    rank, world = distributed.setup()
    train_tokens, _ = pydoc_text()
    val = val_windows(args.length, args.windows)
    cfg = lm_config(args.dim, args.depth, args.heads)
    exits = args.exits or list(range(1, cfg.depth + 1))
    results, curves = {}, {}
    for name, train_exits in (("ordinary", [cfg.depth]), ("soft", exits)):
        torch.manual_seed(args.seed)  # the same initial weights for both
        model = SLABLM(cfg)
        objective = distributed.wrap(SortedLoss(model, train_exits))
        data = random_windows(train_tokens, args.batch, args.length,
                              torch.Generator().manual_seed(args.seed * 1000 + rank))
        history = train(objective, data, lambda m, b: m(b), steps=args.steps, lr=args.lr,
                        evaluate=lambda m: {"val_ppl": exit_perplexities(model, val, [cfg.depth])[cfg.depth]},
                        eval_every=max(1, args.steps // 5), warmup=max(1, args.steps // 10),
                        desc=f"{name} (exits {train_exits})" + (f" rank {rank}" if world > 1 else ""))
        model.eval()
        results[name] = {"exits_trained": train_exits, "history": history,
                         "val_ppl_per_exit": exit_perplexities(model, val)}
        curves[name] = results[name]["val_ppl_per_exit"]
        if args.save and distributed.is_main():
            save_pretrained(model, os.path.join(args.save, name))
    if not distributed.is_main():
        return 0
    n_params = sum(p.numel() for p in SLABLM(cfg).parameters())
    out = result_stem(args.out, "soft")
    path = write_json(out, {"config": vars(cfg), "params": n_params, "steps": args.steps, "batch": args.batch,
                            "world_size": world, "length": args.length, "val_tokens": val[:, 1:].numel(),
                            **results})
    lines(out, {k: (list(v), list(v.values())) for k, v in curves.items()}, "exit layer (sub-model depth)",
          "validation perplexity (bytes)", logy=True, title=f"SoFT vs ordinary training, {n_params / 1e6:.1f}M params")
    print(f"validation perplexity per sub-model ({val[:, 1:].numel()} held-out bytes; {n_params / 1e6:.2f}M params)")
    print("exit " + "".join(f"{l:>9d}" for l in range(1, cfg.depth + 1)))
    for name, ppl in curves.items():
        print(f"{name:8s} " + "".join(f"{ppl[l]:9.2f}" for l in range(1, cfg.depth + 1)))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
