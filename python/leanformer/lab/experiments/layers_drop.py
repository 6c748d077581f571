"""Layer dropping (LLM-Drop) on a saved LM: the importance (1 - cos(input, output)) of every
attention and MLP sub-block on calibration windows from the training text, then validation
perplexity and batch-1 decoding speed as the least important attention sub-blocks are dropped
one by one (their cache slots removed), and, for comparison, the MLPs.

    leanformer layers drop --model DIR [--out bench/results]
"""
from __future__ import annotations

import copy
import sys
import time
from typing import List, Optional

import torch

from leanformer.lab.data import pydoc_text
from leanformer.lab.experiments.layers_common import load_lm, parser, result_stem, val_windows
from leanformer.lab.results import lines, write_json
from leanformer.layers import drop_modules, num_layers
from leanformer.layers.drop import drop_order, importance
from leanformer.layers.sorted import exit_perplexities
from leanformer.training import random_windows


@torch.no_grad()
def decode_speed(model, window: torch.Tensor, prefill: int) -> float:
    """Tokens per second decoding ``window`` at batch 1 with the cache, after the prefill."""
    cache = model.new_cache()
    model(window[None, :prefill], cache=cache)
    t0 = time.perf_counter()
    for t in range(prefill, window.shape[0]):
        model(window[None, t:t + 1], cache=cache)
    return (window.shape[0] - prefill) / (time.perf_counter() - t0)


def main(argv: Optional[List[str]] = None) -> int:
    p = parser("drop", __doc__)
    p.add_argument("--calibration", type=int, default=32, help="calibration windows from the training text")
    p.add_argument("--speed-tokens", type=int, default=96)
    args = p.parse_args(argv)
    model = load_lm(args.model)
    train_tokens, _ = pydoc_text()
    calib = next(random_windows(train_tokens, args.calibration, args.length, torch.Generator().manual_seed(0)))
    scores = importance(model, [c[:, :-1] for c in calib.split(8)])
    val = val_windows(args.length, args.windows)
    speed_window = val_windows(args.speed_tokens + 16, 1)[0]
    L = num_layers(model)
    curves = {}
    for kind in ("attention", "mlp"):
        order, rows = drop_order(scores[kind]), []
        for k in range(L):
            dropped = drop_modules(copy.deepcopy(model), **{kind: order[:k]})
            rows.append({"dropped": k, "layers": order[:k], "val_ppl": exit_perplexities(dropped, val, [L])[L],
                         "tokens_per_s_batch1": decode_speed(dropped, speed_window, 16),
                         "cache_slots": len(dropped.new_cache().layers)})
        curves[kind] = rows
    out = result_stem(args.out, "drop")
    path = write_json(out, {"model": args.model, "config": vars(model.config), "importance": scores,
                            "calibration_tokens": calib[:, :-1].numel(), "val_tokens": val[:, 1:].numel(),
                            "drop": curves})
    lines(out, {f"{k} dropped": ([r["dropped"] for r in rs], [r["val_ppl"] for r in rs]) for k, rs in curves.items()},
          "sub-blocks dropped (least important first)", "validation perplexity (bytes)", logy=True,
          title=f"LLM-Drop on {args.model}")
    print(f"importance 1 - cos(in, out) per layer ({calib[:, :-1].numel()} calibration tokens)")
    for kind, s in scores.items():
        print(f"  {kind:9s} " + " ".join(f"{v:.4f}" for v in s))
    for kind, rows in curves.items():
        print(f"\ndropping {kind} (order {drop_order(scores[kind])})\n  dropped  val ppl  tok/s (batch 1)  cache slots")
        for r in rows:
            print(f"  {r['dropped']:7d}  {r['val_ppl']:7.2f}  {r['tokens_per_s_batch1']:15.1f}  {r['cache_slots']:11d}")
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
