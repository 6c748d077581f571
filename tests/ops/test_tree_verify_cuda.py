"""The CUDA kernels of verify_tree_greedy, verify_tree_sampling and compact_kv_cache against the
CPU kernels on the same inputs: identical verification results for identical logits / uniforms,
in-place compaction of strided caches, and no host sync. On a GPU ("cuda") and on the CUDA
emulation ("emu", tests/helpers.py), every machine."""
import pytest
import torch

from leanformer.decoding import warp_probs
from leanformer.emu import EmuTensor
from leanformer.ops import compact_kv_cache, verify_tree_greedy, verify_tree_sampling
from tests.helpers import GPU_DEVICES, assert_fails_in_subprocess, drafted_tree, skip_on_emu

pytestmark = pytest.mark.parametrize("device", GPU_DEVICES)


def drafted(B, T, V, batched_parents, g):
    """A drafted tree with -1 padding and repeated sibling tokens."""
    return drafted_tree(B, T, V, batched_parents=batched_parents, pad_fraction=0.1, repeat_fraction=0.1,
                        generator=g)


def assert_same_verification(cuda_result, cpu_result):
    for name, a, b in zip(("accepted", "num_accepted", "bonus"), cuda_result, cpu_result):
        assert (a.device.type == "cuda" or isinstance(a, EmuTensor)) and a.dtype == torch.long
        assert torch.equal(a.cpu(), b), f"{name} differs: cuda {a.cpu()} cpu {b}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("T,V,batched_parents", [(1, 5, False), (13, 50_000, False),
                                                 (40, 257, True), (100, 33, True)])
def test_verify_tree_greedy_cuda_matches_cpu(dtype, T, V, batched_parents, device):
    g = torch.Generator().manual_seed(T + V)
    logits, tokens, parents = drafted(32, T, V, batched_parents, g)
    logits = logits.to(dtype)
    cpu_logits = logits if dtype != torch.float16 else logits.float()  # exact for fp16 values
    result = verify_tree_greedy(logits.to(device), tokens.to(device), parents.to(device))
    assert_same_verification(result, verify_tree_greedy(cpu_logits, tokens, parents))
    if T > 2:
        assert result[1].max() >= 3, "the drafted trees should give some long paths"


def test_verify_tree_greedy_cuda_ties_and_nan(device):
    """torch.argmax's ranking: ties go to the lowest token id, a NaN beats every number."""
    tokens = torch.tensor([[5, 3, 7], [5, 3, 7], [5, 3, 7]])
    parents = torch.tensor([-1, 0, 0])
    logits = torch.zeros(3, 3, 1000)
    logits[0, 0, [7, 900, 3]] = 2.0          # tie between 3, 7 and 900 -> 3 (node 1)
    logits[1, 0, 7], logits[1, 0, 999] = 1.0, float("nan")   # NaN at 999 wins: no child
    logits[2, 0, [500, 7]] = float("nan")    # the first NaN (7) wins: node 2
    cpu = verify_tree_greedy(logits, tokens, parents)
    assert cpu[2][1].item() == 999
    assert_same_verification(verify_tree_greedy(logits.to(device), tokens.to(device), parents.to(device)), cpu)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("T,V,batched_parents", [(1, 7, False), (13, 32_000, False), (40, 100, True)])
def test_verify_tree_sampling_cuda_matches_cpu(dtype, T, V, batched_parents, device):
    """Identical uniforms give identical accepted paths and bonus tokens on both backends."""
    g = torch.Generator().manual_seed(T * V)
    B = 256
    logits, tokens, parents = drafted(B, T, V, batched_parents, g)
    probs = warp_probs(logits / 2, temperature=0.8, top_k=min(V, 50), top_p=0.95).to(dtype)
    uniforms = torch.rand(B, T, generator=g)
    uniforms[:8] = 0.0                     # always accept the first child with p > 0
    uniforms[8:16] = 1.0 - 2.0 ** -24      # reject everything, bonus at the end of the CDF
    cpu = verify_tree_sampling_ops(probs, tokens, parents, uniforms)
    cuda = verify_tree_sampling_ops(probs.to(device), tokens.to(device), parents.to(device), uniforms.to(device))
    assert_same_verification(cuda, cpu)
    if T > 2:
        assert cpu[1].max() >= 2


def verify_tree_sampling_ops(probs, tokens, parents, uniforms):
    return torch.ops.leanformer.verify_tree_sampling(probs, tokens, parents, uniforms)


def test_verify_tree_sampling_cuda_wrapper_draws_on_the_generator(device):
    """The wrapper with a CUDA generator runs end to end and is reproducible."""
    skip_on_emu(device, "a CUDA generator")
    g = torch.Generator().manual_seed(3)
    logits, tokens, parents = drafted(8, 11, 64, False, g)
    args = (logits.to(device), tokens.to(device), parents.to(device))
    probs = warp_probs(args[0], temperature=0.7)
    runs = [verify_tree_sampling(probs, *args[1:], generator=torch.Generator(device).manual_seed(5)) for _ in range(2)]
    assert_same_verification(runs[0], tuple(t.cpu() for t in runs[1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64,
                                   torch.int8])
@pytest.mark.parametrize("layout", ["contiguous", "heads_major"])
def test_compact_kv_cache_cuda_matches_cpu(dtype, layout, device):
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
    k_gpu, v_gpu = as_layout(k.to(device)), as_layout(v.to(device))
    lens_gpu = cache_lens.to(device)
    k_ptr = k_gpu.data_ptr()
    compact_kv_cache(k_gpu, v_gpu, lens_gpu, accepted.to(device), num.to(device))
    assert k_gpu.data_ptr() == k_ptr, "compaction must be in place"
    assert torch.equal(k_gpu.cpu(), k_cpu) and torch.equal(v_gpu.cpu(), v_cpu)
    assert torch.equal(lens_gpu.cpu(), lens_cpu) and lens_cpu.tolist() == (cache_lens + num).tolist()


def test_cuda_ops_do_not_sync_the_host(device):
    """The verification results and cache_lens stay on the device: no op reads a value back."""
    skip_on_emu(device, "host syncs")
    g = torch.Generator().manual_seed(0)
    logits, tokens, parents = (t.to(device) for t in drafted(2, 9, 100, False, g))
    probs = logits.softmax(-1)
    uniforms = torch.rand(2, 9, device=device)
    cache_lens = torch.tensor([50, 100], device=device)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        verify_tree_greedy(logits, tokens, parents)
        accepted, num, _ = verify_tree_sampling_ops(probs, tokens, parents, uniforms)
        k = torch.zeros(2, 120, 2, 64, device=device)
        compact_kv_cache(k, k.clone(), cache_lens, accepted, num)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


BAD_ACCEPTED = """
import torch, leanformer
from leanformer.ops import compact_kv_cache
k = torch.randn(1, 10, 1, 4, device=device)
compact_kv_cache(k, k.clone(), torch.tensor([2], device=device),
                 torch.tensor([[0, 3, 1]], device=device), torch.tensor([3], device=device))
torch.cuda.synchronize()
"""


def test_bad_accepted_path_trips_a_device_side_assert(device):
    """On CUDA the value checks are device-side asserts (no read-back); the emulation raises
    them when the kernel has run."""
    if device == "emu":
        k = torch.randn(1, 10, 1, 4, device=device)
        with pytest.raises(RuntimeError, match="device-side assert triggered: .*accepted must ascend"):
            compact_kv_cache(k, k.clone(), torch.tensor([2], device=device), torch.tensor([[0, 3, 1]], device=device),
                             torch.tensor([3], device=device))
        return
    assert_fails_in_subprocess(BAD_ACCEPTED, "accepted must ascend")
