"""BlockQuantizedMatrix: a ``[N, K]`` weight in blocks of 32 along K, each with 4- or 8-bit
unsigned codes, a float16 scale and (asymmetric forms) a float16 minimum, held in the packed
tile layout the kernels read (:mod:`leanformer.reference.quantized_linear`).

Formats (``W = s * u + m``):

========  ====  ===============  ==========================  ==============
format    bits  minimum m        GGUF type read as it is     bits / weight
========  ====  ===============  ==========================  ==============
``q4_0``  4     ``-8 s``         Q4_0                        4.5
``q4_1``  4     stored           Q4_1                        5
``q8_0``  8     ``-128 s``       Q8_0 (``u = q + 128``)      8.5
``q8_1``  8     stored           (none)                      9
========  ====  ===============  ==========================  ==============
"""
from __future__ import annotations

import warnings
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from leanformer.reference.quantized_linear import (BLOCK, TILE, dequantize_reference, pack_codes, pack_params,
                                                   unpack_codes, unpack_params)

#: format name -> (bits, symmetric)
FORMATS = {"q4_0": (4, True), "q4_1": (4, False), "q8_0": (8, True), "q8_1": (8, False)}
_GGUF = {"Q4_0": "q4_0", "Q4_1": "q4_1", "Q8_0": "q8_0"}
#: the GGUF tensor types read as they are
GGUF_TYPES = tuple(_GGUF)
_GGUF_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}
#: the clipping ratios quantize_blocks tries per block (BCT-style: each block's scale chosen by error)
CLIP_GRID = (1.0, 0.97, 0.94, 0.91, 0.88, 0.85, 0.82, 0.79, 0.76, 0.73, 0.7)


def _format_of(bits: int, symmetric: bool) -> str:
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    return f"q{bits}_{0 if symmetric else 1}"


def _codes(w: Tensor, s: Tensor, m: Tensor, top: int) -> Tensor:
    safe = torch.where(s == 0, torch.ones_like(s), s)
    u = torch.round((w - m[..., None]) / safe[..., None]).clamp_(0, top)
    return torch.where((s == 0)[..., None], torch.zeros_like(u), u)


def quantize_blocks(w: Tensor, bits: int = 4, symmetric: bool = False,
                    clip_grid: Sequence[float] = CLIP_GRID) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """``w [N, K]`` (K a multiple of 32) -> ``(codes uint8 [N, K], scales fp16 [N, K/32], mins fp16
    [N, K/32] or None)``, without retraining. Per block, each clipping ratio of ``clip_grid``
    shrinks the range (asymmetric: [min, max]; symmetric: the signed value of largest magnitude,
    llama.cpp's Q4_0/Q8_0 rule ``s = -x_max / 2^(bits-1)``), and the ratio with the least squared
    error of the block's reconstruction wins (``clip_grid=(1.0,)``: plain round-to-nearest)."""
    if w.dim() != 2 or w.shape[1] % BLOCK:
        raise ValueError(f"quantize_blocks: w must be [N, K] with K a multiple of {BLOCK}, got {tuple(w.shape)}")
    N, K = w.shape
    wb = w.detach().float().reshape(N, K // BLOCK, BLOCK)
    top = 2 ** bits - 1
    best_err = best_s = best_m = None
    for ratio in clip_grid:
        if symmetric:
            idx = wb.abs().argmax(-1, keepdim=True)
            xmax = wb.gather(-1, idx).squeeze(-1) * ratio
            s = (xmax / -(2 ** (bits - 1))).half().float()
            m = s * -(2 ** (bits - 1))
        else:
            lo, hi = wb.amin(-1).clamp(max=0) * ratio, wb.amax(-1).clamp(min=0) * ratio
            s = ((hi - lo) / top).half().float()
            m = lo.half().float()
        err = ((_codes(wb, s, m, top) * s[..., None] + m[..., None] - wb) ** 2).sum(-1)
        if best_err is None:
            best_err, best_s, best_m = err, s, m
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_s, best_m = torch.where(better, s, best_s), torch.where(better, m, best_m)
    codes = _codes(wb, best_s, best_m, top).to(torch.uint8).reshape(N, K)
    return codes, best_s.half(), None if symmetric else best_m.half()


class BlockQuantizedMatrix:
    """A ``[N, K]`` block-quantized weight in the packed layout of the kernels.

    Attributes:
        qweight: uint8 ``[ceil(N/16), K/32, 16 * 32 * bits / 8]``, the codes in tiles of 16 rows.
        scales: float16 ``[ceil(N/16), K/32, 16]``; mins: the same or None (symmetric formats).
        bits: 4 or 8; shape: ``(N, K)``; format: ``"q4_0"``, ``"q4_1"``, ``"q8_0"`` or ``"q8_1"``.

    Example::

        >>> w = torch.randn(576, 1536)
        >>> q = BlockQuantizedMatrix.from_dense(w, bits=4)          # q4_1, 5 bits a weight
        >>> y = q.linear(torch.randn(3, 1536))                       # [3, 576]
        >>> (q.to_dense() - w).norm() / w.norm()                     # ~0.08 for Gaussian weights
    """

    def __init__(self, qweight: Tensor, scales: Tensor, mins: Optional[Tensor], bits: int, shape: Tuple[int, int]):
        N, K = (int(d) for d in shape)
        _format_of(bits, mins is None)
        if K % BLOCK:
            raise ValueError(f"BlockQuantizedMatrix: K = {K} must be a multiple of {BLOCK}")
        T, KB = -(-N // TILE), K // BLOCK
        want = (T, KB, TILE * BLOCK * bits // 8)
        if qweight.dtype != torch.uint8 or tuple(qweight.shape) != want:
            raise ValueError(f"BlockQuantizedMatrix: qweight must be uint8 {list(want)} for shape {(N, K)} and "
                             f"{bits} bits, got {qweight.dtype} {list(qweight.shape)}")
        for name, p in (("scales", scales), ("mins", mins)):
            if p is None:
                continue
            if p.dtype != torch.float16 or tuple(p.shape) != (T, KB, TILE):
                raise ValueError(f"BlockQuantizedMatrix: {name} must be float16 {[T, KB, TILE]}, "
                                 f"got {p.dtype} {list(p.shape)}")
            if p.device != qweight.device:
                raise ValueError(f"BlockQuantizedMatrix: {name} is on {p.device}, qweight on {qweight.device}")
        self.qweight, self.scales, self.mins, self.bits, self.shape = qweight, scales, mins, bits, (N, K)

    # ---- construction ----

    @classmethod
    def from_codes(cls, codes: Tensor, scales: Tensor, mins: Optional[Tensor], bits: int) -> "BlockQuantizedMatrix":
        """Unpacked parts: codes uint8 ``[N, K]`` (< 2^bits), scales / mins float16 ``[N, K/32]``."""
        if codes.dtype != torch.uint8 or codes.dim() != 2:
            raise ValueError(f"codes must be uint8 [N, K], got {codes.dtype} {list(codes.shape)}")
        if bits == 4 and bool((codes > 15).any()):
            raise ValueError("codes must be < 16 for 4 bits")
        return cls(pack_codes(codes, bits), pack_params(scales.half()),
                   None if mins is None else pack_params(mins.half()), bits, tuple(codes.shape))

    @classmethod
    def from_dense(cls, w: Tensor, bits: int = 4, block: int = BLOCK, symmetric: bool = False,
                   clip_grid: Sequence[float] = CLIP_GRID) -> "BlockQuantizedMatrix":
        """Quantize ``w [N, K]`` (K a multiple of 32) blockwise, no retraining: per-block scales
        (and minima) chosen by reconstruction error over ``clip_grid`` (see :func:`quantize_blocks`).
        ``bits=4, symmetric=False`` is GGUF's Q4_1, ``symmetric=True`` Q4_0; 8 bits Q8_0 / q8_1."""
        if block != BLOCK:
            raise ValueError(f"block must be {BLOCK} (the kernels' and GGUF's block), got {block}")
        codes, scales, mins = quantize_blocks(w, bits, symmetric, clip_grid)
        return cls.from_codes(codes, scales, mins, bits).to(w.device)

    @classmethod
    def from_gguf(cls, data, type_name: Optional[str] = None,
                  shape: Optional[Sequence[int]] = None) -> "BlockQuantizedMatrix":
        """A GGUF tensor's Q8_0 / Q4_0 / Q4_1 blocks as they are: the codes are moved into the tile
        layout and the float16 scales (and minima) copied, nothing is dequantized. ``data``: a
        :class:`leanformer.models.gguf_file.GGUFTensor`, or its bytes (uint8 tensor or numpy
        array) with ``type_name`` and the torch-order ``shape`` ``(N, K)``."""
        if type_name is None:  # a GGUFTensor
            data, type_name, shape = data.data, data.type_name, data.shape
        if type_name not in _GGUF:
            raise ValueError(f"from_gguf: GGUF type {type_name} is not a block format read here "
                             f"({', '.join(_GGUF)} are)")
        N, K = (int(d) for d in shape)
        if isinstance(data, np.ndarray):
            with warnings.catch_warnings():  # a read-only memory map: only read here (copied below)
                warnings.simplefilter("ignore", UserWarning)
                raw = torch.from_numpy(np.ascontiguousarray(data))
        else:
            raw = data
        nb = _GGUF_BYTES[type_name]
        if K % BLOCK or raw.numel() != N * K // BLOCK * nb:
            raise ValueError(f"from_gguf: {raw.numel()} bytes of {type_name} do not hold a {(N, K)} tensor")
        blocks = raw.reshape(N, K // BLOCK, nb)
        scales = blocks[..., 0:2].contiguous().view(torch.float16).squeeze(-1)
        if type_name == "Q8_0":
            codes = blocks[..., 2:] ^ 0x80  # int8 q -> q + 128
            return cls.from_codes(codes.reshape(N, K), scales, None, 8)
        qs = blocks[..., 2:] if type_name == "Q4_0" else blocks[..., 4:]
        mins = None if type_name == "Q4_0" else blocks[..., 2:4].contiguous().view(torch.float16).squeeze(-1)
        codes = torch.cat([qs & 0x0F, qs >> 4], dim=-1).reshape(N, K)  # low nibbles: a block's first 16
        return cls.from_codes(codes, scales, mins, 4)

    @classmethod
    def from_state_dict(cls, sd: dict) -> "BlockQuantizedMatrix":
        return cls(sd["qweight"], sd["scales"], sd.get("mins"), int(sd["bits"]), tuple(sd["shape"]))

    def select_rows(self, index: Tensor) -> "BlockQuantizedMatrix":
        """The matrix of rows ``index`` (int64 ``[n]``), codes and scales moved, not requantized."""
        mins = None if self.mins is None else unpack_params(self.mins, self.shape[0])[index]
        return BlockQuantizedMatrix.from_codes(self.codes()[index], self.block_scales()[index], mins, self.bits)

    # ---- views ----

    @property
    def format(self) -> str:
        return _format_of(self.bits, self.mins is None)

    @property
    def symmetric(self) -> bool:
        return self.mins is None

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def codes(self) -> Tensor:
        """uint8 ``[N, K]``."""
        return unpack_codes(self.qweight, self.bits, self.shape[0])

    def block_scales(self) -> Tensor:
        """float16 ``[N, K/32]``."""
        return unpack_params(self.scales, self.shape[0])

    def to_dense(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """``W [N, K]``: ``s * u + m`` per block."""
        return dequantize_reference(self.qweight, self.scales, self.mins, self.bits, self.shape[0]).to(dtype)

    def to(self, device) -> "BlockQuantizedMatrix":
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return BlockQuantizedMatrix(mv(self.qweight), mv(self.scales), mv(self.mins), self.bits, self.shape)

    def state_dict(self) -> dict:
        """Tensors and ints only (``torch.save`` and ``weights_only`` loading round-trip it)."""
        sd = {"qweight": self.qweight, "scales": self.scales, "bits": self.bits, "shape": list(self.shape)}
        if self.mins is not None:
            sd["mins"] = self.mins
        return sd

    def storage_bits(self) -> int:
        """Bits stored for the N real rows: codes, scales, minima (tile padding left out)."""
        N, K = self.shape
        per_block = BLOCK * self.bits + 16 * (1 if self.mins is None else 2)
        return N * (K // BLOCK) * per_block

    def linear(self, x: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        """``x @ W^T + bias``: the op :func:`leanformer.ops.quantized_linear` runs (its autograd too)."""
        return torch.ops.leanformer.quantized_linear(x, self.qweight, self.scales, self.mins, bias, self.bits,
                                                     self.shape[0])

    def __repr__(self) -> str:
        return (f"BlockQuantizedMatrix(shape={self.shape}, format={self.format}, device={self.device}, "
                f"{self.storage_bits() / (self.shape[0] * self.shape[1]):.2f} bits/weight)")
