"""Early exit per token in decoding on a saved LM (best on a SoFT-trained one): MuE's rule (exit
once cos(layer output, layer input) > threshold) and the confidence rule (exit once the shared
head's top probability > threshold) across thresholds: average layers used vs validation
perplexity (teacher-forced decoding of held-out pydoc text), against exiting every token at a
fixed layer; and the batch-1 decoding speed at each threshold.

    leanformer layers early-exit --model DIR [--out bench/results]
"""
from __future__ import annotations

import sys
from typing import List, Optional

from leanformer.lab.experiments.layers_common import load_lm, parser, result_stem, val_windows
from leanformer.lab.results import lines, write_json
from leanformer.layers import early_exit, num_layers
from leanformer.layers.sorted import exit_perplexities

THRESHOLDS = {"cosine": (0.8, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 2.0),
              "confidence": (0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99, 2.0)}


def main(argv: Optional[List[str]] = None) -> int:
    p = parser("early-exit", __doc__)
    p.add_argument("--prefill", type=int, default=16, help="tokens of each window run through every layer first")
    p.add_argument("--speed-tokens", type=int, default=48, help="tokens decoded at batch 1 for the speed")
    args = p.parse_args(argv)
    model = load_lm(args.model)
    val = val_windows(args.length, args.windows)
    L = num_layers(model)
    # The fixed-exit baseline on the same decoded positions (those after the prefill).
    fixed = exit_perplexities(model, val, from_position=args.prefill)
    rows = {c: [] for c in THRESHOLDS}
    speed_window = val_windows(args.prefill + args.speed_tokens, 1)[0]
    for criterion, thresholds in THRESHOLDS.items():
        for t in thresholds:
            r = early_exit.evaluate(model, val, criterion=criterion, threshold=t, prefill=args.prefill)
            r["tokens_per_s_batch1"] = early_exit.tokens_per_second(model, speed_window, criterion=criterion,
                                                                    threshold=t, prefill=args.prefill)
            rows[criterion].append({"threshold": t, **r})
    out = result_stem(args.out, "early-exit")
    path = write_json(out, {"model": args.model, "config": vars(model.config), "prefill": args.prefill,
                            "decoded_tokens": val.shape[0] * (val.shape[1] - 1 - args.prefill),
                            "thresholds": rows, "fixed_exit_val_ppl": fixed,
                            "note": "threshold 2.0 never exits (the full model); fixed exit = every token "
                                    "at that layer, on the same positions (those after the prefill)"})
    curves = {f"{c} threshold": ([r["avg_layers"] for r in rs], [r["val_ppl"] for r in rs]) for c, rs in rows.items()}
    curves["fixed exit layer"] = (list(fixed), list(fixed.values()))
    lines(out, curves, "average layers used per token", "validation perplexity (bytes)", logy=True,
          title=f"early exit, {L}-layer LM ({args.model})")
    print(f"early exit on {args.model}: teacher-forced decoding of {val.shape[0]} held-out windows")
    for c, rs in rows.items():
        print(f"\n{c:10s} threshold  avg layers  val ppl  tok/s (batch 1)")
        for r in rs:
            print(f"{'':10s} {r['threshold']:9.3f}  {r['avg_layers']:10.2f}  {r['val_ppl']:7.2f}  {r['tokens_per_s_batch1']:8.1f}")
    print("\nfixed exit layer: " + ", ".join(f"{l}: {v:.2f}" for l, v in fixed.items()))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
