"""Top-k sparse MLP (Lazy Neuron) against the dense code a user would otherwise write.

Shapes of the issue: d_model 1024, d_ff 4096, N tokens in {1, 4, 64}, k / d_ff in
{1%, 3%, 10%, 30%}, ReLU. Per shape:
- sparse_down: sparse_down_projection of the k selected activations vs F.linear of the
  dense (zero-filled) activations with the down projection's weight;
- topk_mlp: the fused op vs the dense eager MLP (F.linear + ReLU + F.linear, no top-k) and vs
  dense + torch.topk masking (the same math as the op, in eager PyTorch);
- predicted_sparse_mlp: Deja Vu's predicted sparse MLP, predictor included (a NeuronPredictor
  of rank d_model / 8, the top-k of its scores, then predicted_sparse_mlp reading k rows of
  each weight) vs the dense eager MLP;
plus topk_activation vs torch.topk at 3%, and one training step (fwd+bwd) at N = 64.
"""
from __future__ import annotations

import itertools
from typing import List

import torch
import torch.nn.functional as F

from bench.case import Case, bench_cases, time_case
from leanformer.nn import NeuronPredictor
from leanformer.ops import predicted_sparse_mlp, sparse_down_projection, topk_activation, topk_mlp

D_MODEL, D_FF = 1024, 4096
ROWS = (1, 4, 64)
RATIOS = (0.01, 0.03, 0.10, 0.30)
QUICK = {"d_model": 32, "d_ff": 128, "rows": (1, 5), "ratios": (0.03, 0.3)}


def _dense_mlp(x, w_up, b_up, w_down, b_down):
    return F.linear(F.relu(F.linear(x, w_up, b_up)), w_down, b_down)


def _dense_topk_mlp(x, w_up, b_up, w_down, b_down, k):
    a = F.relu(F.linear(x, w_up, b_up))
    values, indices = torch.topk(a, k, dim=-1)
    return F.linear(torch.zeros_like(a).scatter(-1, indices, values), w_down, b_down)


def cases(device: str, dtype: torch.dtype, quick: bool = False) -> List[Case]:
    g = torch.Generator().manual_seed(0)
    d_model, d_ff = (QUICK["d_model"], QUICK["d_ff"]) if quick else (D_MODEL, D_FF)
    rows, ratios = (QUICK["rows"], QUICK["ratios"]) if quick else (ROWS, RATIOS)
    randn = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(device=device, dtype=dtype)
    w_up, b_up = randn(d_ff, d_model, scale=d_model ** -0.5), randn(d_ff, scale=0.1)
    w_down, b_down = randn(d_model, d_ff, scale=d_ff ** -0.5), randn(d_model, scale=0.1)
    w_down_t = w_down.t().contiguous()
    weights = (w_up, b_up, w_down_t, w_down, b_down)
    on_cpu = device == "cpu"
    torch.manual_seed(0)
    predictor = NeuronPredictor(d_model, d_ff, max(1, d_model // 8)).to(device=device, dtype=dtype).eval()
    out = []
    for n, ratio in itertools.product(rows, ratios):
        k = max(1, round(ratio * d_ff))
        x = randn(n, d_model)
        out += _shape_cases(x, weights, k, ratio, on_cpu)
        out += _predicted_cases(x, weights, predictor, k, ratio, on_cpu)
    out += _activation_cases(randn(rows[0], d_ff), round(0.03 * d_ff) or 1)
    out += _training_cases(randn(rows[-1], d_model), weights, round(0.1 * d_ff) or 1)
    return out


def _shape_cases(x, weights, k, ratio, on_cpu):
    w_up, b_up, w_down_t, w_down, b_down = weights
    n, d_ff = x.shape[0], w_up.shape[0]
    label = f"N={n} k={k}/{d_ff} ({ratio:.0%})"
    values, indices = topk_activation(F.linear(x, w_up, b_up), k)
    dense_h = torch.zeros(n, d_ff, dtype=x.dtype, device=x.device).scatter(-1, indices, values)
    targets = on_cpu and n == 1 and ratio == 0.03 and d_ff == D_FF
    return [
        Case("sparse_down", label, "fwd", lambda: sparse_down_projection(values, indices, w_down_t, b_down),
             {"dense_linear": lambda: F.linear(dense_h, w_down, b_down)},
             {"dense_linear": 10.0} if targets else {}),
        Case("topk_mlp", label, "fwd", lambda: topk_mlp(x, w_up, b_up, w_down_t, b_down, k),
             {"dense_eager": lambda: _dense_mlp(x, w_up, b_up, w_down, b_down),
              "dense_torch_topk": lambda: _dense_topk_mlp(x, w_up, b_up, w_down, b_down, k)},
             {"dense_eager": 1.8} if targets else {}),
    ]


def _predicted_cases(x, weights, predictor, k, ratio, on_cpu):
    w_up, b_up, w_down_t, w_down, b_down = weights
    n, d_ff = x.shape[0], w_up.shape[0]
    label = f"N={n} k={k}/{d_ff} ({ratio:.0%}) rank={predictor.down.out_features}"

    def ours():
        with torch.no_grad():
            return predicted_sparse_mlp(x, w_up, b_up, w_down_t, b_down, predictor.predict(x, k))

    targets = on_cpu and n == 1 and ratio == 0.03 and d_ff == D_FF
    return [Case("predicted_sparse_mlp", label, "fwd", ours,
                 {"dense_eager": lambda: _dense_mlp(x, w_up, b_up, w_down, b_down)},
                 {"dense_eager": 4.0} if targets else {})]


def _activation_cases(h, k):
    label = f"N={h.shape[0]} k={k}/{h.shape[1]}"
    return [Case("topk_activation", label, "fwd", lambda: topk_activation(h, k),
                 {"torch_topk": lambda: torch.topk(F.relu(h), k, dim=-1)})]


def _training_cases(x, weights, k):
    w_up, b_up, w_down_t, w_down, b_down = (w.clone().requires_grad_(True) for w in weights)
    xg = x.clone().requires_grad_(True)
    go = torch.ones_like(x)

    def run(fn):
        def step():
            fn().backward(go)
        return step

    label = f"N={x.shape[0]} k={k}/{w_up.shape[0]}"
    return [Case("topk_mlp", label, "fwd+bwd", run(lambda: topk_mlp(xg, w_up, b_up, w_down_t, b_down, k)),
                 {"dense_eager": run(lambda: _dense_mlp(xg, w_up, b_up, w_down, b_down)),
                  "dense_torch_topk": run(lambda: _dense_topk_mlp(xg, w_up, b_up, w_down, b_down, k))})]


@bench_cases(cases)
def test_topk_mlp(benchmark, case, impl, bench_round):
    time_case(benchmark, case, impl, bench_round)
