"""Our 2:4 metadata, reordered into the layout CUTLASS's sm80 sparse tensor-core GEMM reads.

This is the plain-PyTorch twin of the CUDA kernel ``reorder_meta_sm80_kernel`` in
csrc/cuda/nm_sparse_linear_cutlass_sm80.cu; tests compare it with PyTorch's own conversion
(torch/sparse/_semi_structured_conversions.py), so the kernel and the hardware layout are tied
to an independent implementation.

Why a reorder is only a permutation: with m = 4 our format stores value j of a row at bits
2j, 2j+1 (LSB first), so the two in-group indices of group g form the nibble ``idx0 | idx1 << 2``
at bit 4g, which is exactly the hardware's per-group code (ascending indices, as CUTLASS
requires). Four groups make one 16-bit metadata element; read as little-endian int16, our
int32 word w of a row holds the elements 2w (low half) and 2w + 1. What is left is where CUTLASS
wants each int16 element: ``cutlass::layout::ColumnMajorInterleaved<2>`` of the [rows, K/16]
element matrix after the row interleave and 2x2 swizzle of cutlass/util/host_reorder.h, which
lets one ldmatrix load the metadata of a warp's tensor-core tiles.
"""
from __future__ import annotations

import torch
from torch import Tensor

# CUTLASS's 16-bit metadata (fp16/bf16 operands) is reordered in groups of 32 rows.
ROW_GROUP = 32
GROUPS_PER_ELEMENT = 4  # 4 groups of 4 columns per int16: 16 dense columns


def meta_sm80_shape(rows: int, k: int) -> tuple:
    """(rows, K // 16): the int16 metadata matrix of a 2:4 fp16/bf16 [rows, K] weight."""
    check_meta_sm80_sizes(rows, k)
    return rows, k // (4 * GROUPS_PER_ELEMENT)


def check_meta_sm80_sizes(rows: int, k: int) -> None:
    if rows % ROW_GROUP:
        raise ValueError(f"CUTLASS 2:4 metadata needs rows to be a multiple of {ROW_GROUP}, got {rows}")
    # ColumnMajorInterleaved<2> stores column pairs: an odd element count per row would overflow.
    if k % 32:
        raise ValueError(f"CUTLASS 2:4 metadata needs K to be a multiple of 32, got {k}")


def reorder_offsets_sm80(rows: int, meta_cols: int, device=None) -> Tensor:
    """Destination offset (in int16 elements) of every element of the row-major
    [rows, meta_cols] metadata matrix, as an int64 [rows, meta_cols] tensor."""
    r = torch.arange(rows, device=device).view(-1, 1).expand(rows, meta_cols)
    c = torch.arange(meta_cols, device=device).view(1, -1).expand(rows, meta_cols)
    # Row interleave inside each group of 32 rows: row 8a + b goes to 4b + a.
    dst_r = r // ROW_GROUP * ROW_GROUP + (r % 8) * 4 + (r % ROW_GROUP) // 8
    # Swap the off-diagonal elements of every 2x2 block.
    swap = (dst_r % 2 == 0) & (c % 2 == 1)
    back = (dst_r % 2 == 1) & (c % 2 == 0)
    shift = swap.long() - back.long()
    dst_r = dst_r + shift
    dst_c = c - shift
    # ColumnMajorInterleaved<2>: pairs of columns, each pair stored row by row.
    return (dst_c // 2) * (rows * 2) + dst_r * 2 + dst_c % 2


def reorder_meta_sm80(meta: Tensor, k: int) -> Tensor:
    """Our int32 2:4 metadata ``[rows, ceil(K/32)]`` -> CUTLASS sm80 metadata, int16
    ``[rows, K/16]`` whose storage is in ColumnMajorInterleaved<2> order (the layout the
    returned tensor's memory has; pass its data pointer with ``LayoutE::packed({rows, K/16})``).
    Needs rows % 32 == 0 and K % 32 == 0."""
    if meta.dtype != torch.int32 or meta.dim() != 2:
        raise ValueError(f"meta must be a 2-D int32 tensor, got {meta.dtype} {tuple(meta.shape)}")
    rows, meta_cols = meta_sm80_shape(meta.shape[0], k)
    if meta.shape[1] != (k + 31) // 32:
        raise ValueError(f"meta must have ceil(K/32) = {(k + 31) // 32} words per row for 2:4 "
                         f"with K = {k}, got {meta.shape[1]}")
    elements = meta.contiguous().view(torch.int16)[:, :meta_cols]
    out = torch.empty(rows * meta_cols, dtype=torch.int16, device=meta.device)
    out.scatter_(0, reorder_offsets_sm80(rows, meta_cols, meta.device).reshape(-1), elements.reshape(-1))
    return out.view(rows, meta_cols)
