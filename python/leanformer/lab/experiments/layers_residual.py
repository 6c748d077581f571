"""How much every attention and MLP sub-block of a saved LM writes into the residual stream, on
held-out pydoc text: the relative norm |h| / |x| of its output h to the residual x it reads and
cos(h, x) (negative: it erases what is there), per layer.

    leanformer layers residual --model DIR [--out bench/results]
"""
from __future__ import annotations

import sys
from typing import List, Optional

from leanformer.lab.experiments.layers_common import load_lm, parser, result_stem, val_windows
from leanformer.lab.results import lines, write_json
from leanformer.layers.residual import contributions


def main(argv: Optional[List[str]] = None) -> int:
    args = parser("residual", __doc__).parse_args(argv)
    model = load_lm(args.model)
    val = val_windows(args.length, args.windows)
    stats = contributions(model, [c[:, :-1] for c in val.split(16)])
    out = result_stem(args.out, "residual")
    path = write_json(out, {"model": args.model, "config": vars(model.config), "val_tokens": val[:, 1:].numel(),
                            "contributions": stats})
    curves = {}
    for kind, per_layer in stats.items():
        layers = [i for i, s in enumerate(per_layer) if s is not None]
        curves[f"{kind} |h|/|x|"] = (layers, [per_layer[i]["relative_norm"] for i in layers])
        curves[f"{kind} cos(h, x)"] = (layers, [per_layer[i]["cos_to_residual"] for i in layers])
    lines(out, curves, "layer", "relative norm / cosine", title=f"residual contributions, {args.model}")
    print(f"residual contributions on {args.model} ({val[:, 1:].numel()} held-out bytes)")
    print("layer  attn |h|/|x|  attn cos(h,x)  mlp |h|/|x|  mlp cos(h,x)")
    for i, (a, m) in enumerate(zip(stats["attention"], stats["mlp"])):
        fmt = lambda s, k: "      -" if s is None else f"{s[k]:7.3f}"
        print(f"{i:5d}  {fmt(a, 'relative_norm'):>11s}  {fmt(a, 'cos_to_residual'):>13s}  "
              f"{fmt(m, 'relative_norm'):>11s}  {fmt(m, 'cos_to_residual'):>12s}")
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
