"""fastest_tree: times each size's accuracy-tuned tree on the given prompts, sizes taking turns
round by round, keeps each size's fastest round and returns the fastest size's tree (a tie to
the smaller); a scripted clock makes the choice checkable. Bad arguments raise."""
import itertools

import pytest
import torch

from leanformer.decoding import MedusaHeads, TreeShape, fastest_tree
from leanformer.models import LlamaConfig, LlamaLM

ACCURACY = [[0.6, 0.1, 0.05], [0.5, 0.1, 0.05], [0.4, 0.1, 0.05]]


@pytest.fixture(scope="module")
def model_and_heads():
    torch.manual_seed(0)
    model = LlamaLM(LlamaConfig(dim=32, depth=1, num_heads=2, num_kv_heads=1, max_seq_len=256)).eval()
    return model, MedusaHeads(model, 3)


def paired_clock(durations):
    """perf_counter's stand-in: readings t0, t0 + d0, t1, t1 + d1, ... for the durations in turn."""
    values = list(itertools.chain.from_iterable((10.0 * i, 10.0 * i + d) for i, d in enumerate(durations)))
    it = iter(values)
    return lambda: next(it)


def test_picks_the_size_with_the_fastest_round(model_and_heads):
    model, heads = model_and_heads
    prompts = [torch.arange(5, 17), torch.arange(40, 49)]
    # rounds: sizes 4, 7, 11 take turns; their best rounds are 0.5, 0.625 and 0.5625 s
    tree, rates = fastest_tree(model, heads, ACCURACY, prompts, sizes=(4, 7, 11), max_new_tokens=6, repeats=2,
                               clock=paired_clock([1.0, 0.625, 0.5625, 0.5, 0.75, 0.875]))
    assert tree.paths == TreeShape.from_accuracies(ACCURACY, 4).paths
    tokens = 2 * 6
    assert rates == pytest.approx({4: tokens / 0.5, 7: tokens / 0.625, 11: tokens / 0.5625})


def test_a_tie_goes_to_the_smaller_tree(model_and_heads):
    model, heads = model_and_heads
    tree, rates = fastest_tree(model, heads, ACCURACY, [torch.arange(3, 11)], sizes=(11, 7), max_new_tokens=4,
                               repeats=1, clock=paired_clock([0.25, 0.25]))
    assert rates[7] == rates[11] and tree.num_nodes == 7


def test_real_clock_times_every_size(model_and_heads):
    model, heads = model_and_heads
    tree, rates = fastest_tree(model, heads, ACCURACY, [torch.arange(3, 11)], sizes=(2, 5), max_new_tokens=4,
                               repeats=1)
    assert set(rates) == {2, 5} and all(r > 0 for r in rates.values())
    assert tree.num_nodes == max(rates, key=lambda n: (rates[n], -n))


@pytest.mark.parametrize("kw,message", [
    (dict(sizes=()), "sizes must be tree sizes >= 2"),
    (dict(sizes=(1, 7)), "sizes must be tree sizes >= 2"),
    (dict(prompts=[]), "prompts must hold at least one prompt"),
    (dict(repeats=0), "repeats and max_new_tokens must be >= 1"),
])
def test_bad_arguments_raise(model_and_heads, kw, message):
    model, heads = model_and_heads
    args = dict(prompts=[torch.arange(3, 11)], sizes=(4, 7))
    args.update(kw)
    with pytest.raises(ValueError, match=message):
        fastest_tree(model, heads, ACCURACY, args.pop("prompts"), **args)
