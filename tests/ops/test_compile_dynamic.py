"""torch.compile(dynamic=True) through the C++ Meta kernels: their checks take symbolic sizes
(guards, not specializations), so sizes that vary between calls run one graph, the results
match eager, and a bad size still fails the trace with the eager message."""
import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from leanformer import ops
from leanformer.reference import ancestor_mask
from leanformer.sparse import NMSparseMatrix
from tests.helpers import random_parents


def compile_dynamic(f):
    """(compiled f, its counter of compiled frames), fullgraph, aot_eager."""
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    return torch.compile(f, backend=counter, dynamic=True, fullgraph=True), counter


def assert_one_graph(f, calls):
    """Each call of the compiled f equals eager; sizes vary and one graph serves them all. The
    sizes are never 0 or 1 (torch specializes those), and no two of the first call's are equal
    unless they must be (torch's duck sizing would guard that equality)."""
    compiled, counter = compile_dynamic(f)
    for i, args in enumerate(calls):
        torch.testing.assert_close(compiled(*args), f(*args))
        if i == 0:  # a float argument (eps) may restart the first analysis: count from there
            first = counter.frame_count
    assert counter.frame_count == first, f"{counter.frame_count - first} recompiles for {len(calls) - 1} new shapes"


def test_linear_attention_varying_batch_and_length():
    def f(q, k, v):
        o, state = ops.simplified_linear_attention(q, k, v, causal=True, output_final_state=True)
        o2, _ = ops.simplified_linear_attention_step(q[:, -1], k[:, -1], v[:, -1], state)
        return o, o2

    assert_one_graph(f, [[torch.randn(B, T, 3, 8) for _ in range(3)] for B, T in ((2, 5), (4, 9), (5, 13))])


def test_linear_attention_bad_size_fails_the_trace():
    compiled, _ = compile_dynamic(lambda q, k, v: ops.simplified_linear_attention(q, k, v, causal=True))
    compiled(*(torch.randn(2, 5, 2, 8) for _ in range(3)))
    q, v = torch.randn(2, 7, 2, 8), torch.randn(2, 7, 2, 8)
    with pytest.raises(RuntimeError, match=r"k must match q in \[B, T, H\]"):
        compiled(q, torch.randn(2, 6, 2, 8), v)


def test_topk_mlp_varying_rows_with_gradients():
    d_model, d_ff = 16, 64
    w_up, b_up, w_down_t, b_down = (torch.randn(*s) * 0.3 for s in ((d_ff, d_model), (d_ff,), (d_ff, d_model),
                                                                     (d_model,)))

    def f(x):
        return ops.topk_mlp(x, w_up, b_up, w_down_t, b_down, k=8)

    compiled, counter = compile_dynamic(f)
    frames = []
    for rows in (3, 5, 11):
        x = torch.randn(2, rows, d_model, requires_grad=True)
        y, y_ref = compiled(x), f(x)
        torch.testing.assert_close(y, y_ref)
        g, = torch.autograd.grad(y.square().sum(), x)
        g_ref, = torch.autograd.grad(y_ref.square().sum(), x)
        torch.testing.assert_close(g, g_ref)
        frames.append(counter.frame_count)
    assert frames[-1] == frames[0], frames


def test_tree_attention_varying_cache_and_tree():
    def f(q, k_cache, v_cache, cache_lens, k_tree, v_tree, mask):
        return ops.tree_attention(q, k_cache, v_cache, cache_lens, k_tree, v_tree, mask)

    calls = []
    for L, T in ((10, 5), (17, 6), (23, 9)):
        mask = ancestor_mask(random_parents(T))
        calls.append([torch.randn(3, T, 4, 8), torch.randn(3, L, 2, 8), torch.randn(3, L, 2, 8),
                      torch.tensor([L // 2, L, 0]), torch.randn(3, T, 2, 8), torch.randn(3, T, 2, 8), mask])
    assert_one_graph(f, calls)


def test_nm_sparse_linear_and_packed_linear_varying_tokens():
    s = NMSparseMatrix.prune(torch.randn(24, 32), 2, 4)
    packed, bias = ops.pack_linear_weight(torch.randn(40, 24)), torch.randn(40)

    def f(x):
        return ops.packed_linear(torch.relu(ops.nm_sparse_linear(x, s.values, s.meta, n=2, m=4)), packed, bias, 40)

    assert_one_graph(f, [[torch.randn(T, 32)] for T in (3, 5, 7)])


def test_rep_batchnorm_and_tree_ops_varying_sizes():
    C = 8
    w, b, alpha, rm, rv = torch.ones(C), torch.zeros(C), torch.full((1,), 0.5), torch.zeros(C), torch.ones(C)
    weight, conv_bias = torch.randn(C, 5), torch.randn(C)

    def f(x, v, tail, parents):
        y = ops.rep_batchnorm(x, w, b, alpha, rm.clone(), rv.clone(), training=True)
        return y, ops.tree_dwconv(v, tail, parents, weight, conv_bias)

    assert_one_graph(f, [[torch.randn(B, T, C), torch.randn(B, T, 2, C), torch.randn(B * 2, C, 4), random_parents(T)]
                         for B, T in ((3, 7), (5, 9), (6, 11))])


def test_verify_tree_greedy_varying_tree():
    def f(logits, tokens, parents):
        return ops.verify_tree_greedy(logits, tokens, parents)

    calls = [[torch.randn(2, T, 11), torch.randint(0, 11, (2, T)), random_parents(T)] for T in (3, 6, 9)]
    assert_one_graph(f, calls)


def test_decode_attention_varying_batch_and_cache():
    def f(qkv, k_cache, v_cache, lens, cos, sin):
        return ops.decode_attention(qkv, k_cache, v_cache, lens, cos, sin, 6)

    calls = []
    for B, L, P in ((3, 7, 10), (4, 9, 13), (5, 11, 17)):
        angles = torch.rand(P, 4)
        calls.append([torch.randn(B, 10 * 8), torch.randn(B, L, 2, 8), torch.randn(B, L, 2, 8),
                      torch.randint(0, L, (B,)), torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)])
    assert_one_graph(f, calls)


def test_quantized_linear_varying_tokens_and_width():
    from leanformer.quant import BlockQuantizedMatrix

    def f(x, qweight, scales, mins):
        return torch.ops.leanformer.quantized_linear(x, qweight, scales, mins, None, 4, qweight.shape[0] * 16)

    calls = []
    for T, K in ((3, 64), (5, 96), (7, 128)):
        q = BlockQuantizedMatrix.from_dense(torch.randn(64, K), bits=4)  # 4 tiles: no size equal to T or K/32
        calls.append([torch.randn(T, K), q.qweight, q.scales, q.mins])
    assert_one_graph(f, calls)


def test_rms_norm_varying_rows_and_width():
    def f(x, w):
        return ops.rms_norm(x, w, 1e-5)

    assert_one_graph(f, [[torch.randn(B, T, C), torch.randn(C)] for B, T, C in ((2, 3, 20), (4, 7, 33), (5, 9, 48))])


def test_rms_norm_bad_width_fails_the_trace():
    compiled, _ = compile_dynamic(lambda x, w: ops.rms_norm(x, w, 1e-5))
    compiled(torch.randn(3, 20), torch.randn(20))
    with pytest.raises(RuntimeError, match=r"rms_norm: weight must be \[C\] = \[.*\] \(C = x.shape\[-1\]\), got"):
        compiled(torch.randn(5, 33), torch.randn(32))
