"""The CUDA kernels of tree_attention and tree_linear_attention against the CPU kernels and
the references on the same inputs: long prefixes split into several chunks, GQA, a batch with
different lengths, every head-dim path (64, 128 and the generic one), strided caches read in
place, and no host sync. On a GPU ("cuda") and on the CUDA emulation ("emu", tests/helpers.py),
every machine."""
import pytest
import torch

from leanformer.ops import tree_attention, tree_linear_attention
from leanformer.reference import ancestor_mask, tree_attention_reference, tree_linear_attention_reference
from tests.helpers import GPU_DEVICES, assert_fails_in_subprocess, random_parents, skip_on_emu, tolerance

pytestmark = pytest.mark.parametrize("device", GPU_DEVICES)

# Elementwise against the fp64 reference of the same (rounded) inputs; fp16 held to two units
# in the last place (half the shared tolerance).
SCALE = {torch.float16: 0.5}


def attention_inputs(B, T, Hq, Hkv, D, Dv, L_max, lens, dtype, batched_mask, g):
    randn = lambda *s: torch.randn(*s, generator=g).to(dtype)
    parents = random_parents(T, B if batched_mask else None, generator=g)
    return dict(q=randn(B, T, Hq, D), k_cache=randn(B, L_max, Hkv, D),
                v_cache=randn(B, L_max, Hkv, Dv), cache_lens=torch.tensor(lens),
                k_tree=randn(B, T, Hkv, D), v_tree=randn(B, T, Hkv, Dv),
                tree_mask=ancestor_mask(parents))


def on(device, inputs):
    return {k: v.to(device) for k, v in inputs.items()}


def assert_close_to_reference(out, inputs, dtype, scale=None):
    ref = tree_attention_reference(**{k: (v.double() if v.is_floating_point() else v)
                                      for k, v in inputs.items()}, scale=scale)
    tol = tolerance(dtype, SCALE)
    torch.testing.assert_close(out.cpu().double(), ref, atol=tol, rtol=tol)


ATTENTION_SHAPES = [
    # B, T, Hq, Hkv, D, Dv, L_max, lens
    (3, 13, 8, 2, 64, 64, 700, [0, 333, 700]),     # D = 64 path, an empty prefix, a full cache
    (2, 64, 8, 8, 128, 128, 300, [300, 41]),      # D = 128 path, R = 64 rows x Hkv blocks
    (2, 9, 6, 3, 80, 48, 130, [129, 2]),          # generic path, D != Dv
    (1, 5, 4, 1, 256, 256, 70, [64]),             # generic path at the largest head dims
    (2, 1, 2, 1, 20, 36, 33, [33, 1]),            # a single-node tree, odd head dims
]


@pytest.mark.parametrize("shape", ATTENTION_SHAPES, ids=lambda s: "B{}T{}Hq{}Hkv{}D{}Dv{}L{}".format(*s[:7]))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("batched_mask", [False, True])
def test_tree_attention_cuda_matches_cpu(shape, dtype, batched_mask, device):
    g = torch.Generator().manual_seed(sum(shape[:7]))
    inputs = attention_inputs(*shape, dtype, batched_mask, g)
    out = tree_attention(**on(device, inputs))
    assert out.shape == (*inputs["q"].shape[:3], inputs["v_cache"].shape[-1]) and out.dtype == dtype
    assert_close_to_reference(out, inputs, dtype)
    if dtype != torch.float16:  # fp16 is a CUDA-only dtype here
        tol = 2 * tolerance(dtype, SCALE)
        torch.testing.assert_close(out.cpu(), tree_attention(**inputs), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tree_attention_cuda_long_prefixes(dtype, device):
    """Prefixes of thousands of keys: many chunks per sequence, merged by LSE; a sequence with
    a short prefix leaves most of its chunks idle."""
    g = torch.Generator().manual_seed(0)
    inputs = attention_inputs(4, 64, 32, 8, 128, 128, 4096, [4096, 1, 2500, 4000], dtype, True, g)
    out = tree_attention(**on(device, inputs), scale=0.05)
    assert_close_to_reference(out, inputs, dtype, scale=0.05)


def test_tree_attention_cuda_strided_cache(device):
    """Caches that are views of a larger buffer ([B, Hkv, L, D] storage, and a slice of the
    slots) are read in place, not copied."""
    g = torch.Generator().manual_seed(1)
    inputs = attention_inputs(2, 7, 4, 2, 64, 64, 200, [150, 99], torch.float32, False, g)
    gpu = on(device, inputs)
    k_store = gpu["k_cache"].transpose(1, 2).contiguous()
    v_store = torch.cat([gpu["v_cache"], torch.randn_like(gpu["v_cache"])], dim=1)
    gpu["k_cache"], gpu["v_cache"] = k_store.transpose(1, 2), v_store[:, :200]
    assert not gpu["k_cache"].is_contiguous()
    assert_close_to_reference(tree_attention(**gpu), inputs, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("B,T,H,Dk,Dv,batched_mask", [(2, 13, 3, 64, 64, False),
                                                      (3, 40, 2, 17, 160, True),
                                                      (1, 1, 1, 8, 8, False)])
def test_tree_linear_attention_cuda_matches_cpu(dtype, B, T, H, Dk, Dv, batched_mask, device):
    g = torch.Generator().manual_seed(T)
    randn = lambda *s: torch.randn(*s, generator=g).to(dtype)
    state = torch.float64 if dtype == torch.float64 else torch.float32
    parents = random_parents(T, B if batched_mask else None, generator=g)
    inputs = dict(q=randn(B, T, H, Dk), k=randn(B, T, H, Dk), v=randn(B, T, H, Dv),
                  S=torch.rand(B, H, Dk, Dv, generator=g).to(state),
                  z=torch.rand(B, H, Dk, generator=g).to(state), tree_mask=ancestor_mask(parents))
    out = tree_linear_attention(**on(device, inputs))
    ref = tree_linear_attention_reference(**{k: v.double() if v.is_floating_point() else v
                                             for k, v in inputs.items()})
    tol = 4 * tolerance(dtype, SCALE)
    torch.testing.assert_close(out.cpu().double(), ref, atol=tol, rtol=tol)
    if dtype != torch.float16:
        torch.testing.assert_close(out.cpu(), tree_linear_attention(**inputs), atol=tol, rtol=tol)


def test_cuda_ops_do_not_sync_the_host(device):
    """cache_lens stays on the device: neither op reads a value back."""
    skip_on_emu(device, "host syncs")
    g = torch.Generator().manual_seed(0)
    att = on(device, attention_inputs(2, 9, 4, 2, 64, 64, 100, [50, 100], torch.bfloat16, False, g))
    lin = dict(q=att["q"], k=att["q"], v=att["q"], S=torch.rand(2, 4, 64, 64, device=device),
               z=torch.rand(2, 4, 64, device=device), tree_mask=att["tree_mask"])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        tree_attention(**att)
        tree_linear_attention(**lin)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


BAD_CACHE_LENS = """
import torch, leanformer
from leanformer.ops import tree_attention
q, kv = torch.randn(1, 2, 2, 8, device=device), torch.randn(1, 10, 1, 8, device=device)
tree_attention(q, kv, kv, torch.tensor([11], device=device), q[:, :, :1], q[:, :, :1],
               torch.ones(2, 2, dtype=torch.bool, device=device).tril())
torch.cuda.synchronize()
"""


def test_bad_cache_lens_trip_a_device_side_assert(device):
    """On CUDA the value checks are device-side asserts (no read-back); the emulation raises
    them when the kernel has run."""
    if device == "emu":
        q, kv = torch.randn(1, 2, 2, 8, device=device), torch.randn(1, 10, 1, 8, device=device)
        with pytest.raises(RuntimeError, match="device-side assert triggered: .*cache_lens must be in"):
            tree_attention(q, kv, kv, torch.tensor([11], device=device), q[:, :, :1], q[:, :, :1],
                           torch.ones(2, 2, dtype=torch.bool, device=device).tril())
        return
    assert_fails_in_subprocess(BAD_CACHE_LENS, "cache_lens must be in")
