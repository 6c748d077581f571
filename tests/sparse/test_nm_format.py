"""The packed N:M format (leanformer.sparse): meta bit layout, pack/unpack round trips, pruning,
pattern violations, state_dict and device/dtype moves."""
import io

import pytest
import torch

from leanformer.sparse import NMSparseMatrix, meta_bits, nm_mask, pack_meta, unpack_dense, unpack_meta
from tests.helpers import TORCH_DEVICES as DEVICES

PATTERNS = [(2, 4), (1, 4), (2, 8), (4, 8), (1, 2), (3, 16), (8, 16)]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def nm_random(rows, K, n, m, dtype=torch.float32, device="cpu"):
    """A random matrix that is exactly N:M, with some groups holding fewer than n non-zeros."""
    w = torch.randn(rows, K, device=device)
    w = w * nm_mask(w, n, m)
    w[torch.rand(rows, K, device=device) < 0.2] = 0  # under-full groups get zero padding
    return w.to(dtype)


def test_meta_bits_per_m():
    assert [meta_bits(m) for m in (2, 4, 8, 16)] == [1, 2, 4, 4]
    with pytest.raises(ValueError, match="m must be one of"):
        meta_bits(3)


def test_meta_layout_is_lsb_first_and_never_straddles_a_word():
    # 2:4: value j at bits 2j of word 0 for j < 16, so 1 | 3 << 2 | 0 << 4 | 2 << 6 = 141.
    idx = torch.tensor([[1, 3, 0, 2] + [0] * 11 + [3, 1]])
    meta = pack_meta(idx, 4)
    assert meta.dtype == torch.int32 and meta.shape == (1, 2)
    assert meta[0, 0].item() == 141 - 2**32 + (3 << 30)  # bit 31 set: a negative int32
    assert meta[0, 1].item() == 1                        # value 16 starts word 1; high bits zero
    # 4-bit fields (m = 8, 16): 8 per word.
    meta16 = pack_meta(torch.tensor([[15, 0, 0, 0, 0, 0, 0, 9, 5]]), 16)
    assert meta16.tolist() == [[15 | (9 << 28) - 2**32, 5]]
    # 1-bit fields (m = 2): 32 per word.
    assert pack_meta(torch.tensor([[1] * 33]), 2).tolist() == [[-1, 1]]


@pytest.mark.parametrize("n,m", PATTERNS)
def test_pack_unpack_meta_round_trip(n, m):
    K = 7 * m  # an odd number of values per row: a partial last word
    idx = torch.randint(0, m, (5, K // m * n))
    meta = pack_meta(idx, m)
    assert meta.shape == (5, (K // m * n * meta_bits(m) + 31) // 32)
    assert torch.equal(unpack_meta(meta, n, m, K), idx)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,m", PATTERNS)
def test_from_dense_round_trip(device, dtype, n, m):
    w = nm_random(6, 5 * m, n, m, dtype, device)
    s = NMSparseMatrix.from_dense(w, n, m)
    assert s.values.shape == (6, 5 * n) and s.values.dtype == dtype and s.meta.dtype == torch.int32
    assert s.shape == (6, 5 * m) and (s.n, s.m) == (n, m)
    assert torch.equal(s.to_dense(), w)
    # In-group indices strictly ascending, padding included.
    idx = unpack_meta(s.meta, n, m, 5 * m).view(6, 5, n)
    assert bool((idx[..., 1:] > idx[..., :-1]).all())
    again = NMSparseMatrix.from_dense(s.to_dense(), n, m)
    assert torch.equal(again.values, s.values) and torch.equal(again.meta, s.meta)


@pytest.mark.parametrize("n,m", [(2, 4), (3, 4), (4, 16)])
@pytest.mark.parametrize("rows,K", [(0, 16), (0, 0), (3, 0)])
def test_empty_matrices_pack(n, m, rows, K):
    """No rows or no columns: prune and from_dense give empty values and meta of the right
    shapes (0 rows made the packing's reshape(rows, -1) ambiguous and raise)."""
    dense = torch.randn(rows, K)
    for s in (NMSparseMatrix.prune(dense, n, m), NMSparseMatrix.from_dense(dense * 0, n, m)):
        assert s.values.shape == (rows, K // m * n) and s.meta.shape == (rows, (K // m * n * meta_bits(m) + 31) // 32)
        assert torch.equal(s.to_dense(), torch.zeros(rows, K))


def test_under_full_groups_are_padded_at_the_smallest_unused_columns():
    w = torch.tensor([[0.0, 0.0, 0.0, 5.0, 0.0, 0.0, 0.0, 0.0]])
    s = NMSparseMatrix.from_dense(w, 2, 4)
    assert s.values.tolist() == [[0.0, 5.0, 0.0, 0.0]]
    assert unpack_meta(s.meta, 2, 4, 8).tolist() == [[0, 3, 0, 1]]


@pytest.mark.parametrize("n,m", PATTERNS)
def test_prune_keeps_the_n_largest_magnitudes(n, m):
    w = torch.randn(9, 4 * m, dtype=torch.float64)
    s = NMSparseMatrix.prune(w, n, m)
    mask = nm_mask(w, n, m)
    assert bool((mask.view(9, 4, m).sum(-1) == n).all())
    assert torch.equal(s.to_dense(), w * mask)
    groups, kept = w.abs().view(9, 4, m), mask.view(9, 4, m)
    smallest_kept = groups.masked_fill(~kept, float("inf")).min(-1).values
    largest_dropped = groups.masked_fill(kept, -1).max(-1).values
    assert bool((smallest_kept >= largest_dropped).all())


def test_prune_ties_go_to_the_lowest_column():
    w = torch.tensor([[1.0, -1.0, 1.0, 1.0, 0.0, 2.0, 0.0, 0.0]])
    assert nm_mask(w, 2, 4).tolist() == [[True, True, False, False, True, True, False, False]]
    assert NMSparseMatrix.prune(w, 1, 4).to_dense().tolist() == [[1.0, 0, 0, 0, 0, 2.0, 0, 0]]


def test_from_dense_names_the_first_violating_row_and_group():
    w = torch.zeros(4, 12)
    w[2, 4:7] = 1.0  # row 2, group 1: three non-zeros in 2:4
    w[3, 0:4] = 1.0
    with pytest.raises(ValueError, match=r"row 2, group 1 \(columns 4\.\.7\) has 3 non-zeros"):
        NMSparseMatrix.from_dense(w, 2, 4)


def test_bad_shapes_and_patterns_raise():
    with pytest.raises(ValueError, match="K=10 .* must be a multiple of m=4"):
        NMSparseMatrix.prune(torch.randn(3, 10), 2, 4)
    with pytest.raises(ValueError, match="K=10 .* must be a multiple of m=4"):
        NMSparseMatrix.from_dense(torch.zeros(3, 10), 2, 4)
    with pytest.raises(ValueError, match="1 <= n < m=4"):
        NMSparseMatrix.prune(torch.randn(3, 8), 4, 4)
    with pytest.raises(ValueError, match="m must be one of"):
        NMSparseMatrix.prune(torch.randn(3, 6), 1, 3)
    with pytest.raises(ValueError, match="2-D"):
        NMSparseMatrix.prune(torch.randn(2, 3, 8), 2, 4)
    s = NMSparseMatrix.prune(torch.randn(3, 8), 2, 4)
    with pytest.raises(ValueError, match=r"values must be \[3, 4\]"):
        NMSparseMatrix(s.values[:, :3], s.meta, 2, 4, (3, 8))
    with pytest.raises(ValueError, match="meta must be int32"):
        NMSparseMatrix(s.values, s.meta.long(), 2, 4, (3, 8))
    with pytest.raises(ValueError, match="pack_meta: indices must lie in"):
        pack_meta(torch.tensor([[4]]), 4)
    with pytest.raises(ValueError, match="unpack_meta: meta must be int32"):
        unpack_meta(s.meta, 2, 4, 64)  # 32 values need two words
    with pytest.raises(ValueError, match="unpack_dense: values must be"):
        unpack_dense(s.values, s.meta, 1, 4, 8)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8)])
def test_state_dict_round_trips_through_torch_save(n, m):
    s = NMSparseMatrix.prune(torch.randn(5, 4 * m), n, m)
    buffer = io.BytesIO()
    torch.save(s.state_dict(), buffer)
    buffer.seek(0)
    loaded = NMSparseMatrix.from_state_dict(torch.load(buffer, weights_only=True))
    assert (loaded.n, loaded.m, loaded.shape) == (n, m, s.shape)
    assert torch.equal(loaded.values, s.values) and torch.equal(loaded.meta, s.meta)
    assert torch.equal(loaded.to_dense(), s.to_dense())


@pytest.mark.parametrize("device", DEVICES)
def test_to_moves_values_and_meta_but_keeps_meta_int32(device):
    s = NMSparseMatrix.prune(torch.randn(4, 16), 2, 4)
    half = s.to(torch.bfloat16)
    assert half.values.dtype == torch.bfloat16 and half.meta.dtype == torch.int32
    assert torch.equal(half.meta, s.meta)
    moved = s.to(device, dtype=torch.float64)
    assert moved.device.type == device and moved.meta.device.type == device
    assert torch.equal(moved.to_dense().cpu(), s.to_dense().double())


def test_storage_bits_count_values_and_every_meta_word():
    s = NMSparseMatrix.prune(torch.randn(64, 4096), 2, 4)
    assert s.storage_bits() == 64 * 2048 * 32 + 64 * 128 * 32
    s14 = NMSparseMatrix.prune(torch.randn(3, 12), 1, 4)  # 3 values: 6 bits stored in a 32-bit word
    assert s14.storage_bits() == 3 * 3 * 32 + 3 * 32
    assert "pattern=2:4" in repr(s) and "shape=(64, 4096)" in repr(s)
