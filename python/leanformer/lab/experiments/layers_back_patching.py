"""Back-patching on a saved LM: the last position's hidden state of layer j written back into
layer i < j during the prefill of held-out pydoc windows; next-byte accuracy at that position,
and the fractions of windows fixed (wrong -> right) and broken, for every (i, j).

    leanformer layers back-patching --model DIR [--out bench/results]
"""
from __future__ import annotations

import sys
from typing import List, Optional

from leanformer.lab.experiments.layers_common import load_lm, parser, result_stem, val_windows
from leanformer.lab.results import lines, write_json
from leanformer.layers import num_layers
from leanformer.layers.back_patching import back_patching


def main(argv: Optional[List[str]] = None) -> int:
    p = parser("back-patching", __doc__)
    p.set_defaults(length=32, windows=512)
    args = p.parse_args(argv)
    model = load_lm(args.model)
    val = val_windows(args.length, args.windows)
    rows = back_patching(model, val)
    L = num_layers(model)
    out = result_stem(args.out, "back-patching")
    path = write_json(out, {"model": args.model, "config": vars(model.config), "windows": val.shape[0],
                            "context": args.length, "rows": rows,
                            "note": "row i=j=0 is the unpatched model; hidden state i is the input of block i"})
    lines(out, {f"into layer {i}": ([r["j"] for r in rows if r["i"] == i], [r["fixed"] for r in rows if r["i"] == i])
                for i in range(1, L)}, "source layer j", "fraction of windows fixed (wrong -> right)",
          title=f"back-patching, {args.model}")
    base = rows[0]["accuracy"]
    print(f"back-patching on {args.model}: {val.shape[0]} held-out windows, next byte after {args.length}; "
          f"unpatched accuracy {base:.3f}")
    print("  i  j  accuracy   fixed  broken")
    for r in rows[1:]:
        print(f"{r['i']:3d}{r['j']:3d}  {r['accuracy']:8.3f}  {r['fixed']:6.3f}  {r['broken']:6.3f}")
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
