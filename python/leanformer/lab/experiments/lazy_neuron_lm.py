"""The Lazy Neuron measurement on a ReLU language model of the project trained on real text
(a SLAB LM saved by `leanformer train lm-text --activation relu --save DIR`): the fraction of
non-zero MLP activations per layer on held-out pydoc text, and the validation perplexity with
top-k MLPs at several k/d_ff ratios.

    leanformer experiment lazy-neuron-lm --model DIR [--out bench/results]
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
from typing import List, Optional

import torch

from leanformer.analysis import activation_sparsity
from leanformer.convert import to_topk_mlp
from leanformer.lab.data import pydoc_text
from leanformer.lab.results import FOLDER, stem, write_json
from leanformer.lab.train.lm_text import lm_loss
from leanformer.models import load_pretrained
from leanformer.training import sequential_windows

RATIOS = (0.5, 0.25, 0.1, 0.05, 0.03)


@torch.no_grad()
def perplexity(model, windows) -> float:
    losses = [lm_loss(model, chunk).item() for chunk in windows.split(16)]
    return math.exp(sum(losses) / len(losses))


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="leanformer experiment lazy-neuron-lm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="folder of a saved SLAB LM (save_pretrained)")
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--windows", type=int, default=64, help="validation windows")
    p.add_argument("--out", default=FOLDER, help="folder of the result files")
    args = p.parse_args(argv)

    model = load_pretrained(args.model).eval()
    _, val_tokens = pydoc_text()
    val = sequential_windows(val_tokens, args.length)[: args.windows]
    stats = activation_sparsity(model, [w[None, :-1] for w in val], ratios=RATIOS)
    dense = perplexity(model, val)
    topk = {}
    for r in RATIOS:
        sparse = copy.deepcopy(model)
        to_topk_mlp(sparse, ratio=r)
        topk[r] = perplexity(sparse, val)
    report = {"model": args.model, "config": vars(model.config), "val_bytes": val.numel(),
              "activation_stats": stats, "val_ppl_dense": dense,
              "val_ppl_topk": {str(r): v for r, v in topk.items()}}
    path = write_json(stem(args.out, "experiment-lazy-neuron-lm"), report)
    print(f"{model.config.activation} SLAB LM ({args.model}) on {val.numel()} held-out pydoc bytes")
    print("layer            nonzero fraction")
    for name, s in stats.items():
        print(f"{name:16s} {s['nonzero_fraction']:.4f}")
    print(f"\nval ppl dense {dense:.3f}; with top-k: " + ", ".join(f"{r:.0%}: {v:.3f}" for r, v in topk.items()))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
