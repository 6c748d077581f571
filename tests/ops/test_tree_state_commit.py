"""sla_tree_commit: a SLAB LM's state after a verified tree, in place for every layer, equal to
plain decoding of the accepted path token by token (the reference); strided K/V, conv tails
shorter and longer than the path, bad inputs that leave the state alone, opcheck, compile."""
import pytest
import torch

from leanformer.ops import sla_tree_commit, verify_tree_greedy
from leanformer.reference import sla_tree_commit_reference
from tests.helpers import DEVICES, drafted_tree, skip_on_emu, tolerance

# (state dtype, K/V dtype): the model's fp32 and bf16 K/V into an fp32 state; fp64 throughout
DTYPES = [(torch.float32, torch.float32), (torch.float32, torch.bfloat16), (torch.float64, torch.float64)]


def commit_case(L, B, T, H, Dk, Dv, W, state_dtype, kv_dtype, device, extra=(), seed=0):
    """States, tails and a tree's K/V per layer (as strided views of a fused qkv, like the
    runner's), and real accepted paths from a greedy verification of a drafted tree."""
    g = torch.Generator().manual_seed(seed)
    S = [torch.randn(B, H, Dk, Dv, generator=g).to(device, state_dtype) for _ in range(L)]
    z = [torch.rand(B, H, Dk, generator=g).to(device, state_dtype) for _ in range(L)]
    tails = [torch.randn(B * H, Dv, W, generator=g).to(device, kv_dtype) for _ in range(L)]
    k, v = [], []
    for l in range(L):
        Tl = T + (extra[l] if l < len(extra) else 0)  # Hidden Transfer's later layers hold more nodes
        qkv = torch.randn(B, Tl, 3, H, max(Dk, Dv), generator=g).to(device, kv_dtype)
        k.append(qkv[:, :, 1, :, :Dk])
        v.append(qkv[:, :, 2, :, :Dv])
    logits, tokens, parents = drafted_tree(B, T, 7, device, True, generator=g)
    accepted, num, _ = verify_tree_greedy(logits, tokens, parents)
    return S, z, tails, k, v, accepted, num


def check_against_reference(S, z, tails, k, v, path, num, tol):
    """Commits in place and compares elementwise with the reference: a few rank-one updates per
    accepted node, so half the shared tolerance."""
    want = sla_tree_commit_reference(S, z, tails, k, v, path, num)
    ptrs = [t.data_ptr() for t in S + z + tails]
    sla_tree_commit(S, z, tails, k, v, path, num)
    assert [t.data_ptr() for t in S + z + tails] == ptrs  # in place
    for got, ref in zip(S + z + tails, want[0] + want[1] + want[2]):
        torch.testing.assert_close(got, ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("state_dtype,kv_dtype", DTYPES)
@pytest.mark.parametrize("W", [0, 1, 3, 7])
def test_commit_equals_plain_decoding_of_the_path(device, state_dtype, kv_dtype, W):
    case = commit_case(3, 4, 11, 2, 5, 6, W, state_dtype, kv_dtype, device, extra=(0, 0, 4))
    num = case[-1]
    assert num.max() > 1 and num.min() < num.max(), "paths of different lengths"
    check_against_reference(*case, tol=tolerance(state_dtype, 0.5))


@pytest.mark.parametrize("device", DEVICES)
def test_commit_without_conv_and_with_an_empty_path(device):
    S, z, tails, k, v, path, num = commit_case(2, 2, 6, 3, 4, 4, 3, torch.float32, torch.float32, device)
    check_against_reference(S, z, [], k, v, path, num, tol=tolerance(torch.float32, 0.5))
    before = [t.clone() for t in S + z + tails]
    sla_tree_commit(S, z, tails, k, v, path, torch.zeros_like(num))
    assert all(torch.equal(a, b) for a, b in zip(S + z + tails, before))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("which", ["S", "z", "tails"])
def test_an_expanded_state_is_refused_and_left_untouched(device, which):
    """S, z and the conv tails are written in place through their strides: an expanded one
    (stride 0 over the batch) took every sequence's update on one shared row, from racing threads."""
    S, z, tails, k, v, path, num = commit_case(2, 3, 6, 2, 4, 3, 2, torch.float32, torch.float32, device)
    args = dict(S=S, z=z, tails=tails)
    args[which] = [args[which][0], args[which][1][:1].expand(args[which][1].shape)]
    before = [t.clone() for t in args["S"] + args["z"] + args["tails"]]
    with pytest.raises(RuntimeError, match="more than one element of the written-to tensor"):
        sla_tree_commit(args["S"], args["z"], args["tails"], k, v, path, num)
    assert all(torch.equal(a, b) for a, b in zip(args["S"] + args["z"] + args["tails"], before))


@pytest.mark.parametrize("device", DEVICES)
def test_commit_opcheck_and_compile(device):
    skip_on_emu(device, "opcheck and torch.compile trace the fake kernels, not an EmuTensor")
    S, z, tails, k, v, path, num = commit_case(2, 2, 6, 2, 4, 3, 2, torch.float32, torch.float32, device)
    torch.library.opcheck(torch.ops.leanformer.sla_tree_commit.default,
                          ([s.clone() for s in S], [x.clone() for x in z], [t.clone() for t in tails], k, v, path, num))
    want = sla_tree_commit_reference(S, z, tails, k, v, path, num)

    def step(S, z, tails, k, v, path, num):
        sla_tree_commit(S, z, tails, k, v, path, num)
        return S[0] * 1

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(S, z, tails, k, v, path, num), want[0][0])
    for got, ref in zip(S + z + tails, want[0] + want[1] + want[2]):
        torch.testing.assert_close(got, ref)


def test_commit_bad_inputs_name_the_argument_and_leave_the_state():
    S, z, tails, k, v, path, num = commit_case(2, 2, 6, 2, 4, 3, 2, torch.float32, torch.float32, "cpu")
    before = [t.clone() for t in S + z + tails]
    bad = [
        (dict(S=[]), "S must hold one state per layer"),
        (dict(z=z[:1]), "one tensor per layer"),
        (dict(tails=tails[:1]), "conv_tail must be empty or hold 2"),
        (dict(S=[S[0], S[1].half()]), r"S\[1\] must be float32 or float64"),
        (dict(z=[z[0], z[1][:, :, :3]]), r"z\[1\] must be \[B, H, Dk\]"),
        (dict(k=[k[0], k[1][..., :3]]), r"k\[1\] must be float \[B, T, H, Dk\]"),
        (dict(v=[v[0], v[1].double()]), r"v\[1\] must have k\[1\]'s dtype"),
        (dict(v=[v[0], v[1][:, :5]]), r"v\[1\] must be float \[B, T, H, Dv\]"),
        (dict(tails=[tails[0], tails[1][:3]]), r"conv_tail\[1\] must be float \[B\*H, Dv, W\]"),
        (dict(path=path.int()), "path must be int64"),
        (dict(num=num[:1]), r"num_accepted must be int64 \[B\]"),
        (dict(num=torch.full_like(num, 7)), r"num_accepted\[0\] = 7 must be in \[0, n = 6\]"),
        (dict(path=torch.full_like(path, 6), num=torch.ones_like(num)), r"path\[0, 0\] = 6 is not a node"),
    ]
    for change, msg in bad:
        args = dict(S=S, z=z, tails=tails, k=k, v=v, path=path, num=num) | change
        with pytest.raises(RuntimeError, match=msg):
            sla_tree_commit(args["S"], args["z"], args["tails"], args["k"], args["v"], args["path"], args["num"])
    assert all(torch.equal(a, b) for a, b in zip(S + z + tails, before))
