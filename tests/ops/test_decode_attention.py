"""decode_attention: one new token per sequence over a KV cache (RoPE, the cache write, the
attention) against the reference and against the model's unfused PyTorch steps; odd head counts
and head dims, lengths differing per sequence (0 included), strided qkv, every dtype, the cache
written in place and nothing else, value checks of lens, opcheck, compile."""
import pytest
import torch
import torch.nn.functional as F

from leanformer.models.llama import rope_tables
from leanformer.ops import decode_attention
from leanformer.reference import decode_attention_reference
from tests.helpers import DEVICES, assert_close, is_gpu, sequential_decode_steps, skip_on_emu

ALL_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def decode_case(B, H, Hkv, D, L, lens, dtype, device, strided=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = (H + 2 * Hkv) * D
    qkv = torch.randn(B, n + 7 if strided else n, generator=g)
    qkv = (qkv[:, 3:3 + n] if strided else qkv).to(device, dtype)  # a row stride beyond the width
    k_cache = torch.randn(B, L, Hkv, D, generator=g).to(device, dtype)
    v_cache = torch.randn(B, L, Hkv, D, generator=g).to(device, dtype)
    cos, sin = rope_tables(L + 5, D, 10000.0, "cpu")
    return qkv, k_cache, v_cache, torch.tensor(lens).to(device), cos.to(device), sin.to(device)


def check(case, H, dtype):
    qkv, k_cache, v_cache, lens, cos, sin = case
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    want = decode_attention_reference(qkv, k_ref, v_ref, lens, cos, sin, H)
    ptrs = (k_cache.data_ptr(), v_cache.data_ptr())
    got = decode_attention(qkv, k_cache, v_cache, lens, cos, sin, H)
    assert (k_cache.data_ptr(), v_cache.data_ptr()) == ptrs and got.dtype == dtype and got.is_contiguous()
    assert_close(got, want, dtype, "o", absolute=True)
    # the new rows hold the rotated k (rounded to the dtype) and v; every other row is untouched
    assert_close(k_cache, k_ref, dtype, "k_cache")
    assert torch.equal(v_cache, v_ref)
    return got


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("H,Hkv", [(9, 3), (4, 4), (8, 2)])
@pytest.mark.parametrize("D", [64, 34])
def test_matches_reference(device, dtype, H, Hkv, D):
    lens = {1: [300 - 1], 2: [0, 17], 3: [130, 0, 251]}
    for B in (1, 2, 3):
        check(decode_case(B, H, Hkv, D, 300, lens[B], dtype, device, seed=B), H, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strided_qkv_and_a_batch_of_one_slot(device, dtype):
    check(decode_case(3, 6, 2, 16, 40, [5, 39, 0], dtype, device, strided=True), 6, dtype)
    check(decode_case(2, 2, 1, 2, 1, [0, 0], dtype, device), 2, dtype)  # D = 2, one slot


@pytest.mark.parametrize("device", DEVICES)
def test_matches_the_unfused_steps(device):
    """The model's former step: RoPE by the tables, index_copy_ into the cache, then SDPA over the
    first max(lens) + 1 slots under an additive mask."""
    B, H, Hkv, D, L = 3, 9, 3, 64, 200
    qkv, k_cache, v_cache, lens, cos, sin = decode_case(B, H, Hkv, D, L, [120, 7, 199], torch.float32, "cpu")
    h = qkv.view(B, H + 2 * Hkv, D)
    qk = h[:, :H + Hkv]
    qk = qk * cos[lens][:, None] + torch.cat([qk[..., D // 2:], qk[..., :D // 2]], -1) * sin[lens][:, None]
    k_old, v_old = k_cache.clone(), v_cache.clone()
    k_old[torch.arange(B), lens] = qk[:, H:]
    v_old[torch.arange(B), lens] = h[:, H + Hkv:]
    Lk = int(lens.max()) + 1
    mask = torch.zeros(B, 1, 1, Lk).masked_fill_((torch.arange(Lk) > lens[:, None]).view(B, 1, 1, Lk), float("-inf"))
    want = F.scaled_dot_product_attention(qk[:, :H].unsqueeze(2), k_old[:, :Lk].transpose(1, 2),
                                          v_old[:, :Lk].transpose(1, 2), attn_mask=mask, enable_gqa=True)
    args = [t.to(device) for t in (qkv, k_cache, v_cache, lens, cos, sin)]
    got = decode_attention(*args, H)
    torch.testing.assert_close(got.cpu(), want.reshape(B, H * D), atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(args[1].cpu(), k_old, atol=1e-6, rtol=1e-6)
    assert torch.equal(args[2].cpu(), v_old)


@pytest.mark.parametrize("device", DEVICES)
def test_lens_beyond_the_cache_or_the_tables_are_refused(device):
    if is_gpu(device):
        pytest.skip("device-side asserts: checked on the CPU (a failing assert poisons a CUDA context)")
    qkv, k_cache, v_cache, lens, cos, sin = decode_case(2, 4, 2, 8, 10, [3, 9], torch.float32, device)
    before = (k_cache.clone(), v_cache.clone())
    for bad, msg in [([3, 10], r"lens\[1\] = 10 leaves no room"), ([-1, 0], r"lens\[0\] = -1"),
                     ([2, 9], r"lens\[1\] = 9 has no row in cos and sin")]:
        c, s = (cos[:9], sin[:9]) if "row" in msg else (cos, sin)
        with pytest.raises(RuntimeError, match=msg):
            decode_attention(qkv, k_cache, v_cache, torch.tensor(bad, device=device), c, s, 4)
    assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1])


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_and_compile(device):
    skip_on_emu(device, "opcheck and torch.compile trace the fake kernels, not an EmuTensor")
    qkv, k_cache, v_cache, lens, cos, sin = decode_case(2, 6, 2, 16, 24, [5, 11], torch.float32, device)
    torch.library.opcheck(torch.ops.leanformer.decode_attention.default,
                          (qkv, k_cache.clone(), v_cache.clone(), lens, cos, sin, 6))
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    want = decode_attention_reference(qkv, k_ref, v_ref, lens, cos, sin, 6)

    def step(qkv, k_cache, v_cache, lens, cos, sin):
        return decode_attention(qkv * 1, k_cache, v_cache, lens, cos, sin, 6) + 0

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(qkv, k_cache, v_cache, lens, cos, sin), want)
    torch.testing.assert_close(k_cache, k_ref)
    torch.testing.assert_close(v_cache, v_ref)


def test_bad_inputs_name_the_argument():
    qkv, k_cache, v_cache, lens, cos, sin = decode_case(2, 4, 2, 8, 10, [3, 9], torch.float32, "cpu")
    bad = [
        (dict(qkv=qkv.double()), "qkv must be float32, float16 or bfloat16"),
        (dict(qkv=qkv[:, :-8]), r"qkv must be \[B, \(H \+ 2 Hkv\) \* D\] = \[2, 64\]"),
        (dict(k_cache=k_cache.transpose(1, 2).contiguous().transpose(1, 2)), "k_cache must be contiguous"),
        (dict(v_cache=v_cache[:, :5]), r"v_cache must be \[B, L, Hkv, D\]"),
        (dict(v_cache=v_cache.bfloat16()), "v_cache must have the dtype of qkv"),
        (dict(lens=lens.int()), "lens must be int64"),
        (dict(lens=lens[:1]), r"lens must be int64 \[B\] = \[2\]"),
        (dict(cos=cos.double()), "cos must be float32"),
        (dict(sin=sin[:, :4]), r"sin must be float32 \[P, D\] = \[15, 8\]"),
        (dict(H=3), "num_heads = 3 must be a multiple of the key/value heads Hkv = 2"),
        (dict(H=0), "num_heads must be >= 1"),
    ]
    for change, msg in bad:
        a = dict(qkv=qkv, k_cache=k_cache, v_cache=v_cache, lens=lens, cos=cos, sin=sin, H=4) | change
        with pytest.raises(RuntimeError, match=msg):
            decode_attention(a["qkv"], a["k_cache"], a["v_cache"], a["lens"], a["cos"], a["sin"], a["H"])
    odd = decode_case(1, 2, 1, 3, 4, [0], torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="D = 3 .* must be even"):
        decode_attention(*odd, 2)


# ---- decode_attention_tree: a token tree's nodes, each bit for bit a decode_attention step ----

def tree_case(B, H, Hkv, D, L, parents, dtype, lens, g):
    P = L + 4
    angles = torch.rand(P, D // 2, generator=g) * 6
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([-angles.sin(), angles.sin()], -1)
    T = parents.shape[-1]
    kc, vc = (torch.randn(B, L, Hkv, D, generator=g).to(dtype) for _ in range(2))
    qkv = torch.randn(B, T, (H + 2 * Hkv) * D, generator=g).to(dtype)
    return qkv, kc, vc, torch.tensor(lens), cos, sin


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("parents", [[-1], [-1, 0, 0, 1, 1, 3, 2, 6], [-1, 0, 1, 2, 3]], ids=["root", "tree", "chain"])
def test_tree_nodes_equal_plain_steps_bit_for_bit(dtype, parents):
    from leanformer.ops import decode_attention_tree
    g = torch.Generator().manual_seed(len(parents))
    parents = torch.tensor(parents)
    H, Hkv, D, L = 6, 2, 40, 48  # D = 40: a partial vector of 16 lanes
    qkv, kc, vc, lens, cos, sin = tree_case(3, H, Hkv, D, L, parents, dtype, [0, 17, L - len(parents)], g)
    want, rows = sequential_decode_steps(qkv, kc, vc, lens, cos, sin, H, parents)
    out = decode_attention_tree(qkv, kc, vc, lens, cos, sin, H, parents)
    assert out.shape == (3, len(parents), H * D) and out.dtype == dtype
    assert torch.equal(out, want)
    for b, i, k, v in rows:  # node i's own rotated key and value at row lens[b] + i
        assert torch.equal(kc[b, lens[b] + i], k) and torch.equal(vc[b, lens[b] + i], v)


def test_tree_per_sequence_parents_strided_qkv_and_empty():
    from leanformer.ops import decode_attention_tree
    g = torch.Generator().manual_seed(0)
    parents = torch.tensor([[-1, 0, 0, 2], [-1, 0, 1, 1]])
    qkv, kc, vc, lens, cos, sin = tree_case(2, 4, 4, 16, 20, parents, torch.float32, [5, 9], g)
    wide = torch.cat([qkv, torch.randn_like(qkv)], -1)[..., :qkv.shape[-1]]  # rows strided, last dim contiguous
    want, _ = sequential_decode_steps(qkv, kc, vc, lens, cos, sin, 4, parents)
    assert torch.equal(decode_attention_tree(wide, kc, vc, lens, cos, sin, 4, parents), want)
    empty = decode_attention_tree(qkv[:, :0], kc, vc, lens, cos, sin, 4, parents[:, :0])
    assert empty.shape == (2, 0, 64)


def test_tree_refuses_bad_trees_and_lengths():
    from leanformer.ops import decode_attention_tree
    g = torch.Generator().manual_seed(0)
    parents = torch.tensor([-1, 0, 0])
    qkv, kc, vc, lens, cos, sin = tree_case(1, 2, 1, 8, 10, parents, torch.float32, [7], g)
    with pytest.raises(RuntimeError, match=r"parents\[0, 2\] = 2: must be in \[0, i\)"):
        decode_attention_tree(qkv, kc, vc, lens, cos, sin, 2, torch.tensor([-1, 0, 2]))
    with pytest.raises(RuntimeError, match=r"lens\[0\] = 8 leaves no room for the 3 tree nodes"):
        decode_attention_tree(qkv, kc, vc, torch.tensor([8]), cos, sin, 2, parents)
    with pytest.raises(RuntimeError, match=r"parents must be \[T\] = \[3\] or \[B, T\]"):
        decode_attention_tree(qkv, kc, vc, lens, cos, sin, 2, parents[:2])
    with pytest.raises(RuntimeError, match=r"qkv must be \[B, T, \(H \+ 2 Hkv\) \* D\]"):
        decode_attention_tree(qkv[0], kc, vc, lens, cos, sin, 2, parents)


def test_tree_opcheck_and_compile():
    from leanformer.ops import decode_attention_tree
    g = torch.Generator().manual_seed(0)
    parents = torch.tensor([-1, 0, 0, 1])
    qkv, kc, vc, lens, cos, sin = tree_case(2, 4, 2, 8, 16, parents, torch.float32, [3, 6], g)
    torch.library.opcheck(torch.ops.leanformer.decode_attention_tree.default, (qkv, kc, vc, lens, cos, sin, 4, parents))
    f = lambda qkv, kc, vc: decode_attention_tree(qkv, kc, vc, lens, cos, sin, 4, parents)  # noqa: E731
    k2, v2 = kc.clone(), vc.clone()
    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="aot_eager")(qkv, kc, vc), f(qkv, k2, v2),
                               rtol=0, atol=0)
