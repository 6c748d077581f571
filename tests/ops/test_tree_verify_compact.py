"""compact_kv_cache: in place, per sequence, equal to the cache that plain decoding of the
accepted tokens alone would have built."""
import pytest
import torch

from leanformer.ops import compact_kv_cache, verify_tree_greedy
from leanformer.reference import compact_kv_cache_reference
from tests.helpers import DEVICES, device_dtypes, drafted_tree, skip_on_emu

CASES = device_dtypes(fp64=True)


def tree_step(B, L_max, lens, T, H, D, Dv, dtype, device, seed=0):
    """A cache with each sequence's tree K/V appended at cache_lens[b] + i, and a greedy
    verification of a drafted tree (so the accepted paths are real ones, of varied length)."""
    g = torch.Generator().manual_seed(seed)
    k_cache = torch.randn(B, L_max, H, D, generator=g).to(device, dtype)
    v_cache = torch.randn(B, L_max, H, Dv, generator=g).to(device, dtype)
    k_tree = torch.randn(B, T, H, D, generator=g).to(device, dtype)
    v_tree = torch.randn(B, T, H, Dv, generator=g).to(device, dtype)
    for b, L in enumerate(lens):
        k_cache[b, L:L + T], v_cache[b, L:L + T] = k_tree[b], v_tree[b]
    logits, tokens, parents = drafted_tree(B, T, 7, device, True, generator=g)
    accepted, num, _ = verify_tree_greedy(logits, tokens, parents)
    cache_lens = torch.tensor(lens, device=device)
    return k_cache, v_cache, cache_lens, k_tree, v_tree, accepted, num


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("T", [1, 6, 30])
def test_compaction_equals_the_cache_of_the_accepted_nodes(device, dtype, T):
    lens = [0, 17, 50 - T, 5]  # the third tree ends at L_max
    k_cache, v_cache, cache_lens, k_tree, v_tree, accepted, num = tree_step(4, 50, lens, T, 3, 8, 5, dtype, device)
    if T > 1:
        assert num.max() > 1 and (accepted != torch.arange(T, device=device)).any(), "paths should skip nodes"
    ref = compact_kv_cache_reference(k_cache, v_cache, cache_lens, accepted, num)
    prefix_k, prefix_v = k_cache.clone(), v_cache.clone()
    k_ptr, v_ptr = k_cache.data_ptr(), v_cache.data_ptr()
    compact_kv_cache(k_cache, v_cache, cache_lens, accepted, num)
    assert k_cache.data_ptr() == k_ptr and v_cache.data_ptr() == v_ptr
    assert cache_lens.tolist() == [L + n for L, n in zip(lens, num.tolist())]
    torch.testing.assert_close(cache_lens, ref[2])
    for b, L in enumerate(lens):
        n = int(num[b])
        path = accepted[b, :n]
        # What plain decoding would have written: the prefix, then the accepted nodes in order.
        torch.testing.assert_close(k_cache[b, :L + n], torch.cat([prefix_k[b, :L], k_tree[b, path]]), rtol=0, atol=0)
        torch.testing.assert_close(v_cache[b, :L + n], torch.cat([prefix_v[b, :L], v_tree[b, path]]), rtol=0, atol=0)
        torch.testing.assert_close(k_cache[b, :L + n], ref[0][b, :L + n], rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_compaction_of_strided_caches(device):
    """Heads outer in memory (a slot is not one contiguous block) and a cache that is a slice."""
    lens = [3, 0]
    k_cache, v_cache, cache_lens, k_tree, v_tree, accepted, num = tree_step(2, 20, lens, 8, 2, 4, 4, torch.float32,
                                                                            device, seed=3)
    k_expected, v_expected, lens_expected = compact_kv_cache_reference(k_cache, v_cache, cache_lens, accepted, num)
    k_strided = k_cache.transpose(1, 2).contiguous().transpose(1, 2)
    v_big = torch.zeros(2, 20, 2, 9, device=device)
    v_big[..., 2:6] = v_cache
    v_strided = v_big[..., 2:6]
    compact_kv_cache(k_strided, v_strided, cache_lens, accepted, num)
    for b, L in enumerate(lens):
        end = L + int(num[b])
        torch.testing.assert_close(k_strided[b, :end], k_expected[b, :end], rtol=0, atol=0)
        torch.testing.assert_close(v_strided[b, :end], v_expected[b, :end], rtol=0, atol=0)
    assert torch.equal(cache_lens, lens_expected)


@pytest.mark.parametrize("device", DEVICES)
def test_compaction_opcheck_and_compile(device):
    skip_on_emu(device, "opcheck and torch.compile test the fake kernels")
    k_cache, v_cache, cache_lens, _, _, accepted, num = tree_step(3, 30, [0, 4, 20], 7, 2, 4, 6, torch.float32, device)
    torch.library.opcheck(torch.ops.leanformer.compact_kv_cache.default,
                          (k_cache.clone(), v_cache.clone(), cache_lens.clone(), accepted, num))
    expected = [t.clone() for t in (k_cache, v_cache, cache_lens)]
    compact_kv_cache(*expected, accepted, num)

    def step(k, v, lens, acc, n):
        compact_kv_cache(k, v, lens, acc, n)
        return lens * 1

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(k_cache, v_cache, cache_lens, accepted, num), expected[2])
    for actual, want in zip((k_cache, v_cache, cache_lens), expected):
        assert torch.equal(actual, want)


@pytest.mark.parametrize("device", DEVICES)
def test_compaction_bad_inputs_name_the_argument_and_leave_the_cache(device):
    k_cache = torch.randn(2, 10, 2, 4, device=device)
    v_cache = torch.randn(2, 10, 2, 3, device=device)
    lens = torch.tensor([2, 6], device=device)
    acc = torch.tensor([[0, 1, 3, -1], [0, 2, -1, -1]], device=device)
    num = torch.tensor([3, 2], device=device)
    cases = [
        ((lens, acc[:1], num), r"accepted must be \[B, T\]"),
        ((lens, acc, num[:1]), r"num_accepted must be \[B\]"),
        ((lens.int(), acc, num), "cache_lens must be int64"),
    ]
    if device == "cpu":  # value checks; CUDA reads no values back (device-side asserts instead)
        cases += [
            ((lens, acc, torch.tensor([3, 0], device=device)), r"num_accepted\[1\] = 0 must be in \[1, T\]"),
            ((lens, torch.tensor([[0, 3, 1, -1], [0, 2, -1, -1]], device=device), num), r"accepted\[0, 2\] = 1 must be"),
            ((lens, torch.tensor([[1, 2, 3, -1], [0, 2, -1, -1]], device=device), num), r"accepted\[0, 0\] = 1 must be 0"),
            ((torch.tensor([2, 8], device=device), acc, num), r"accepted\[1, 1\] = 2 addresses cache slot 10"),
            ((torch.tensor([2, 11], device=device), acc, num), r"cache_lens\[1\] = 11 is beyond the cache"),
        ]
    k0, v0 = k_cache.clone(), v_cache.clone()
    for (cl, a, n), message in cases:
        cl0 = cl.clone()
        with pytest.raises(RuntimeError, match=message):
            compact_kv_cache(k_cache, v_cache, cl, a, n)
        assert torch.equal(k_cache, k0) and torch.equal(v_cache, v0) and torch.equal(cl, cl0)
    with pytest.raises(RuntimeError, match="v_cache must be"):
        compact_kv_cache(k_cache, v_cache[:, :9], lens, acc, num)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("which", ["k_cache", "v_cache", "cache_lens"])
def test_an_expanded_cache_is_refused_and_left_untouched(device, which):
    """The caches and cache_lens are written in place: with elements sharing memory (stride 0,
    an expanded view) every slot move lands on the shared row, and cache_lens.add_ raised only
    after the caches had been moved."""
    k_cache, v_cache, cache_lens, _, _, _, _ = tree_step(3, 30, [0, 4, 9], 8, 2, 4, 3, torch.float32, device)
    accepted = torch.tensor([[0, 2, 5, -1], [0, 3, -1, -1], [0, -1, -1, -1]], device=device)  # slots move
    num = torch.tensor([3, 2, 1], device=device)
    args = dict(k_cache=k_cache, v_cache=v_cache, cache_lens=cache_lens)
    args[which] = args[which][:1].expand(args[which].shape)
    before = {k: t.clone() for k, t in args.items()}
    with pytest.raises(RuntimeError, match="more than one element of the written-to tensor"):
        compact_kv_cache(args["k_cache"], args["v_cache"], args["cache_lens"], accepted, num)
    for name, t in args.items():
        assert torch.equal(t, before[name]), f"{name} was modified"
