"""Deja Vu's active-neuron predictor on a real trained ReLU model: a SLAB LM (activation
"relu") trained on Python's pydoc topics (byte level, last topics held out), then per layer
and per k/d_ff ratio one NeuronPredictor fitted on that layer's MLP inputs over training
text. Reported per layer: the fraction of non-zero activations (Lazy Neuron), the recall of
the true top-k set by the predicted top-k set on validation text; and the validation
perplexity of the dense model, of the true top-k MLPs (an oracle predictor) and of the
predicted sparse MLPs (leanformer.ops.predicted_sparse_mlp in every layer).

    python -m leanformer.lab.train.predictor_lm [--steps 300] [--ratios 0.05,0.1,0.2] [--rank 32]
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from typing import Dict, List, Optional

import torch
from torch import Tensor, nn
from tqdm import tqdm

from leanformer.lab import results as report
from leanformer.lab.data import pydoc_text
from leanformer.lab.train.lm_text import config, lm_loss
from leanformer.models import SLABLM, load_pretrained, save_pretrained
from leanformer.nn import PredictedSparseMLP, fit_predictor, recall
from leanformer.training import random_windows, sequential_windows, train


@torch.no_grad()
def mlp_inputs(model: SLABLM, windows: Tensor, batch: int = 16) -> List[Tensor]:
    """Per block, the rows its MLP sees on ``windows`` ([rows, dim])."""
    seen: List[List[Tensor]] = [[] for _ in model.blocks]
    hooks = [b.mlp.register_forward_pre_hook(lambda m, a, i=i: seen[i].append(a[0].reshape(-1, a[0].shape[-1])))
             for i, b in enumerate(model.blocks)]
    try:
        for chunk in windows.split(batch):
            model(chunk[:, :-1])
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(s) for s in seen]


@torch.no_grad()
def perplexity(model: SLABLM, val: Tensor) -> float:
    losses = [lm_loss(model, chunk).item() for chunk in val.split(16)]
    return math.exp(sum(losses) / len(losses))


@torch.no_grad()
def with_mlps(model: SLABLM, mlps: List[nn.Module]) -> List[nn.Module]:
    """Swaps the blocks' MLPs for ``mlps``; returns the previous ones."""
    old = [b.mlp for b in model.blocks]
    for b, m in zip(model.blocks, mlps):
        b.mlp = m
    return old


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m leanformer.lab.train.predictor_lm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="LM training steps")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ratios", default="0.05,0.1,0.2", help="k / d_ff ratios")
    p.add_argument("--rank", type=int, default=32, help="predictor rank")
    p.add_argument("--fit-steps", type=int, default=300, help="predictor training steps")
    p.add_argument("--fit-windows", type=int, default=96, help="training windows whose MLP inputs train the predictors")
    p.add_argument("--eval-windows", type=int, default=64, help="validation windows (perplexity and recall)")
    p.add_argument("--load", default=None, help="a saved ReLU SLAB LM to use instead of training one")
    p.add_argument("--save", default=None, help="folder to save the trained LM in")
    p.add_argument("--out", default=report.FOLDER, help="folder of the result files")
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    train_tokens, val_tokens = pydoc_text()
    val = sequential_windows(val_tokens, args.length)[: args.eval_windows]
    curves: Dict[str, List[dict]] = {}
    if args.load:
        model = load_pretrained(args.load)
    else:
        cfg = dataclasses.replace(config(args.steps), activation="relu")
        model = SLABLM(cfg)
        data = random_windows(train_tokens, args.batch, args.length, torch.Generator().manual_seed(args.seed))
        curves["SLAB LM (ReLU)"] = train(model, data, lm_loss, steps=args.steps, lr=args.lr,
                                         evaluate=lambda m: {"val_ppl": perplexity(m, val)},
                                         eval_every=max(1, args.steps // 10), desc="SLAB LM (ReLU)")
        if args.save:
            save_pretrained(model, args.save)
    model.eval()
    dense_mlps = [b.mlp for b in model.blocks]
    hidden = dense_mlps[0].fc1.out_features
    fit_windows = next(random_windows(train_tokens, args.fit_windows, args.length,
                                      torch.Generator().manual_seed(args.seed + 1)))
    fit_x, val_x = mlp_inputs(model, fit_windows), mlp_inputs(model, val)
    nonzero = [float((torch.relu(m.fc1(x)) > 0).float().mean()) for m, x in zip(dense_mlps, val_x)]
    dense_ppl = perplexity(model, val)

    ratios = [float(r) for r in args.ratios.split(",")]
    results = []
    bar = tqdm(total=len(ratios) * len(dense_mlps), desc="fit predictors", unit="layer", file=sys.stderr)
    for ratio in ratios:
        k = max(1, round(ratio * hidden))
        t0 = time.perf_counter()
        preds = []
        for m, x in zip(dense_mlps, fit_x):
            preds.append(fit_predictor(m, x, k, steps=args.fit_steps, rank=args.rank, seed=args.seed))
            bar.update()
        fit_s = time.perf_counter() - t0
        layers = [{"layer": i, **recall(pr, m, x, k), "recall_at_2k": recall(pr, m, x, k, k_pred=min(hidden, 2 * k))["recall"]}
                  for i, (pr, m, x) in enumerate(zip(preds, dense_mlps, val_x))]
        with_mlps(model, [PredictedSparseMLP.from_mlp(m, k, None, mode="oracle") for m in dense_mlps])
        topk_ppl = perplexity(model, val)
        with_mlps(model, [PredictedSparseMLP.from_mlp(m, k, pr, mode="predicted") for m, pr in zip(dense_mlps, preds)])
        predicted_ppl = perplexity(model, val)
        with_mlps(model, dense_mlps)
        results.append({"ratio": ratio, "k": k, "layers": layers, "val_ppl": {
            "dense": dense_ppl, "true_topk": topk_ppl, "predicted_topk": predicted_ppl}, "fit_s": fit_s})
    bar.close()

    cfg = model.config
    summary = {
        "model": {"config": vars(cfg), "trained_steps": None if args.load else args.steps, "loaded": args.load},
        "d_ff": hidden, "predictor_rank": args.rank, "fit_steps": args.fit_steps,
        "fit_rows_per_layer": fit_x[0].shape[0], "val_rows_per_layer": val_x[0].shape[0],
        "nonzero_fraction_per_layer": nonzero, "dense_val_ppl": dense_ppl, "results": results,
    }
    stem = report.stem(args.out, "predictor-lm")
    if curves:
        report.write(stem, summary, curves, "val_ppl", "validation perplexity (bytes)", logy=True)
    else:
        report.write(stem, summary, {"loaded": [{"step": 0, "time_s": 0.0, "val_ppl": dense_ppl}]}, "val_ppl",
                     "validation perplexity (bytes)")
    print(f"non-zero activations per layer: {', '.join(f'{z:.1%}' for z in nonzero)}; dense val ppl {dense_ppl:.3f}")
    for r in results:
        rec = ", ".join(f"{l['recall']:.3f}" for l in r["layers"])
        mass = ", ".join(f"{l['mass_recall']:.3f}" for l in r["layers"])
        v = r["val_ppl"]
        print(f"k/d_ff {r['ratio']:.0%} (k={r['k']}): recall per layer {rec} (mass {mass}); val ppl dense "
              f"{v['dense']:.3f}, true top-k {v['true_topk']:.3f}, predicted top-k {v['predicted_topk']:.3f}")
    print(f"wrote {stem}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
