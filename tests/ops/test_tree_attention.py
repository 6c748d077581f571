"""tree_attention and tree_linear_attention against the dense references, SDPA with an explicit
mask over [prefix + tree], and the causal linear-attention op on a chain."""
import pytest
import torch
import torch.nn.functional as F

from leanformer.ops import simplified_linear_attention, tree_attention, tree_linear_attention
from leanformer.reference import tree_attention_reference, tree_linear_attention_reference
from tests.helpers import DEVICES, assert_close, device_dtypes, random_tree, skip_on_emu

CASES = device_dtypes(fp64=True)


def make_attention_inputs(B, L_max, lens, T, Hq, Hkv, D, Dv, dtype, device, batched_mask=False):
    q = torch.randn(B, T, Hq, D, device=device).to(dtype)
    k_cache = torch.randn(B, L_max, Hkv, D, device=device).to(dtype)
    v_cache = torch.randn(B, L_max, Hkv, Dv, device=device).to(dtype)
    k_tree = torch.randn(B, T, Hkv, D, device=device).to(dtype)
    v_tree = torch.randn(B, T, Hkv, Dv, device=device).to(dtype)
    _, mask = random_tree(T, B if batched_mask else None, device)
    cache_lens = torch.tensor(lens, dtype=torch.long, device=device)
    return q, k_cache, v_cache, cache_lens, k_tree, v_tree, mask


# (B, L_max, cache_lens, T, Hq, Hkv, D, Dv): lengths 0 and L_max, key-chunk boundaries (64, 128),
# a single node, GQA, Dk != Dv, odd head dims, trees longer than a key chunk, and a long prefix
# and a long tree (many chunks, whatever the chunk size).
SHAPES = [
    (3, 70, [0, 70, 33], 7, 6, 2, 16, 24),
    (2, 130, [129, 64], 1, 4, 4, 13, 7),
    (1, 260, [260], 130, 4, 2, 32, 32),  # 260 query columns: two node blocks
    (2, 9, [5, 0], 5, 3, 1, 8, 5),
    (1, 1100, [1100], 3, 2, 1, 8, 8),
    (1, 40, [37], 600, 8, 2, 8, 8),  # 2400 query columns: ten node blocks
]


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("batched_mask", [False, True])
def test_tree_attention_matches_reference(device, dtype, shape, batched_mask):
    args = make_attention_inputs(*shape, dtype, device, batched_mask)
    # The outputs are weighted averages of N(0, 1) values: the error is held to the tolerance
    # itself, not relative to the largest output.
    for scale in (None, 0.3):
        out = tree_attention(*args, scale=scale)
        assert out.dtype == dtype
        assert_close(out, tree_attention_reference(*args, scale=scale), dtype, f"{shape} scale={scale}",
                     absolute=True)


@pytest.mark.parametrize("device", DEVICES)
def test_tree_attention_equals_sdpa_over_prefix_and_tree(device):
    """Per sequence: SDPA over [cache[:L] + tree] with the explicit mask (prefix all true)."""
    B, L_max, lens, T, Hq, Hkv, D, Dv = 3, 80, [0, 80, 41], 9, 8, 2, 16, 16
    q, kc, vc, cl, kt, vt, mask = make_attention_inputs(B, L_max, lens, T, Hq, Hkv, D, Dv, torch.float32,
                                                        device, batched_mask=True)
    out = tree_attention(q, kc, vc, cl, kt, vt, mask)
    for b, L in enumerate(lens):
        keys = torch.cat([kc[b, :L], kt[b]]).transpose(0, 1)
        values = torch.cat([vc[b, :L], vt[b]]).transpose(0, 1)
        allowed = torch.cat([torch.ones(T, L, dtype=torch.bool, device=device), mask[b]], dim=1)
        ref = F.scaled_dot_product_attention(q[b].transpose(0, 1), keys, values, attn_mask=allowed,
                                             enable_gqa=True).transpose(0, 1)
        torch.testing.assert_close(out[b], ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_tree_attention_takes_strided_views(device):
    args = list(make_attention_inputs(2, 50, [50, 17], 6, 4, 2, 16, 8, torch.float32, device))
    expected = tree_attention_reference(*args)
    big = torch.randn(2, 60, 3, 16, device=device)
    big[:, :50, 1:] = args[1]
    args[1] = big[:, :50, 1:]                                         # a slice of a larger cache
    args[0] = args[0].transpose(1, 2).contiguous().transpose(1, 2)    # heads outer in memory
    args[4] = args[4][..., None].expand(*args[4].shape, 2)[..., 0]    # last dim not contiguous
    torch.testing.assert_close(tree_attention(*args), expected, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_tree_attention_opcheck_and_compile(device):
    skip_on_emu(device, "opcheck and torch.compile trace the fake kernels, not an EmuTensor")
    args = make_attention_inputs(2, 40, [40, 3], 5, 4, 2, 8, 8, torch.float32, device)
    torch.library.opcheck(torch.ops.leanformer.tree_attention.default, (*args, None))
    torch.library.opcheck(torch.ops.leanformer.tree_attention.default, (*args, 0.5))
    compiled = torch.compile(lambda *a: tree_attention(*a) * 2, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*args), tree_attention(*args) * 2)


@pytest.mark.parametrize("device", DEVICES)
def test_tree_attention_gradcheck_fp64(device):
    """q, both caches and the tree's K/V get gradients; GQA, a short and an empty prefix."""
    args = list(make_attention_inputs(2, 6, [6, 0], 4, 4, 2, 3, 5, torch.float64, device))
    for i in (0, 1, 2, 4, 5):
        args[i].requires_grad_(True)
    torch.autograd.gradcheck(lambda q, kc, vc, kt, vt: tree_attention(q, kc, vc, args[3], kt, vt, args[6]),
                             [args[i] for i in (0, 1, 2, 4, 5)])
    torch.library.opcheck(torch.ops.leanformer.tree_attention.default, (*args, None),
                          test_utils=("test_autograd_registration",))


@pytest.mark.parametrize("device", DEVICES)
def test_tree_linear_attention_gradcheck_fp64(device):
    q, k, v = (torch.randn(2, 4, 2, 3, dtype=torch.float64, device=device, requires_grad=True) for _ in range(3))
    S = torch.rand(2, 2, 3, 3, dtype=torch.float64, device=device, requires_grad=True)
    z = torch.rand(2, 2, 3, dtype=torch.float64, device=device, requires_grad=True)
    _, mask = random_tree(4, 2, device)
    torch.autograd.gradcheck(lambda *a: tree_linear_attention(*a, mask), [q, k, v, S, z])
    # only some inputs need a gradient: the others get none
    out = tree_linear_attention(q.detach(), k, v.detach(), S.detach(), z.detach(), mask)
    (gk,) = torch.autograd.grad(out.sum(), [k])
    assert gk.shape == k.shape


@pytest.mark.parametrize("device", DEVICES)
def test_tree_attention_bad_inputs_name_the_argument(device):
    q, kc, vc, cl, kt, vt, mask = make_attention_inputs(2, 10, [4, 10], 3, 6, 2, 8, 8, torch.float32, device)
    cases = [
        ((q[:, :, :5], kc, vc, cl, kt, vt, mask), "multiple of the key/value heads"),
        ((q, kc, vc, cl.int(), kt, vt, mask), "cache_lens must be int64"),
        ((q, kc, vc, cl[:1], kt, vt, mask), r"cache_lens must be \[B\]"),
        ((q, kc, vc, cl, kt, vt, mask[:2, :2]), r"tree_mask must be \[T, T\]"),
        ((q, kc, vc, cl, kt, vt, mask.expand(3, 3, 3)), r"tree_mask must be \[T, T\]"),
        ((q, kc, vc, cl, kt, vt, mask.float()), "tree_mask must be bool"),
        ((q, kc.double(), vc, cl, kt, vt, mask), "k_cache must have the dtype of q"),
        ((q, kc, vc[:, :9], cl, kt, vt, mask), "v_cache must be"),
        ((q, kc, vc, cl, kt[:, :2], vt, mask), "k_tree must be"),
        ((q, kc, vc, cl, kt, vt[..., :4].contiguous()[:, :, :1], mask), "v_tree must be"),
        ((q, kc[..., :4], vc, cl, kt, vt, mask), "k_cache must be"),
        ((q[0], kc, vc, cl, kt, vt, mask), "q must be"),
        ((q.long(), kc, vc, cl, kt, vt, mask), "q must be float32"),
    ]
    if device == "cpu":  # value checks; CUDA reads no values back (device-side asserts instead)
        cases += [
            ((q, kc, vc, torch.tensor([4, 11]), kt, vt, mask), r"cache_lens\[1\] = 11 is beyond"),
            ((q, kc, vc, torch.tensor([-1, 0]), kt, vt, mask), r"cache_lens\[0\] = -1"),
            ((q, kc, vc, cl, kt, vt, mask & ~torch.eye(3, dtype=torch.bool)), r"tree_mask\[0, 0, 0\] must be true"),
        ]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=message):
            tree_attention(*args)


# ---- tree_linear_attention ----

def make_linear_inputs(B, T, H, Dk, Dv, dtype, device, batched_mask=False):
    q, k = (torch.randn(B, T, H, Dk, device=device).to(dtype) for _ in range(2))
    v = torch.randn(B, T, H, Dv, device=device).to(dtype)
    sd = torch.float64 if dtype == torch.float64 else torch.float32
    S = torch.rand(B, H, Dk, Dv, device=device, dtype=sd) * 3
    z = torch.rand(B, H, Dk, device=device, dtype=sd) * 5
    _, mask = random_tree(T, B if batched_mask else None, device)
    return q, k, v, S, z, mask


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("shape", [(2, 7, 3, 16, 24), (1, 1, 2, 5, 3), (3, 70, 2, 32, 32), (2, 9, 1, 13, 7), (1, 130, 1, 8, 8)])
@pytest.mark.parametrize("batched_mask", [False, True])
def test_tree_linear_attention_matches_reference(device, dtype, shape, batched_mask):
    args = make_linear_inputs(*shape, dtype, device, batched_mask)
    out = tree_linear_attention(*args)
    assert out.dtype == dtype
    # outputs are O(1): the error itself is held, to 4 TOL (bf16 rounds at 2^-8), fp64 to TOL
    assert_close(out, tree_linear_attention_reference(*args), dtype, str(shape),
                 scale=1.0 if dtype == torch.float64 else 4.0, absolute=True)


@pytest.mark.parametrize("device", DEVICES)
def test_tree_linear_attention_on_a_chain_is_causal_linear_attention(device):
    """A chain tree (parents[i] = i - 1) is a causal continuation of the prefix state."""
    B, P, T, H, Dk, Dv = 2, 30, 9, 3, 16, 8
    q, k, v = (torch.randn(B, P + T, H, d, device=device) for d in (Dk, Dk, Dv))
    full = simplified_linear_attention(q, k, v, causal=True)
    _, (S, z) = simplified_linear_attention(q[:, :P], k[:, :P], v[:, :P], causal=True, output_final_state=True)
    chain = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    out = tree_linear_attention(q[:, P:], k[:, P:], v[:, P:], S, z, chain)
    torch.testing.assert_close(out, full[:, P:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_tree_linear_attention_opcheck_and_compile(device):
    skip_on_emu(device, "opcheck and torch.compile trace the fake kernels, not an EmuTensor")
    args = make_linear_inputs(2, 6, 2, 8, 4, torch.float32, device)
    torch.library.opcheck(torch.ops.leanformer.tree_linear_attention.default, (*args, 1e-6))
    compiled = torch.compile(lambda *a: tree_linear_attention(*a) + 1, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*args), tree_linear_attention(*args) + 1)


@pytest.mark.parametrize("device", DEVICES)
def test_tree_linear_attention_bad_inputs_name_the_argument(device):
    q, k, v, S, z, mask = make_linear_inputs(2, 4, 3, 8, 6, torch.float32, device)
    cases = [
        ((q, k[:, :3], v, S, z, mask), "k must be"),
        ((q, k, v[..., :2, :], S, z, mask), "v must be"),
        ((q, k, v, S[..., :5], z, mask), r"S must have shape \[B, H, Dk, Dv\]"),
        ((q, k, v, S, z[:1], mask), r"z must have shape \[B, H, Dk\]"),
        ((q, k, v, S.bfloat16(), z, mask), "S must be Float"),
        ((q, k, v, S, z, mask[:3, :3]), "tree_mask must be"),
        ((q, k.bfloat16(), v, S, z, mask), "k must have the dtype of q"),
    ]
    if device == "cpu":  # a value check; CUDA reads no values back
        cases.append(((q, k, v, S, z, ~mask), r"tree_mask\[0, 0, 0\] must be true"))
    for args, message in cases:
        with pytest.raises(RuntimeError, match=message):
            tree_linear_attention(*args)
