"""Self-speculative decoding with a shallow exit of a saved LM (best a SoFT-trained one): for
every exit l < L, leanformer.generate with the first l layers drafting ``--future`` tokens (a
chain) and the whole model verifying, greedy, on prompts from held-out pydoc text: the mean
accepted length (tokens per forward of the whole model), the wall-clock speed-up over plain
decoding at batch 1, and a check that the tokens are exactly plain greedy decoding's.

    leanformer layers self-speculative --model DIR [--out bench/results]
"""
from __future__ import annotations

import sys
import time
from typing import List, Optional

import torch

from leanformer.decoding import generate
from leanformer.lab.experiments.layers_common import load_lm, parser, result_stem, val_windows
from leanformer.lab.results import lines, write_json
from leanformer.layers import num_layers
from leanformer.layers.self_speculative import ShallowExitDrafter


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main(argv: Optional[List[str]] = None) -> int:
    p = parser("self-speculative", __doc__)
    p.set_defaults(length=32, windows=6)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--future", type=int, default=3, help="tokens drafted per step")
    args = p.parse_args(argv)
    model = load_lm(args.model)
    prompts = val_windows(args.length, args.windows)[:, :args.length]
    L = num_layers(model)
    plain, plain_s = [], 0.0
    for ids in prompts:
        out, s = timed(lambda: generate(model, ids[None], max_new_tokens=args.new_tokens))
        plain.append(out.sequences[0])
        plain_s += s
    rows = []
    for l in range(1, L):
        drafter = ShallowExitDrafter(model, l, args.future)
        same, accepted, forwards, spent = 0, [], 0, 0.0
        for ids, want in zip(prompts, plain):
            out, s = timed(lambda: generate(model, ids[None], max_new_tokens=args.new_tokens, drafter=drafter))
            same += int(torch.equal(out.sequences[0], want))
            accepted += out.accepted_lengths
            forwards += out.forwards
            spent += s
        rows.append({"exit_layer": l, "mean_accepted_length": sum(accepted) / len(accepted),
                     "forwards": forwards, "plain_forwards": len(prompts) * args.new_tokens,
                     "speedup": plain_s / spent, "identical_to_plain": same, "of": len(prompts)})
    out = result_stem(args.out, "self-speculative")
    path = write_json(out, {"model": args.model, "config": vars(model.config), "prompts": len(prompts),
                            "prompt_length": args.length, "new_tokens": args.new_tokens, "future": args.future,
                            "plain_seconds": plain_s, "rows": rows})
    lines(out, {"mean accepted length": ([r["exit_layer"] for r in rows], [r["mean_accepted_length"] for r in rows]),
                "wall-clock speed-up": ([r["exit_layer"] for r in rows], [r["speedup"] for r in rows])},
          "drafting exit layer", "tokens per verifying forward / speed-up",
          title=f"self-speculative decoding, {args.model}")
    print(f"self-speculative decoding on {args.model}: {len(prompts)} prompts, {args.new_tokens} new tokens, "
          f"{args.future} drafted per step (greedy); plain decoding {plain_s:.2f} s")
    print("exit  accepted length  forwards (plain)  speed-up  identical")
    for r in rows:
        print(f"{r['exit_layer']:4d}  {r['mean_accepted_length']:15.2f}  {r['forwards']:8d} ({r['plain_forwards']})"
              f"  {r['speedup']:8.2f}  {r['identical_to_plain']}/{r['of']}")
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
