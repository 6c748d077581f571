"""verify_tree_greedy / verify_tree_sampling against Python walks down the tree, the lossless
property of sampling verification (chi-square over thousands of draws), opcheck, compile and
bad inputs (the warps themselves: tests/decoding/test_sampling.py)."""
import pytest
import torch
from scipy.stats import chisquare

from leanformer.decoding import warp_probs
from leanformer.ops import verify_tree_greedy, verify_tree_sampling
from leanformer.reference import verify_tree_greedy_reference, verify_tree_sampling_reference
from tests.helpers import DEVICES, device_dtypes, drafted_tree, generator_device, skip_on_emu

CASES = device_dtypes(fp64=True)


def check_same(result, expected):
    for name, a, b in zip(("accepted", "num_accepted", "bonus"), result, expected):
        assert a.dtype == torch.long and torch.equal(a.cpu(), b.cpu()), f"{name}: {a} != {b}"


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("batched_parents", [False, True])
@pytest.mark.parametrize("T", [1, 2, 13, 40])
def test_greedy_matches_python_walk(device, dtype, batched_parents, T):
    g = torch.Generator().manual_seed(T)
    logits, tokens, parents = drafted_tree(64, T, 11, device, batched_parents, generator=g)
    logits = logits.to(dtype)
    result = verify_tree_greedy(logits, tokens, parents)
    check_same(result, verify_tree_greedy_reference(logits, tokens, parents))
    accepted, num, _ = result
    if T > 2:
        assert num.max() >= 3, "the drafted trees should give some long paths"
    assert (accepted[:, 0] == 0).all() and (num >= 1).all()
    assert ((accepted >= 0).sum(1) == num).all()


def test_greedy_by_hand():
    # root(5) -> 1(3), 2(7) -> 3(4) under node 2; -1 padding at 4 (a child of 2).
    tokens = torch.tensor([[5, 3, 7, 4, -1], [5, 3, 7, 4, -1]])
    parents = torch.tensor([-1, 0, 0, 2, 2])
    logits = torch.zeros(2, 5, 10)
    logits[0, 0, 7] = logits[0, 2, 4] = logits[0, 3, 9] = 1   # 7 then 4 accepted, bonus 9
    logits[1, 0, 2] = 1                                        # nothing accepted, bonus 2
    accepted, num, bonus = verify_tree_greedy(logits, tokens, parents)
    assert accepted.tolist() == [[0, 2, 3, -1, -1], [0, -1, -1, -1, -1]]
    assert num.tolist() == [3, 1] and bonus.tolist() == [9, 2]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("low,high", [(1.0, 1.0 + 1e-12), (1e39, 2e39), (-2e39, -1e39)])
def test_greedy_fp64_argmax_is_torch_argmax(device, low, high):
    """fp64 logits are compared in fp64, as torch.argmax does: rounded to fp32 first, 1 and
    1 + 1e-12 tie (and 1e39, 2e39 both become inf) and the lower token won."""
    tokens = torch.tensor([[5, 3, 7]], device=device)
    parents = torch.tensor([-1, 0, 0], device=device)
    logits = torch.full((1, 3, 10), -3e39 if low < 0 else 0.0, dtype=torch.float64, device=device)
    logits[0, 0, 3], logits[0, 0, 7] = low, high
    logits[0, 2, 4] = 1.0
    assert int(logits[0, 0].argmax()) == 7
    for result in (verify_tree_greedy(logits, tokens, parents),
                   verify_tree_greedy_reference(logits, tokens, parents)):
        accepted, num, bonus = (t.tolist() for t in result)
        assert accepted == [[0, 2, -1]] and num == [2] and bonus == [4], (low, high, result)


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("batched_parents", [False, True])
def test_sampling_matches_python_walk(device, dtype, batched_parents):
    g = torch.Generator().manual_seed(1)
    logits, tokens, parents = drafted_tree(200, 17, 9, device, batched_parents, generator=g)
    probs = warp_probs(logits, temperature=0.7, top_k=6).to(dtype)
    uniforms = torch.rand(200, 17, generator=g).to(device)
    result = torch.ops.leanformer.verify_tree_sampling(probs, tokens, parents, uniforms)
    check_same(result, verify_tree_sampling_reference(probs, tokens, parents, uniforms))
    assert result[1].max() >= 3


def lossless_case(device):
    """V = 6; root children tokens 2, 0, 2 (a duplicate), -1 (padding), 4; node 1 (token 2) has
    children 1, 3. Peaked enough that every branch is taken often."""
    V = 6
    tokens = torch.tensor([0, 2, 0, 2, -1, 4, 1, 3])
    parents = torch.tensor([-1, 0, 0, 0, 0, 0, 1, 1])
    probs = torch.tensor([[0.1, 0.05, 0.35, 0.2, 0.25, 0.05]] + [[1.0 / V] * V] * 7)
    probs[1] = torch.tensor([0.3, 0.25, 0.05, 0.1, 0.2, 0.1])
    return tokens.to(device), parents.to(device), probs.to(device)


def chi_square_pvalue(samples, p):
    """p-value of the draws `samples` (token ids) under the distribution p."""
    p = p.cpu().double()
    observed = torch.bincount(samples, minlength=p.numel()).double()
    return chisquare(observed, p / p.sum() * observed.sum()).pvalue


@pytest.mark.parametrize("device", DEVICES)
def test_sampling_is_lossless(device):
    """The first token (accepted child or bonus) is distributed as p at the root, and the token
    after an accepted child as p at that child: chi-square over 40000 draws."""
    tokens, parents, probs = lossless_case(device)
    N = 40000
    g = torch.Generator(device=generator_device(device)).manual_seed(0)
    accepted, num, bonus = verify_tree_sampling(probs.expand(N, -1, -1), tokens.expand(N, -1), parents,
                                                generator=g)
    accepted, num, bonus = accepted.cpu(), num.cpu(), bonus.cpu()
    tok = tokens.cpu()
    assert (tok[accepted[num > 1, 1]] >= 0).all(), "a -1 padding node was accepted"
    first = torch.where(num > 1, tok[accepted[:, 1].clamp_min(0)], bonus)
    assert chi_square_pvalue(first, probs[0]) > 1e-3
    # Given the first token 2 (node 1), the second is p at node 1 (accepted child or bonus).
    via1 = (num > 1) & (accepted[:, 1] == 1)
    second = torch.where(num[via1] > 2, tok[accepted[via1, 2].clamp_min(0)], bonus[via1])
    assert chi_square_pvalue(second, probs[1]) > 1e-3
    assert via1.sum() > 0.3 * N


@pytest.mark.parametrize("device", DEVICES)
def test_sampling_wrapper_uses_the_generator_on_warped_probs(device):
    g = torch.Generator().manual_seed(2)
    logits, tokens, parents = drafted_tree(50, 12, 9, device, True, generator=g)
    run = lambda seed, **warp: verify_tree_sampling(warp_probs(logits, **warp), tokens, parents,
                                                    generator=torch.Generator(device=generator_device(device)).manual_seed(seed))
    check_same(run(3, temperature=0.8), run(3, temperature=0.8))
    # top_k=1 leaves one token per node: sampling verification is greedy verification.
    check_same(run(4, top_k=1), verify_tree_greedy(logits, tokens, parents))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        run(0, temperature=0.0)
    with pytest.raises(ValueError, match=r"probs must be \[B, T, V\]"):
        verify_tree_sampling(logits[0], tokens, parents)


@pytest.mark.parametrize("device", DEVICES)
def test_verify_opcheck_and_compile(device):
    skip_on_emu(device, "opcheck and torch.compile test the fake kernels")
    g = torch.Generator().manual_seed(5)
    logits, tokens, parents = drafted_tree(4, 9, 7, device, False, generator=g)
    uniforms = torch.rand(4, 9, generator=g).to(device)
    torch.library.opcheck(torch.ops.leanformer.verify_tree_greedy.default, (logits, tokens, parents))
    torch.library.opcheck(torch.ops.leanformer.verify_tree_sampling.default,
                          (logits.softmax(-1), tokens, parents, uniforms))
    compiled = torch.compile(lambda l, t, p: verify_tree_greedy(l * 2, t, p), fullgraph=True, backend="aot_eager")
    check_same(compiled(logits, tokens, parents), verify_tree_greedy(logits, tokens, parents))


@pytest.mark.parametrize("device", DEVICES)
def test_verify_bad_inputs_name_the_argument(device):
    logits = torch.randn(2, 4, 10, device=device)
    tokens = torch.tensor([[1, 2, 3, 4]] * 2, device=device)
    parents = torch.tensor([-1, 0, 0, 1], device=device)
    u = torch.rand(2, 4, device=device)
    greedy = torch.ops.leanformer.verify_tree_greedy
    sampling = torch.ops.leanformer.verify_tree_sampling
    cases = [
        (greedy, (logits, tokens, parents[:3]), r"parents must be \[T\] = \[4\]"),
        (greedy, (logits, tokens[:, :3], parents), r"tree_tokens must be \[B, T\]"),
        (greedy, (logits, tokens.int(), parents), "tree_tokens must be int64"),
        (greedy, (logits[0], tokens, parents), r"logits must be \[B, T, V\]"),
        (sampling, (logits.softmax(-1), tokens, parents, u[:, :3]), r"uniforms must be \[B, U\] .* U >= T = 4"),
        (sampling, (logits.softmax(-1), tokens, parents, u.double()), "uniforms must be float32"),
    ]
    if device == "cpu":  # value checks; CUDA reads no values back (device-side asserts instead)
        cases += [
            (greedy, (logits, tokens, torch.tensor([-1, 0, 2, 1], device=device)), r"parents\[0, 2\] = 2: must be in \[0, i\)"),
            (greedy, (logits, tokens, torch.tensor([0, 0, 0, 1], device=device)), "root's parent must be -1"),
            (greedy, (logits, tokens.clone().index_fill_(1, torch.tensor([2], device=device), 10), parents),
             r"tree_tokens\[0, 2\] = 10 is not in the vocabulary .*V = 10"),
            (greedy, (logits, tokens.clone().index_fill_(1, torch.tensor([0], device=device), -1), parents),
             "the root must be a real token"),
        ]
    for op, args, message in cases:
        with pytest.raises(RuntimeError, match=message):
            op(*args)
