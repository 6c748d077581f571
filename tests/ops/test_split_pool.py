"""split_run (csrc/split_pool.h): a decoding step's GEMVs on the calling thread and helper threads
that spin between calls, where the caller takes back the chunks of a helper that is late (a
descheduled one) instead of waiting for it. Exercised through leanformer._C.split_selftest (a job
of spinning chunks whose helpers can be made to sleep), quantized_linear, float32
packed_linear / packed_swiglu and nm_sparse_linear's one-token GEMV, with two threads so
that the result does not depend on the machine."""
import multiprocessing
import os
import time

import pytest
import torch

from leanformer import _C
from leanformer.ops import (nm_sparse_linear, pack_linear_weight, pack_swiglu_weight, packed_linear, packed_swiglu,
                            quantized_linear)
from leanformer.quant import BlockQuantizedMatrix
from leanformer.sparse import NMSparseMatrix
from tests.helpers import two_threads  # noqa: F401  (the fixture)


pytestmark = [pytest.mark.usefixtures("two_threads"),
              pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="helpers need a second CPU")]


def counted(fn):
    """fn()'s result and how split_stats() moved while it ran."""
    before = _C.split_stats()
    out = fn()
    after = _C.split_stats()
    return out, {k: after[k] - before[k] for k in ("jobs", "helper_chunks", "taken_back")}


def test_helpers_share_the_work():
    assert _C.split_stats()["helpers"] == 1
    delivered, start = 0, time.monotonic()
    # a helper the host does not schedule in time (or whose core an OpenMP worker still spins on,
    # for ~2 ms after a parallel region) delivers nothing: try for up to 5 s
    while not delivered and time.monotonic() - start < 5:
        (ok, seconds), moved = counted(lambda: _C.split_selftest(32, 50, 0))
        assert ok and moved["jobs"] == 1
        delivered += moved["helper_chunks"]
    assert delivered > 0


def test_a_late_helper_is_not_waited_for():
    # a helper sleeping 300 ms in each chunk (a descheduled one's stand-in): the caller takes its
    # chunk back and returns after about its own work (16 x 50 us), the outputs right
    taken = 0
    for _ in range(10):
        (ok, seconds), moved = counted(lambda: _C.split_selftest(16, 50, 300_000))
        assert ok
        assert seconds < 0.15, seconds
        taken += moved["taken_back"]
        if taken:
            break
        time.sleep(0.35)  # let a helper still asleep in an earlier job come back
    assert taken > 0
    time.sleep(0.35)


def test_one_thread_runs_on_the_caller():
    torch.set_num_threads(1)
    assert _C.split_stats()["helpers"] == 0
    (ok, _), moved = counted(lambda: _C.split_selftest(16, 20, 0))
    assert ok and moved["helper_chunks"] == 0 and moved["taken_back"] == 0


def _child(x, q, conn):
    torch.set_num_threads(2)
    y, delivered, start = None, 0, time.monotonic()
    while not delivered and time.monotonic() - start < 5:  # as in test_helpers_share_the_work
        y, moved = counted(lambda: quantized_linear(x, q))
        delivered += moved["helper_chunks"]
    conn.send((y.tolist(), delivered))  # a list: tensors would go through shared memory


def test_a_forked_child_has_helpers_of_its_own():
    # helper threads do not survive fork(): the child starts its own pool, whose helpers work
    q = BlockQuantizedMatrix.from_dense(torch.randn(4096, 256), bits=4)
    x = torch.randn(3, 256)
    want = quantized_linear(x, q)  # the parent's pool is up
    ctx = multiprocessing.get_context("fork")
    a, b = ctx.Pipe()
    p = ctx.Process(target=_child, args=(x, q, b))
    p.start()
    got = a.recv() if a.poll(60) else None
    p.join(60)
    assert p.exitcode == 0 and got is not None
    assert got[0] == want.tolist() and got[1] > 0


def test_an_error_in_a_chunk_reaches_the_caller():
    # the caller's chunk 5 throws while the helpers sleep in theirs: the error is raised, and no
    # helper writes the (freed) output afterwards (CI's AddressSanitizer run would see it)
    for _ in range(3):
        with pytest.raises(RuntimeError, match="split_selftest: chunk 5 failed"):
            _C.split_selftest(16, 50, 20_000, 5)
    time.sleep(0.1)  # the helpers wake up into taken-back chunks
    assert _C.split_selftest(16, 20, 0)[0]
    with pytest.raises(ValueError, match="chunks must be in 1..100000"):
        _C.split_selftest(0, 1, 0)


def runs_on_the_helpers(fn):
    """fn() gives the same bits every time, once with chunks from a helper (within 5 s, as in
    test_helpers_share_the_work)."""
    want = fn()
    delivered, start = 0, time.monotonic()
    while not delivered and time.monotonic() - start < 5:
        y, moved = counted(fn)
        assert torch.equal(y, want) and moved["jobs"] == 1
        delivered += moved["helper_chunks"]
    return delivered > 0


@pytest.mark.parametrize("rows", [1, 5])
def test_quantized_linear_runs_on_the_helpers(rows):
    q = BlockQuantizedMatrix.from_dense(torch.randn(4096, 576), bits=4)  # 256 tiles, SmolLM2's width
    x = torch.randn(rows, 576)
    torch.set_num_threads(1)
    one = quantized_linear(x, q)
    torch.set_num_threads(2)
    assert runs_on_the_helpers(lambda: quantized_linear(x, q))
    assert torch.equal(quantized_linear(x, q), one)


def test_helpers_compute_in_the_callers_floating_point_mode():
    # flush-to-zero is a per-thread setting: with x ~1e-36 its int8 scale max|x| / 127 is normal
    # but its products with the weights' scales (~0.02) are denormal, so every chunk's bits depend
    # on the mode it runs in
    q = BlockQuantizedMatrix.from_dense(torch.randn(4096, 64), bits=8, symmetric=True)
    x = torch.randn(1, 64) * 1e-36
    _C.split_selftest(4, 1, 0)  # the helpers exist before the mode changes (a new thread copies its creator's)
    if not torch.set_flush_denormal(True):
        pytest.skip("no flush-to-zero on this CPU")
    try:
        torch.set_num_threads(1)
        one = quantized_linear(x, q)
        torch.set_num_threads(2)
        assert runs_on_the_helpers(lambda: quantized_linear(x, q))
        assert torch.equal(quantized_linear(x, q), one)
    finally:
        torch.set_flush_denormal(False)
    assert not torch.equal(quantized_linear(x, q), one)  # the mode changes these bits


@pytest.mark.parametrize("rows", [1, 19])
def test_packed_linear_and_swiglu_run_on_the_helpers(rows):
    # float32 panels in chunks (a partial last panel: N = 1000); the same bits as on one thread
    w, b, x = torch.randn(1000, 576), torch.randn(1000), torch.randn(rows, 576)
    pw, psw = pack_linear_weight(w), pack_swiglu_weight(torch.randn(1000, 576), torch.randn(1000, 576))
    torch.set_num_threads(1)
    one = packed_linear(x, pw, b, 1000), packed_swiglu(x, psw, 1000)
    torch.set_num_threads(2)
    assert runs_on_the_helpers(lambda: packed_linear(x, pw, b, 1000))
    assert runs_on_the_helpers(lambda: packed_swiglu(x, psw, 1000))
    assert torch.equal(packed_linear(x, pw, b, 1000), one[0]) and torch.equal(packed_swiglu(x, psw, 1000), one[1])


@pytest.mark.parametrize("n", [2, 1])
def test_nm_sparse_linear_gemv_runs_on_the_helpers(n):
    # one token, float32: the rows in chunks on split_run (4104 rows: a last chunk shorter), the
    # bias added in each chunk, the same bits as one thread; x with an inf takes the fix-up after
    s = NMSparseMatrix.prune(torch.randn(4104, 1024), n, 4)
    bias = torch.randn(4104)
    x = torch.randn(1, 1024)
    torch.set_num_threads(1)
    one = nm_sparse_linear(x, s.values, s.meta, bias, n=n, m=4)
    torch.set_num_threads(2)
    assert runs_on_the_helpers(lambda: nm_sparse_linear(x, s.values, s.meta, bias, n=n, m=4))
    assert torch.equal(nm_sparse_linear(x, s.values, s.meta, bias, n=n, m=4), one)
    torch.testing.assert_close(one, x @ s.to_dense().T + bias, rtol=1e-4, atol=1e-4)
    x[0, 7] = float("inf")
    y = nm_sparse_linear(x, s.values, s.meta, bias, n=n, m=4)
    torch.testing.assert_close(y, x @ s.to_dense().T + bias, rtol=1e-4, atol=1e-4, equal_nan=True)
