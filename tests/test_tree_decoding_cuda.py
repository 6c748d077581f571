"""The CUDA kernels of the tree-decoding ops against the CPU kernels (and the references) on the
same inputs: long prefixes split into several chunks, GQA, a batch with different lengths,
every head-dim path (64, 128 and the generic one), identical verification results for
identical logits / uniforms, in-place compaction of strided caches, and no host sync.
CUDA only: skipped on a machine without a GPU."""
import pytest
import torch

from leanformer.ops import (compact_kv_cache, tree_attention, tree_linear_attention,
                            verify_tree_greedy, verify_tree_sampling, warp_probs)
from leanformer.reference import (ancestor_mask, tree_attention_reference,
                                  tree_linear_attention_reference)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# Tolerances of CUDA against the fp64 reference of the same (rounded) inputs.
TOL = {torch.float32: 2e-5, torch.float64: 1e-12, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def random_parents(T, B=None, g=None):
    """parents[i] uniform in [0, i): [T], or [B, T] when B is given."""
    shape = (T,) if B is None else (B, T)
    parents = (torch.rand(shape, generator=g) * torch.arange(T)).long()
    parents[..., 0] = -1
    return parents


def attention_inputs(B, T, Hq, Hkv, D, Dv, L_max, lens, dtype, batched_mask, g):
    randn = lambda *s: torch.randn(*s, generator=g).to(dtype)
    parents = random_parents(T, B if batched_mask else None, g)
    return dict(q=randn(B, T, Hq, D), k_cache=randn(B, L_max, Hkv, D),
                v_cache=randn(B, L_max, Hkv, Dv), cache_lens=torch.tensor(lens),
                k_tree=randn(B, T, Hkv, D), v_tree=randn(B, T, Hkv, Dv),
                tree_mask=ancestor_mask(parents))


def on(device, inputs):
    return {k: v.to(device) for k, v in inputs.items()}


def assert_close_to_reference(out, inputs, dtype, scale=None):
    ref = tree_attention_reference(**{k: (v.double() if v.is_floating_point() else v)
                                      for k, v in inputs.items()}, scale=scale)
    torch.testing.assert_close(out.cpu().double(), ref, atol=TOL[dtype], rtol=TOL[dtype])


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
def test_tree_attention_cuda_matches_cpu(shape, dtype, batched_mask):
    g = torch.Generator().manual_seed(sum(shape[:7]))
    inputs = attention_inputs(*shape, dtype, batched_mask, g)
    out = tree_attention(**on("cuda", inputs))
    assert out.shape == (*inputs["q"].shape[:3], inputs["v_cache"].shape[-1]) and out.dtype == dtype
    assert_close_to_reference(out, inputs, dtype)
    if dtype != torch.float16:  # fp16 is a CUDA-only dtype here
        torch.testing.assert_close(out.cpu(), tree_attention(**inputs), atol=2 * TOL[dtype],
                                   rtol=2 * TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tree_attention_cuda_long_prefixes(dtype):
    """Prefixes of thousands of keys: many chunks per sequence, merged by LSE; a sequence with
    a short prefix leaves most of its chunks idle."""
    g = torch.Generator().manual_seed(0)
    inputs = attention_inputs(4, 64, 32, 8, 128, 128, 4096, [4096, 1, 2500, 4000], dtype, True, g)
    out = tree_attention(**on("cuda", inputs), scale=0.05)
    assert_close_to_reference(out, inputs, dtype, scale=0.05)


def test_tree_attention_cuda_strided_cache():
    """Caches that are views of a larger buffer ([B, Hkv, L, D] storage, and a slice of the
    slots) are read in place, not copied."""
    g = torch.Generator().manual_seed(1)
    inputs = attention_inputs(2, 7, 4, 2, 64, 64, 200, [150, 99], torch.float32, False, g)
    cuda = on("cuda", inputs)
    k_store = cuda["k_cache"].transpose(1, 2).contiguous()
    v_store = torch.cat([cuda["v_cache"], torch.randn_like(cuda["v_cache"])], dim=1)
    cuda["k_cache"], cuda["v_cache"] = k_store.transpose(1, 2), v_store[:, :200]
    assert not cuda["k_cache"].is_contiguous()
    assert_close_to_reference(tree_attention(**cuda), inputs, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("B,T,H,Dk,Dv,batched_mask", [(2, 13, 3, 64, 64, False),
                                                      (3, 40, 2, 17, 160, True),
                                                      (1, 1, 1, 8, 8, False)])
def test_tree_linear_attention_cuda_matches_cpu(dtype, B, T, H, Dk, Dv, batched_mask):
    g = torch.Generator().manual_seed(T)
    randn = lambda *s: torch.randn(*s, generator=g).to(dtype)
    state = torch.float64 if dtype == torch.float64 else torch.float32
    parents = random_parents(T, B if batched_mask else None, g)
    inputs = dict(q=randn(B, T, H, Dk), k=randn(B, T, H, Dk), v=randn(B, T, H, Dv),
                  S=torch.rand(B, H, Dk, Dv, generator=g).to(state),
                  z=torch.rand(B, H, Dk, generator=g).to(state), tree_mask=ancestor_mask(parents))
    out = tree_linear_attention(**on("cuda", inputs))
    ref = tree_linear_attention_reference(**{k: v.double() if v.is_floating_point() else v
                                             for k, v in inputs.items()})
    tol = 4 * TOL[dtype]
    torch.testing.assert_close(out.cpu().double(), ref, atol=tol, rtol=tol)
    if dtype != torch.float16:
        torch.testing.assert_close(out.cpu(), tree_linear_attention(**inputs), atol=tol, rtol=tol)


def drafted_tree(B, T, V, batched_parents, g):
    """Random trees whose tokens often are the parent's argmax (deep greedy paths), with -1
    padding and repeated sibling tokens."""
    parents = random_parents(T, B if batched_parents else None, g)
    par = parents.expand(B, T)
    tokens = torch.randint(0, V, (B, T), generator=g)
    tokens[:, 1:][torch.rand(B, T - 1, generator=g) < 0.1] = -1
    dup = torch.rand(B, T, generator=g) < 0.1  # copy the token of the previous sibling candidate
    tokens[:, 2:] = torch.where(dup[:, 2:] & (par[:, 2:] == par[:, 1:-1]), tokens[:, 1:-1], tokens[:, 2:])
    logits = torch.randn(B, T, V, generator=g)
    for i in range(1, T):
        hit = (torch.rand(B, generator=g) < 0.6) & (tokens[:, i] >= 0)
        rows = logits[hit, par[hit, i]]
        logits[hit, par[hit, i]] = rows.scatter(-1, tokens[hit, i, None], 10.0)
    return logits, tokens, parents


def assert_same_verification(cuda_result, cpu_result):
    for name, a, b in zip(("accepted", "num_accepted", "bonus"), cuda_result, cpu_result):
        assert a.device.type == "cuda" and a.dtype == torch.long
        assert torch.equal(a.cpu(), b), f"{name} differs: cuda {a.cpu()} cpu {b}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("T,V,batched_parents", [(1, 5, False), (13, 50_000, False),
                                                 (40, 257, True), (100, 33, True)])
def test_verify_tree_greedy_cuda_matches_cpu(dtype, T, V, batched_parents):
    g = torch.Generator().manual_seed(T + V)
    logits, tokens, parents = drafted_tree(32, T, V, batched_parents, g)
    logits = logits.to(dtype)
    cpu_logits = logits if dtype != torch.float16 else logits.float()  # exact for fp16 values
    result = verify_tree_greedy(logits.cuda(), tokens.cuda(), parents.cuda())
    assert_same_verification(result, verify_tree_greedy(cpu_logits, tokens, parents))
    if T > 2:
        assert result[1].max() >= 3, "the drafted trees should give some long paths"


def test_verify_tree_greedy_cuda_ties_and_nan():
    """torch.argmax's ranking: ties go to the lowest token id, a NaN beats every number."""
    tokens = torch.tensor([[5, 3, 7], [5, 3, 7], [5, 3, 7]])
    parents = torch.tensor([-1, 0, 0])
    logits = torch.zeros(3, 3, 1000)
    logits[0, 0, [7, 900, 3]] = 2.0          # tie between 3, 7 and 900 -> 3 (node 1)
    logits[1, 0, 7], logits[1, 0, 999] = 1.0, float("nan")   # NaN at 999 wins: no child
    logits[2, 0, [500, 7]] = float("nan")    # the first NaN (7) wins: node 2
    cpu = verify_tree_greedy(logits, tokens, parents)
    assert cpu[2][1].item() == 999
    assert_same_verification(verify_tree_greedy(logits.cuda(), tokens.cuda(), parents.cuda()), cpu)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("T,V,batched_parents", [(1, 7, False), (13, 32_000, False), (40, 100, True)])
def test_verify_tree_sampling_cuda_matches_cpu(dtype, T, V, batched_parents):
    """Identical uniforms give identical accepted paths and bonus tokens on both backends."""
    g = torch.Generator().manual_seed(T * V)
    B = 256
    logits, tokens, parents = drafted_tree(B, T, V, batched_parents, g)
    probs = warp_probs(logits / 2, temperature=0.8, top_k=min(V, 50), top_p=0.95).to(dtype)
    uniforms = torch.rand(B, T, generator=g)
    uniforms[:8] = 0.0                     # always accept the first child with p > 0
    uniforms[8:16] = 1.0 - 2.0 ** -24      # reject everything, bonus at the end of the CDF
    cpu = verify_tree_sampling_ops(probs, tokens, parents, uniforms)
    cuda = verify_tree_sampling_ops(probs.cuda(), tokens.cuda(), parents.cuda(), uniforms.cuda())
    assert_same_verification(cuda, cpu)
    if T > 2:
        assert cpu[1].max() >= 2


def verify_tree_sampling_ops(probs, tokens, parents, uniforms):
    return torch.ops.leanformer.verify_tree_sampling(probs, tokens, parents, uniforms)


def test_verify_tree_sampling_cuda_wrapper_draws_on_the_generator():
    """The wrapper with a CUDA generator runs end to end and is reproducible."""
    g = torch.Generator().manual_seed(3)
    logits, tokens, parents = drafted_tree(8, 11, 64, False, g)
    args = (logits.cuda(), tokens.cuda(), parents.cuda())
    runs = [verify_tree_sampling(*args, generator=torch.Generator("cuda").manual_seed(5),
                                 temperature=0.7) for _ in range(2)]
    assert_same_verification(runs[0], tuple(t.cpu() for t in runs[1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64,
                                   torch.int8])
@pytest.mark.parametrize("layout", ["contiguous", "heads_major"])
def test_compact_kv_cache_cuda_matches_cpu(dtype, layout):
    g = torch.Generator().manual_seed(7)
    B, L_max, H, D, Dv, T = 5, 90, 3, 40, 24, 17
    k = (torch.randn(B, L_max, H, D, generator=g) * 50).to(dtype)
    v = (torch.randn(B, L_max, H, Dv, generator=g) * 50).to(dtype)
    cache_lens = torch.tensor([0, 10, 73, 40, 2])
    accepted = torch.full((B, T), -1)
    num = torch.tensor([1, 4, T, 6, 3])
    for b in range(B):   # ascending paths from the root, some nodes already in place
        path = torch.cat([torch.zeros(1, dtype=torch.long),
                          torch.randperm(T - 1, generator=g)[: num[b] - 1].sort().values + 1])
        accepted[b, : num[b]] = path
    accepted[4, :3] = torch.tensor([0, 1, 2])

    def as_layout(t):
        return t.transpose(1, 2).contiguous().transpose(1, 2) if layout == "heads_major" else t.clone()

    k_cpu, v_cpu, lens_cpu = k.clone(), v.clone(), cache_lens.clone()
    compact_kv_cache(k_cpu, v_cpu, lens_cpu, accepted, num)
    k_gpu, v_gpu = as_layout(k.cuda()), as_layout(v.cuda())
    lens_gpu = cache_lens.cuda()
    k_ptr = k_gpu.data_ptr()
    compact_kv_cache(k_gpu, v_gpu, lens_gpu, accepted.cuda(), num.cuda())
    assert k_gpu.data_ptr() == k_ptr, "compaction must be in place"
    assert torch.equal(k_gpu.cpu(), k_cpu) and torch.equal(v_gpu.cpu(), v_cpu)
    assert torch.equal(lens_gpu.cpu(), lens_cpu) and lens_cpu.tolist() == (cache_lens + num).tolist()


def test_cuda_ops_do_not_sync_the_host():
    """cache_lens and the verification results stay on the device: no op reads a value back."""
    g = torch.Generator().manual_seed(0)
    att = on("cuda", attention_inputs(2, 9, 4, 2, 64, 64, 100, [50, 100], torch.bfloat16, False, g))
    logits, tokens, parents = (t.cuda() for t in drafted_tree(2, 9, 100, False, g))
    probs = logits.softmax(-1)
    uniforms = torch.rand(2, 9, device="cuda")
    lin = dict(q=att["q"], k=att["q"], v=att["q"], S=torch.rand(2, 4, 64, 64, device="cuda"),
               z=torch.rand(2, 4, 64, device="cuda"), tree_mask=att["tree_mask"])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        tree_attention(**att)
        tree_linear_attention(**lin)
        verify_tree_greedy(logits, tokens, parents)
        accepted, num, _ = verify_tree_sampling_ops(probs, tokens, parents, uniforms)
        k = torch.zeros(2, 120, 2, 64, device="cuda")
        compact_kv_cache(k, k.clone(), att["cache_lens"].clone(), accepted, num)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


BAD_VALUE_SCRIPT = """
import sys, torch, leanformer
from leanformer.ops import compact_kv_cache, tree_attention
case = sys.argv[1]
if case == "cache_lens":
    q, kv = torch.randn(1, 2, 2, 8, device="cuda"), torch.randn(1, 10, 1, 8, device="cuda")
    tree_attention(q, kv, kv, torch.tensor([11], device="cuda"), q[:, :, :1], q[:, :, :1],
                   torch.ones(2, 2, dtype=torch.bool, device="cuda").tril())
else:
    k = torch.randn(1, 10, 1, 4, device="cuda")
    compact_kv_cache(k, k.clone(), torch.tensor([2], device="cuda"),
                     torch.tensor([[0, 3, 1]], device="cuda"), torch.tensor([3], device="cuda"))
torch.cuda.synchronize()
"""


@pytest.mark.parametrize("case,message", [("cache_lens", "cache_lens must be in"),
                                          ("accepted", "accepted must ascend")])
def test_bad_values_trip_a_device_side_assert(case, message):
    """On CUDA the value checks are device-side asserts (no read-back). An assert poisons the
    CUDA context, so this runs in a subprocess and looks for the message."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    run = subprocess.run([sys.executable, "-c", BAD_VALUE_SCRIPT, case], capture_output=True,
                         text=True, timeout=300, env=env)
    assert run.returncode != 0, "a bad value must not pass silently"
    assert message in run.stdout + run.stderr
