"""fastest_tree: the size of a drafter's accuracy-tuned tree, chosen by timing tree decoding on
this host (Sequoia's hardware-aware sizing, measured rather than modelled).

A bigger tree accepts more tokens per forward, but each node is a row of every GEMM of that
forward. On a GPU a few dozen rows cost about what one does; on a CPU, compute-bound at a few
rows, they do not, and a small tree (about 7 nodes) often decodes fastest. No single size fits
every host and model, so it is measured where the model runs.
"""
from __future__ import annotations

import time
from typing import Callable, Dict, Sequence, Tuple

import torch
from torch import Tensor

from leanformer.decoding.generate import generate
from leanformer.decoding.token_tree import TreeShape

SIZES = (4, 7, 11, 15, 19, 27)


def fastest_tree(model, drafter, accuracy, prompts: Sequence[Tensor], *, sizes: Sequence[int] = SIZES,
                 max_new_tokens: int = 64, repeats: int = 2,
                 clock: Callable[[], float] = time.perf_counter) -> Tuple[TreeShape, Dict[int, float]]:
    """The :meth:`TreeShape.from_accuracies` tree of the size that decodes fastest here.

    Each size's tree decodes every prompt (batch 1, greedy, ``max_new_tokens`` each); the sizes
    take turns within each of ``repeats`` rounds, so a host whose speed drifts slows them alike,
    and each keeps its fastest round.

    Args:
        model, drafter: as for :func:`leanformer.generate`.
        accuracy: the drafter's ``[depth][top_k]`` rank accuracies
            (:func:`leanformer.decoding.distill.rank_accuracy`).
        prompts: 1-D int64 prompts; text the drafter was tuned on, not the evaluation's, so
            the choice does not fit the test.
        sizes: tree sizes (nodes, the root included) to try, each >= 2.

    Returns:
        ``(tree, tokens_per_s)``: the fastest size's tree, and the tokens/s of every size.

    Example::

        >>> tree, rates = fastest_tree(model, heads, rank_accuracy(heads, windows), prompts)
        >>> leanformer.generate(model, prompt, max_new_tokens=128, drafter=heads, tree=tree)
    """
    sizes = list(dict.fromkeys(int(n) for n in sizes))
    if not sizes or min(sizes) < 2:
        raise ValueError(f"sizes must be tree sizes >= 2 (the root and one candidate), got {sizes}")
    if not prompts:
        raise ValueError("prompts must hold at least one prompt to time")
    if repeats < 1 or max_new_tokens < 1:
        raise ValueError(f"repeats and max_new_tokens must be >= 1, got {repeats} and {max_new_tokens}")
    trees = {n: TreeShape.from_accuracies(accuracy, n) for n in sizes}
    rates = decoding_rates({n: dict(drafter=drafter, tree=trees[n]) for n in sizes}, model, prompts,
                           max_new_tokens=max_new_tokens, repeats=repeats, clock=clock)
    fastest = max(sizes, key=lambda n: (rates[n], -n))  # a tie goes to the smaller tree
    return trees[fastest], rates


def decoding_rates(options: Dict, model, prompts: Sequence[Tensor], *, max_new_tokens: int, repeats: int = 2,
                   clock: Callable[[], float] = time.perf_counter) -> Dict:
    """Tokens/s of :func:`generate` with each of ``options`` (key -> its keyword arguments, e.g.
    ``drafter`` and ``tree``) over ``prompts`` (batch 1, greedy, ``max_new_tokens`` each): the
    options take turns within each of ``repeats`` rounds, so a host whose speed drifts slows them
    alike, and each keeps its fastest round. One short warm-up generation first."""
    keys = list(options)
    generate(model, [prompts[0][:8]], max_new_tokens=8, **options[keys[0]])  # warm-up
    best = {k: float("inf") for k in keys}
    tokens = {}
    with torch.no_grad():
        for _ in range(repeats):
            for k in keys:
                t0 = clock()
                tokens[k] = sum(len(generate(model, [p], max_new_tokens=max_new_tokens, **options[k]).sequences[0])
                                for p in prompts)
                best[k] = min(best[k], clock() - t0)
    return {k: tokens[k] / best[k] if best[k] > 0 else float("inf") for k in keys}
