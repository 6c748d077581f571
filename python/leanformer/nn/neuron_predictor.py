"""Active-neuron prediction for sparse MLPs (Deja Vu, Liu et al. ICML 2023).

A top-k MLP still computes the dense up projection to find its k largest activations, so it
cannot beat the dense MLP by 2x. A :class:`NeuronPredictor` -- a small low-rank network
trained on the MLP's own activations -- guesses the top-k set from the MLP's input instead,
and :class:`PredictedSparseMLP` computes only those k rows of ``W_up`` and ``W_down``
(:func:`leanformer.ops.predicted_sparse_mlp`).

    >>> mlp = MLP(256, 1024, activation="relu")            # a trained MLP
    >>> xs = torch.randn(4096, 256)                         # its inputs on real data
    >>> pred = fit_predictor(mlp, xs, k=102, rank=64, steps=300)
    >>> recall(pred, mlp, xs, k=102)                        # share of the true top-k found
    >>> sparse = PredictedSparseMLP.from_mlp(mlp, k=102, predictor=pred)
"""
from __future__ import annotations

import copy
import logging
import math
import sys
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from leanformer.nn.topk_mlp import TopKMLP
from leanformer.ops.topk_mlp import predicted_sparse_mlp, topk_activation, topk_mlp

logger = logging.getLogger(__name__)

# Where the predicted sparse path pays, as guidance for a 2-core CPU in fp32 (d_model 1024,
# d_ff 4096, the predictor included) against the dense eager MLP: for a few rows it is faster at
# every ratio up to 30% of the neurons; at 64 rows only up to about 10%, and much slower at 30%.
# So the dense computation of the same neurons is taken above 8 rows and k / hidden > 10%.
PREDICTED_MAX_SPARSE_ROWS = 8
PREDICTED_MAX_SPARSE_RATIO = 0.10

_ACT = {"relu": F.relu, "gelu": F.gelu}


class NeuronPredictor(nn.Module):
    """Deja Vu's low-rank predictor: ``scores = up(down(x))``, ``down = Linear(dim, rank)``
    (no bias), ``up = Linear(rank, hidden)``; the k largest scores are the predicted neurons.

    Its cost per token is ``rank * (dim + hidden)`` multiply-adds against the MLP's
    ``2 * dim * hidden``: rank 128 at dim 1024, hidden 4096 is 1/6.4 of the dense MLP.
    """

    def __init__(self, dim: int, hidden: int, rank: int):
        super().__init__()
        if not 0 < rank:
            raise ValueError(f"rank must be positive, got {rank}")
        self.down = nn.Linear(dim, rank, bias=False)
        self.up = nn.Linear(rank, hidden)

    def forward(self, x: Tensor) -> Tensor:
        """Scores ``[..., hidden]`` (logits of "this neuron is in the top-k set")."""
        return self.up(self.down(x))

    def predict(self, x: Tensor, k: int) -> Tensor:
        """The ``k`` highest-scoring neurons of every row, ``[..., k]`` int64."""
        return torch.topk(self(x), k, dim=-1, sorted=False).indices

    @torch.no_grad()
    def init_from_svd(self, w_up: Tensor, b_up: Optional[Tensor] = None) -> "NeuronPredictor":
        """Starts from the best rank-r approximation of the up projection (truncated SVD of
        ``w_up``), so the untrained scores already rank neurons by their approximate
        pre-activation; training then turns them into top-k logits."""
        u, s, vh = torch.linalg.svd(w_up.detach().float(), full_matrices=False)
        r = self.down.out_features
        self.down.weight.copy_((s[:r, None].sqrt() * vh[:r]).to(self.down.weight))
        self.up.weight.copy_((u[:, :r] * s[:r].sqrt()).to(self.up.weight))
        self.up.bias.copy_(b_up.detach() if b_up is not None else torch.zeros_like(self.up.bias))
        return self


def _true_topk(mlp: nn.Module, x: Tensor, k: int, activation: str) -> Tensor:
    a = _ACT[activation](mlp.fc1(x))
    return torch.topk(a, k, dim=-1, sorted=False)


def fit_predictor(mlp: nn.Module, inputs: Tensor, k: int, steps: int = 300, *, rank: int = 64,
                  predictor: Optional[NeuronPredictor] = None, batch_size: int = 256, lr: float = 1e-3,
                  activation: Optional[str] = None, svd_init: bool = True, holdout: float = 0.1,
                  seed: int = 0, progress: bool = False) -> NeuronPredictor:
    """Trains a :class:`NeuronPredictor` on ``mlp``'s own activations.

    Targets: the top-k set of ``act(mlp.fc1(x))`` per row (multi-hot); loss: binary cross
    entropy of the scores, positives weighted by ``(hidden - k) / k`` so that missing a top-k
    neuron costs as much in total as the false alarms (recall is what matters: a missed
    active neuron is lost output, an extra one only costs time).

    Args:
        mlp: any module with ``fc1`` (``nn.Linear(dim, hidden)``) followed by the activation
            (``MLP``, ``TopKMLP``, ``PredictedSparseMLP``); left unchanged.
        inputs: ``[M, dim]`` rows the MLP sees on real data (e.g. hooked from a model).
        k: size of the target set, ``0 < k <= hidden``.
        steps, batch_size, lr: Adam on random mini-batches of ``inputs``.
        rank: the predictor's rank when ``predictor`` is None.
        activation: defaults to ``mlp.activation``.
        svd_init: start from the truncated SVD of ``fc1`` (see
            :meth:`NeuronPredictor.init_from_svd`), which converges much faster.
        holdout: share of ``inputs`` (the last rows) kept out of training to measure the
            recall at the start and every ``steps // 5`` steps; the best state is returned
            (BCE is a proxy of the top-k recall and can lower it, e.g. from a good SVD start).
    """
    activation = activation or getattr(mlp, "activation", "relu")
    dim, hidden = mlp.fc1.in_features, mlp.fc1.out_features
    if not 0 < k <= hidden:
        raise ValueError(f"k must be in (0, hidden] = (0, {hidden}], got {k}")
    inputs = inputs.reshape(-1, dim).detach()
    if predictor is None:
        predictor = NeuronPredictor(dim, hidden, rank).to(inputs)
        if svd_init:
            predictor.init_from_svd(mlp.fc1.weight, mlp.fc1.bias)
    n_val = int(holdout * inputs.shape[0]) if inputs.shape[0] > 1 else 0
    inputs, val = (inputs[:-n_val], inputs[-n_val:]) if n_val else (inputs, None)

    def score() -> float:
        predictor.eval()
        r = recall(predictor, mlp, val, k, activation=activation)["recall"]
        predictor.train()
        return r

    best = (score(), copy.deepcopy(predictor.state_dict())) if val is not None else None
    check_every = max(1, steps // 5)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(predictor.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / max(steps, 1))))
    pos_weight = torch.tensor((hidden - k) / k, dtype=inputs.dtype, device=inputs.device)
    it = range(steps)
    if progress:
        it = tqdm(it, desc="fit predictor", unit="step", file=sys.stderr, leave=False)
    predictor.train()
    for step in it:
        x = inputs[torch.randint(0, inputs.shape[0], (min(batch_size, inputs.shape[0]),), generator=g)]
        with torch.no_grad():
            target = torch.zeros(x.shape[0], hidden, dtype=x.dtype, device=x.device)
            target.scatter_(-1, _true_topk(mlp, x, k, activation).indices, 1.0)
        loss = F.binary_cross_entropy_with_logits(predictor(x), target, pos_weight=pos_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if best is not None and ((step + 1) % check_every == 0 or step + 1 == steps):
            r = score()
            if r > best[0]:
                best = (r, copy.deepcopy(predictor.state_dict()))
    if best is not None:
        predictor.load_state_dict(best[1])
    return predictor.eval()


@torch.no_grad()
def recall(predictor: NeuronPredictor, mlp: nn.Module, inputs: Tensor, k: int, k_pred: Optional[int] = None,
           *, activation: Optional[str] = None, batch_size: int = 4096) -> Dict[str, float]:
    """How much of the true top-k set the predicted top-``k_pred`` set (default ``k``) finds.

    Returns ``{"recall": mean over rows of |true ∩ predicted| / |true|, "mass_recall": the
    share of the true top-k activation mass (sum of act values) inside the predicted set}``.
    For ReLU, true top-k neurons whose activation is 0 (rows with fewer than k active
    neurons) are left out of the true set: they contribute nothing to the output.
    """
    activation = activation or getattr(mlp, "activation", "relu")
    k_pred = k if k_pred is None else k_pred
    inputs = inputs.reshape(-1, mlp.fc1.in_features)
    hits = total = mass_hit = mass = 0.0
    for x in inputs.split(batch_size):
        true = _true_topk(mlp, x, k, activation)
        live = true.values > 0 if activation == "relu" else torch.ones_like(true.values, dtype=torch.bool)
        predicted = torch.zeros(x.shape[0], mlp.fc1.out_features, dtype=torch.bool, device=x.device)
        predicted.scatter_(-1, predictor.predict(x, k_pred), True)
        found = predicted.gather(-1, true.indices) & live
        n_live = live.sum(-1)
        per_row = torch.where(n_live > 0, found.sum(-1) / n_live.clamp_min(1), torch.ones_like(n_live, dtype=x.dtype))
        hits += per_row.sum().item()
        total += x.shape[0]
        v = true.values.abs().double()
        mass_hit += (v * found).sum().item()
        mass += (v * live).sum().item()
    return {"recall": hits / max(total, 1), "mass_recall": mass_hit / mass if mass else 1.0}


class PredictedSparseMLP(TopKMLP):
    """``fc2(act(fc1(x)))`` computed on the ``k`` neurons a :class:`NeuronPredictor` picks per
    token (Deja Vu): the predictor, a top-k of its scores, then
    :func:`leanformer.ops.predicted_sparse_mlp`, which reads only those k rows of ``fc1`` and
    ``fc2``. Parameters ``fc1``, ``fc2`` are named and shaped as in :class:`leanformer.nn.MLP`
    (load an MLP's state dict with ``strict=False`` or use :meth:`from_mlp`), plus
    ``predictor``.

    Meant for inference (few tokens per call, e.g. decoding): the result differs from the
    dense MLP wherever the prediction misses active neurons -- measure it with
    :func:`recall`. ``mode="oracle"`` uses the true top-k set instead (the fused top-k MLP;
    the upper bound of what a perfect predictor gives); it is also what ``mode="auto"``
    falls back to when ``predictor`` is None. The op is differentiable in the weights (the
    predictor's top-k is not), so the MLP can be fine-tuned with its predictor in place.
    """

    PREDICTED_MODES = ("auto", "predicted", "oracle")

    def __init__(self, dim: int, hidden: int, k: int, rank: int = 64, activation: str = "relu",
                 bias: bool = True, *, mode: str = "auto", max_sparse_rows: int = PREDICTED_MAX_SPARSE_ROWS,
                 max_sparse_ratio: float = PREDICTED_MAX_SPARSE_RATIO):
        if mode not in self.PREDICTED_MODES:
            raise ValueError(f"mode must be one of {self.PREDICTED_MODES}, got {mode!r}")
        super().__init__(dim, hidden, k, activation, bias, mode="sparse", max_sparse_rows=max_sparse_rows,
                         max_sparse_ratio=max_sparse_ratio)
        self.mode = mode
        self.predictor: Optional[NeuronPredictor] = NeuronPredictor(dim, hidden, rank) if rank else None

    @classmethod
    def from_mlp(cls, mlp: nn.Module, k: int, predictor: Optional[NeuronPredictor] = None,
                 mode: str = "auto") -> "PredictedSparseMLP":
        """A PredictedSparseMLP sharing ``mlp``'s fc1 and fc2 (not copies) and ``predictor``."""
        m = cls(mlp.fc1.in_features, mlp.fc1.out_features, k, rank=0,
                activation=getattr(mlp, "activation", "relu"), bias=mlp.fc1.bias is not None, mode=mode)
        m.fc1, m.fc2, m.predictor = mlp.fc1, mlp.fc2, predictor
        return m

    def forward(self, x: Tensor) -> Tensor:
        source = "oracle" if self.mode == "oracle" or (self.mode == "auto" and self.predictor is None) else "predicted"
        if source == "predicted" and self.predictor is None:
            raise RuntimeError("PredictedSparseMLP(mode='predicted') has no predictor: fit one with fit_predictor")
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        ratio = self.k / self.fc1.out_features if self.fc1.out_features else 0.0
        # Where gathering k rows per token costs more than the dense GEMMs (measured, see
        # PREDICTED_MAX_SPARSE_ROWS): the same neurons, computed densely and masked.
        dense = rows > self.max_sparse_rows and ratio > self.max_sparse_ratio
        path = f"{source}-dense" if dense else source
        if path != self.last_path:
            logger.info("%s: %s path (%d rows, k/hidden = %.1f%%; dense above %d rows and %.0f%%)", self._name(),
                        path, rows, 100 * ratio, self.max_sparse_rows, 100 * self.max_sparse_ratio)
            self.last_path = path
        if source == "oracle":
            if dense:
                h = self.fc1(x)
                values, indices = topk_activation(h, self.k, activation=self.activation)
                return self.fc2(torch.zeros_like(h).scatter(-1, indices, values))
            return topk_mlp(x, self.fc1.weight, self.fc1.bias, self.w_down_t(), self.fc2.bias, self.k,
                            activation=self.activation)
        with torch.no_grad():
            indices = self.predictor.predict(x, self.k)
        if dense:
            h = self.fc1(x)
            act = F.relu(h) if self.activation == "relu" else F.gelu(h)
            return self.fc2(torch.zeros_like(h).scatter(-1, indices, act.gather(-1, indices)))
        return predicted_sparse_mlp(x, self.fc1.weight, self.fc1.bias, self.w_down_t(), self.fc2.bias, indices,
                                    activation=self.activation)

    def _name(self) -> str:
        return f"PredictedSparseMLP({self.fc1.in_features}, {self.fc1.out_features}, k={self.k})"

    def extra_repr(self) -> str:
        return f"k={self.k}, activation={self.activation}, mode={self.mode}"
