"""tree_dwconv: SLAB's causal depthwise conv of V per tree node equals nn.Conv1d run over that
node's branch (the prefix's tail, then root ... node), as plain decoding of the branch computes
it; the reference on odd shapes and every dtype, strided V, shared and per-sequence parents,
tails of 0-3 values; gradcheck, opcheck, compile, bad inputs."""
import pytest
import torch
import torch.nn.functional as F

from leanformer.ops import tree_dwconv
from leanformer.reference import tree_dwconv_reference
from tests.helpers import DEVICES, dtypes_for, random_parents, skip_on_emu, tolerance


def case(B, T, H, D, K, dtype, device, per_sequence=False, bias=True, seed=0):
    """V as a strided view of a fused qkv (the runner's), a tail, parents, taps and bias."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, T, 3, H, D, generator=g)
    v = qkv.to(device, dtype).unbind(2)[2]
    tail = torch.randn(B * H, D, K - 1, generator=g).to(device, dtype)
    parents = random_parents(T, B if per_sequence else None, generator=g).to(device)
    weight = torch.randn(D, K, generator=g).to(device, dtype)
    b = torch.randn(D, generator=g).to(device, dtype) if bias else None
    return v, tail, parents, weight, b


def branch_conv(v, tail, parents, weight, bias):
    """nn.Conv1d's causal depthwise conv over each node's branch, node by node, in fp64."""
    B, T, H, D = v.shape
    out = torch.empty(B, T, H, D, dtype=torch.float64)
    for b in range(B):
        par = (parents if parents.dim() == 1 else parents[b]).tolist()
        for t in range(T):
            chain, cur = [], t
            while cur >= 0:
                chain.append(cur)
                cur = par[cur]
            seq = torch.cat([tail[b * H:(b + 1) * H].double().cpu(),  # [H, D, W], oldest first
                             v[b, chain[::-1]].double().cpu().permute(1, 2, 0)], -1)  # root ... t
            y = F.conv1d(seq, weight.double().cpu()[:, None], None if bias is None else bias.double().cpu(),
                         groups=D)  # [H, D, len - K + 1]: its last column is node t's
            out[b, t] = y[..., -1]
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("K", [1, 2, 4])
@pytest.mark.parametrize("per_sequence", [False, True])
def test_equals_conv1d_over_each_branch(device, K, per_sequence):
    v, tail, parents, weight, bias = case(2, 9, 3, 5, K, torch.float64, device, per_sequence)
    got = tree_dwconv(v, tail, parents, weight, bias)
    torch.testing.assert_close(got.cpu(), branch_conv(v, tail, parents, weight, bias), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(got, tree_dwconv_reference(v, tail, parents, weight, bias), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 4), (3, 19, 4, 64, 4), (2, 13, 2, 7, 3), (1, 76, 4, 33, 5)])
@pytest.mark.parametrize("bias", [True, False])
def test_reference_on_odd_shapes_and_every_dtype(device, shape, bias):
    for dtype in dtypes_for(device):
        v, tail, parents, weight, b = case(*shape, dtype, device, per_sequence=shape[0] > 1, bias=bias)
        tol = tolerance(dtype, 0.5)  # elementwise; a sum of at most 5 taps
        torch.testing.assert_close(tree_dwconv(v, tail, parents, weight, b),
                                   tree_dwconv_reference(v, tail, parents, weight, b), atol=tol, rtol=tol)


@pytest.mark.parametrize("device", DEVICES)
def test_chains_shorter_than_the_kernel_read_the_tail_newest_first(device):
    """A chain root -> child: the child's lags are itself, the root, then the tail's newest."""
    v = torch.tensor([10.0, 20.0], device=device).view(1, 2, 1, 1)
    tail = torch.tensor([1.0, 2.0, 3.0], device=device).view(1, 1, 3)  # oldest first
    weight = torch.tensor([[1000.0, 100.0, 10.0, 1.0]], device=device)  # tap 3 is lag 0
    out = tree_dwconv(v, tail, torch.tensor([-1, 0], device=device), weight, None)
    # written out: node 0 sees (tail 1, 2, 3, node 0) and node 1 sees (tail 2, 3, node 0, node 1)
    assert out.flatten().tolist() == [1 * 1000 + 2 * 100 + 3 * 10 + 10 * 1, 2 * 1000 + 3 * 100 + 10 * 10 + 20 * 1]


def test_gradcheck_fp64():
    v, tail, parents, weight, bias = case(2, 6, 2, 3, 3, torch.float64, "cpu", per_sequence=True)
    args = [t.clone().requires_grad_() for t in (v, tail)] + [parents] + \
        [t.clone().requires_grad_() for t in (weight, bias)]
    assert torch.autograd.gradcheck(lambda v_, t_, p_, w_, b_: tree_dwconv(v_, t_, p_, w_, b_), args)
    assert torch.autograd.gradcheck(lambda v_, t_, w_: tree_dwconv(v_, t_, parents, w_, None),
                                    [args[0], args[1], args[3]])


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_and_compile(device):
    skip_on_emu(device, "opcheck and torch.compile trace the fake kernels, not an EmuTensor")
    v, tail, parents, weight, bias = case(2, 7, 2, 4, 4, torch.float32, device, per_sequence=True)
    v = v.contiguous()
    torch.library.opcheck(torch.ops.leanformer.tree_dwconv.default, (v, tail, parents, weight, bias))
    torch.library.opcheck(torch.ops.leanformer.tree_dwconv.default, (v, tail, parents[0], weight, None))
    args = [t.clone().requires_grad_() for t in (v, tail, weight, bias)]

    def f(v_, t_, w_, b_):
        return tree_dwconv(v_, t_, parents, w_, b_) * 2

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out, ref = compiled(*args), f(*args)
    torch.testing.assert_close(out, ref)
    for g, g_ref in zip(torch.autograd.grad(out.sum(), args), torch.autograd.grad(ref.sum(), args)):
        torch.testing.assert_close(g, g_ref)


def test_bad_inputs_name_the_argument():
    v, tail, parents, weight, bias = case(2, 5, 2, 4, 3, torch.float32, "cpu")
    bad = [
        (dict(parents=torch.tensor([-1, 0, 2, 1, 0])), "parents\\[0, 2\\] = 2"),
        (dict(parents=torch.tensor([0, 0, 0, 1, 0])), "parents\\[0, 0\\] = 0"),
        (dict(parents=parents[:4]), "parents must be int64 \\[T\\] or \\[B, T\\]"),
        (dict(parents=parents.int()), "parents must be int64"),
        (dict(weight=weight[:3]), "weight must be \\[D, kernel_size\\]"),
        (dict(conv_tail=tail[..., :1]), "conv_tail must be \\[B\\*H, D, kernel_size - 1\\]"),
        (dict(conv_tail=tail.double()), "conv_tail must have v's dtype"),
        (dict(weight=weight.double()), "weight must have v's dtype"),
        (dict(bias=bias[:2]), "bias must have shape \\[D\\] = \\[4\\]"),
        (dict(v=v[0]), "v must be \\[B, T, H, D\\]"),
    ]
    for change, message in bad:
        kw = dict(v=v, conv_tail=tail, parents=parents, weight=weight, bias=bias)
        kw.update(change)
        with pytest.raises(RuntimeError, match=message):
            tree_dwconv(**kw)


def test_a_sliced_tail_as_the_cache_keeps_it():
    """SLACache keeps the tail as the last W columns of a longer sequence (not contiguous)."""
    v, tail, parents, weight, bias = case(2, 6, 2, 5, 4, torch.float64, "cpu", per_sequence=True)
    sliced = torch.cat([torch.randn(4, 5, 2, dtype=torch.float64), tail], -1)[..., 2:]
    assert not sliced.is_contiguous() and torch.equal(sliced, tail)
    want = branch_conv(v, tail, parents, weight, bias)
    torch.testing.assert_close(tree_dwconv(v, sliced, parents, weight, bias), want, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(tree_dwconv_reference(v, sliced, parents, weight, bias), want, atol=1e-12, rtol=1e-12)
