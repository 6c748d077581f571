"""Factorizing a trained weight W [out, in] as D S: D dense [out, rank], S N:M-sparse [rank, in]
(DSFormer's initialization from a trained layer)."""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from leanformer.sparse import nm_mask

METHODS = ("alternating", "svd")


def nm_project(s: Tensor, n: int, m: int) -> Tensor:
    """``s`` with all but the ``n`` largest-magnitude entries of every group of ``m`` columns
    zeroed (the Euclidean projection onto the N:M pattern set)."""
    return s * nm_mask(s, n, m)


def relative_error(weight: Tensor, d: Tensor, s: Tensor) -> float:
    """``||W - D S||_F / ||W||_F``."""
    return ((weight - d @ s).norm() / weight.norm().clamp_min(1e-30)).item()


def _fit_dense(weight: Tensor, s: Tensor) -> Tensor:
    """argmin_D ||W - D S||_F: D = W S^T (S S^T)^-1 (lstsq, so a rank-deficient S is fine)."""
    return torch.linalg.lstsq(s.T, weight.T).solution.T


def _fit_sparse(weight: Tensor, d: Tensor, s: Tensor, n: int, m: int, steps: int) -> Tensor:
    """S given D: the N:M projection of the least-squares fit, then projected-gradient steps
    (iterative hard thresholding with step 1/||D^T D||), since the projection alone ignores how
    D mixes S's rows."""
    gram = d.T @ d
    s_ls = torch.linalg.lstsq(d, weight).solution
    best = min((s, nm_project(s_ls, n, m)), key=lambda c: (weight - d @ c).norm().item())
    step = 1.0 / torch.linalg.matrix_norm(gram, ord=2).clamp_min(1e-30)
    dtw = d.T @ weight
    s, best_err = best, (weight - d @ best).norm().item()
    for _ in range(steps):
        s = nm_project(s - step * (gram @ s - dtw), n, m)
        err = (weight - d @ s).norm().item()
        if err < best_err:
            best, best_err = s, err
    return best


def factorize(weight: Tensor, rank: int, n: int = 2, m: int = 4, *, method: str = "alternating",
              iters: int = 10) -> Tuple[Tensor, Tensor, float]:
    """``(D [out, rank], S [rank, in] dense with an N:M pattern, ||W - D S||_F / ||W||_F)``.

    ``"svd"``: from the truncated SVD W ~ U Sigma V^T, S = N:M projection of Sigma^1/2 V^T and
    D = the least-squares fit given S. ``"alternating"``: that start, then ``iters`` rounds of
    S given D (projection of the least-squares fit, refined by projected-gradient steps) and D
    given S (exact least squares), keeping the best iterate, so never worse than ``"svd"``.
    Computed in fp32 (fp64 for an fp64 weight) and returned in the weight's dtype.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    out_f, in_f = weight.shape
    if not 1 <= rank <= min(out_f, in_f):
        raise ValueError(f"rank must be in [1, min(out, in) = {min(out_f, in_f)}] for a [{out_f}, {in_f}] "
                         f"weight, got {rank}")
    if iters < 0:
        raise ValueError(f"iters must be >= 0, got {iters}")
    w = weight.detach().to(torch.float64 if weight.dtype == torch.float64 else torch.float32)
    u, sigma, vh = torch.linalg.svd(w, full_matrices=False)
    root = sigma[:rank].sqrt()
    s = nm_project(root[:, None] * vh[:rank], n, m)
    d = _fit_dense(w, s)
    best = (relative_error(w, d, s), d, s)
    if method == "alternating":
        for _ in range(iters):
            s = _fit_sparse(w, d, s, n, m, steps=5)
            d = _fit_dense(w, s)
            err = relative_error(w, d, s)
            if err < best[0]:
                best = (err, d, s)
    err, d, s = best
    return d.to(weight.dtype), s.to(weight.dtype), err
