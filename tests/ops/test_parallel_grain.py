"""The CPU kernels open a parallel region only for work worth it (csrc/grain.h): a call of
decoding size (one token through a layer's matrices) runs on the calling thread, where a busy
host cannot stall it on a descheduled OpenMP worker, and a large one still uses every thread.
Counted through leanformer._C.parallel_chunks() (chunks run inside a parallel region), with two
threads, so the result does not depend on the machine."""
import functools

import pytest
import torch
import torch.nn.functional as F

from leanformer import _C
from leanformer.ops import (decode_attention, nm_sparse_linear, pack_linear_weight, pack_swiglu_weight,
                            packed_linear, packed_swiglu, rms_norm, sparse_down_projection, topk_activation,
                            topk_mlp)
from leanformer.sparse import NMSparseMatrix
from tests.helpers import two_threads  # noqa: F401  (the fixture)


pytestmark = pytest.mark.usefixtures("two_threads")


def parallel_chunks(fn) -> int:
    fn()  # once to warm up, as the counted call must not depend on a first call's setup
    start = _C.parallel_chunks()
    fn()
    return _C.parallel_chunks() - start


def randn(*shape, scale=1.0, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


@functools.lru_cache(maxsize=None)
def decoding_calls():
    """Decoding-sized calls: bench/bench_topk_mlp.py's and bench_packed_linear.py's shapes at one
    token, SmolLM2-135M's attention step and RMSNorm, N:M GEMVs."""
    calls = {}
    d_model, d_ff, k = 1024, 4096, 123
    w_up, b_up = randn(d_ff, d_model, scale=d_model ** -0.5), randn(d_ff, scale=0.1, seed=1)
    w_down_t, b_down = randn(d_ff, d_model, scale=d_ff ** -0.5, seed=2), randn(d_model, scale=0.1, seed=3)
    values, indices = topk_activation(F.linear(randn(1, d_model, seed=4), w_up, b_up), k)
    calls["sparse_down_projection 1 x 123/4096 -> 1024"] = lambda: sparse_down_projection(
        values, indices, w_down_t, b_down)
    calls["topk_activation 1 x 4096"] = lambda: topk_activation(randn(1, d_ff, seed=5), k)
    for K, N in ((256, 768), (256, 1024), (1024, 256)):
        w, b, x = randn(N, K, seed=6), randn(N, seed=7), randn(1, K, seed=8)
        calls[f"packed_linear 1 x {K} -> {N}"] = lambda x=x, pw=pack_linear_weight(w), b=b, N=N: packed_linear(
            x, pw, b, N)
    pw = pack_swiglu_weight(randn(1536, 576, seed=9), randn(1536, 576, seed=10))
    calls["packed_swiglu 1 x 576 -> 1536"] = lambda: packed_swiglu(randn(1, 576, seed=11), pw, 1536)
    H, Hkv, D, L = 9, 3, 64, 400
    k_cache, v_cache = randn(1, L, Hkv, D, seed=12), randn(1, L, Hkv, D, seed=13)
    angles = randn(L, D // 2, seed=14)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([-angles.sin(), angles.sin()], -1)
    qkv, lens = randn(1, (H + 2 * Hkv) * D, seed=15), torch.tensor([300])
    calls["decode_attention 9 heads x 64, 300 keys"] = lambda: decode_attention(qkv, k_cache, v_cache, lens, cos, sin, H)
    calls["topk_mlp 1 x 1024, 123/4096"] = lambda x=randn(1, d_model, seed=16): topk_mlp(
        x, w_up, b_up, w_down_t, b_down, k)
    for n in (2, 1):
        s = NMSparseMatrix.prune(randn(4096, 4096, seed=17), n, 4)
        x = randn(1, 4096, seed=18)
        calls[f"nm_sparse_linear {n}:4 1 x 4096 -> 4096"] = lambda s=s, x=x, n=n: nm_sparse_linear(
            x, s.values, s.meta, n=n, m=4)
    calls["rms_norm 1 x 576"] = lambda x=randn(1, 1, 576, seed=19), w=randn(576, seed=20): rms_norm(x, w, 1e-5)
    return calls


@pytest.mark.parametrize("name", list(decoding_calls()))
def test_decoding_sized_calls_open_no_parallel_region(name):
    assert parallel_chunks(decoding_calls()[name]) == 0


def test_large_calls_use_both_threads():
    # (float32 packed_linear and quantized_linear run on split_run's helpers instead at every
    # size: tests/ops/test_split_pool.py)
    w = randn(1024, 1024, seed=2).double()
    pw, x = pack_linear_weight(w), randn(76, 1024, seed=3).double()  # 80M multiply-adds
    assert parallel_chunks(lambda: packed_linear(x, pw, None, 1024)) == 2
    s = NMSparseMatrix.prune(randn(4096, 4096), 2, 4)
    x = randn(8, 4096, seed=1)  # the tile kernel: 8 tokens x 8M kept values
    assert parallel_chunks(lambda: nm_sparse_linear(x, s.values, s.meta, n=2, m=4)) == 2
