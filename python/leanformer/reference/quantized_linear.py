"""Block-quantized linear in plain PyTorch: the layout of the packed weight, its dequantization,
and the exact math of ``torch.ops.leanformer.quantized_linear`` (docs/quantized_linear.md).

Weights: ``W [N, K]`` in blocks of 32 along K. Output n, block b holds 32 unsigned codes
``u`` (4 or 8 bits), a scale ``s[n, b]`` and a minimum ``m[n, b]``:
``W[n, 32 b + i] = s[n, b] * u[n, 32 b + i] + m[n, b]``. The symmetric forms store no minimum:
``m = -2^(bits - 1) * s`` (GGUF's Q4_0 and, with ``u = q + 128``, Q8_0); the asymmetric 4-bit
form is GGUF's Q4_1. Scales and minima are float16, as GGUF stores them.

Packed layout (what the kernels read), outputs in tiles of 16 (N padded with zero codes,
scales and minima), ``T = ceil(N / 16)``, ``KB = K / 32``:

- ``qweight`` uint8 ``[T, KB, 512]`` (8 bits) or ``[T, KB, 256]`` (4 bits). 8 bits: byte
  ``64 g + 4 j + e`` of tile t, block b is ``u[16 t + j, 32 b + 4 g + e]`` (g < 8: groups of 4
  inputs; j < 16: the tile's outputs). 4 bits: byte ``64 h + 4 j + e`` (h < 4) holds
  ``u[16 t + j, 32 b + 4 h + e]`` in its low nibble and ``u[16 t + j, 32 b + 16 + 4 h + e]`` in
  its high nibble (GGUF's pairing: low nibbles are a block's first 16 values).
- ``scales``, ``mins`` float16 ``[T, KB, 16]``: ``s[16 t + j, b]`` at ``[t, b, j]``.

So 16 outputs' codes for 4 consecutive inputs are 64 contiguous bytes: one AVX-512 integer
dot product (``vpdpbusd``) per 4 inputs and 16 outputs, one 4-byte broadcast of x.

The product rounds x, per row and block of 32, to int8 (llama.cpp's Q8_0 activations):
``a = max |x|``, ``dx = a / 127``, ``xq = round_half_even(x * (127 / a))`` (0 where a = 0), then
with ``isum = sum_i u_i xq_i`` (exact, int32) and ``sx = dx * sum_i xq_i``, for b = 0, 1, ...
in order: ``acc = fma(isum, s * dx, acc); acc = fma(m, sx, acc)`` (fp32), ``y = acc + bias``.
Each row's result depends on that row alone, bit for bit, whatever the number of rows, the
threads or the CPU's vector ISA (tree decoding's verification relies on it).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

BLOCK = 32  # inputs per block
TILE = 16  # outputs per tile


def pack_codes(u: Tensor, bits: int) -> Tensor:
    """Codes ``u`` (uint8 ``[N, K]``, < 2^bits) -> ``qweight`` ``[T, KB, 16 * 32 * bits / 8]``."""
    N, K = u.shape
    T, KB = -(-N // TILE), K // BLOCK
    u = torch.nn.functional.pad(u, (0, 0, 0, T * TILE - N)).view(T, TILE, KB, 8, 4)  # [t, j, b, g, e]
    u = u.permute(0, 2, 3, 1, 4)  # [t, b, g, j, e]
    if bits == 8:
        return u.reshape(T, KB, 512).contiguous()
    return (u[:, :, :4] | (u[:, :, 4:] << 4)).reshape(T, KB, 256).contiguous()


def unpack_codes(qweight: Tensor, bits: int, out_features: int) -> Tensor:
    """The inverse of :func:`pack_codes`: uint8 ``[N, K]``."""
    T, KB = qweight.shape[:2]
    if bits == 8:
        u = qweight.view(T, KB, 8, TILE, 4)
    else:
        q = qweight.view(T, KB, 4, TILE, 4)
        u = torch.cat([q & 0x0F, q >> 4], dim=2)  # [t, b, g, j, e]
    return u.permute(0, 3, 1, 2, 4).reshape(T * TILE, KB * BLOCK)[:out_features]


def unpack_params(p: Tensor, out_features: int) -> Tensor:
    """scales / mins ``[T, KB, 16]`` -> ``[N, KB]``."""
    return p.transpose(1, 2).reshape(-1, p.shape[1])[:out_features]


def pack_params(p: Tensor) -> Tensor:
    """``[N, KB]`` -> ``[T, KB, 16]`` (zero past N)."""
    N, KB = p.shape
    T = -(-N // TILE)
    return torch.nn.functional.pad(p, (0, 0, 0, T * TILE - N)).view(T, TILE, KB).transpose(1, 2).contiguous()


def effective_mins(scales: Tensor, mins: Optional[Tensor], bits: int) -> Tensor:
    """fp32 minima: ``mins``, or ``-2^(bits-1) * scales`` for the symmetric forms."""
    return mins.float() if mins is not None else scales.float() * -(2.0 ** (bits - 1))


def dequantize_reference(qweight: Tensor, scales: Tensor, mins: Optional[Tensor], bits: int,
                         out_features: int) -> Tensor:
    """float32 ``W [N, K]``."""
    u = unpack_codes(qweight, bits, out_features).float()
    s = unpack_params(scales, out_features).float()
    m = unpack_params(effective_mins(scales, mins, bits), out_features)
    N, K = u.shape
    return (u.view(N, -1, BLOCK) * s[..., None] + m[..., None]).view(N, K)


def quantize_activations_reference(x: Tensor):
    """x ``[M, K]`` -> (xq int32 ``[M, K]`` in [-127, 127], dx fp32 ``[M, KB]``, sum of xq int64 ``[M, KB]``)."""
    M, K = x.shape
    xb = x.float().reshape(M, K // BLOCK, BLOCK)
    a = xb.abs().amax(-1)
    dx = a / 127.0
    # a true division (127.0 / a would be torch's reciprocal(a) * 127, off by an ulp at times)
    inv = torch.where(a > 0, torch.full_like(a, 127.0) / a, torch.zeros_like(a))
    xq = torch.round(xb * inv[..., None]).clamp_(-127, 127).to(torch.int32)
    return xq.view(M, K), dx, xq.sum(-1, dtype=torch.int64)


def quantized_linear_reference(x: Tensor, qweight: Tensor, scales: Tensor, mins: Optional[Tensor],
                               bias: Optional[Tensor], bits: int, out_features: int) -> Tensor:
    """The op's math (above) in float64 sums: ``[..., N]`` in x's dtype. Agrees with the kernels
    to fp32 rounding (the kernels' fp32 fma chain over the blocks is not replayed here)."""
    K = x.shape[-1]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    xq, dx, xsum = quantize_activations_reference(x2)
    u = unpack_codes(qweight, bits, out_features).to(torch.int64)  # [N, K]
    M, N, KB = x2.shape[0], out_features, K // BLOCK
    isum = torch.einsum("mbi,nbi->mnb", xq.to(torch.int64).view(M, KB, BLOCK).double(),
                        u.view(N, KB, BLOCK).double())  # exact: |isum| < 2^21
    s = unpack_params(scales, N).float()
    m = unpack_params(effective_mins(scales, mins, bits), N)
    sdx = (s[None] * dx[:, None]).double()  # the fp32 product the kernels form, [M, N, KB]
    sx = (dx * xsum.float()).double()  # fp32, as the kernels
    y = (isum * sdx).sum(-1) + (m.double()[None] * sx[:, None]).sum(-1)
    y = y.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*lead, N)
