"""A reader of GGUF files (llama.cpp's format): the metadata as Python values and each tensor's
bytes from a memory map, plus the dequantization of the block formats to float32 in torch. Needs
no package beyond numpy and torch (the ``gguf`` package is ~10x slower reading the tokenizer's
long string arrays)."""
from __future__ import annotations

import struct
import warnings
from dataclasses import dataclass
from typing import BinaryIO, Dict, Tuple

import numpy as np
import torch
from torch import Tensor

# GGUF metadata value types -> struct format (8: string, 9: array)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32, 7: np.bool_,
          10: np.uint64, 11: np.int64, 12: np.float64}
#: GGML tensor types read: id -> (name, values per block, bytes per block)
TYPES = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 30: ("BF16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
         8: ("Q8_0", 32, 34)}
QK = 32  # values per block of the Q8_0 / Q4_0 / Q4_1 formats


@dataclass
class GGUFTensor:
    name: str
    shape: Tuple[int, ...]  # torch order (GGUF's ne reversed): [rows, ..., ne0]
    type_name: str
    data: np.ndarray  # its bytes (uint8), a view of the file's memory map

    def dequantize(self) -> Tensor:
        """float32 ``shape`` (a new tensor, not a view of the file)."""
        with warnings.catch_warnings():  # the memory map is read-only; dequantize copies
            warnings.simplefilter("ignore", UserWarning)
            raw = torch.from_numpy(self.data)
        out = dequantize(raw, self.type_name, self.shape)
        return out.clone() if out.data_ptr() == raw.data_ptr() else out


def _string(f: BinaryIO) -> str:
    (n,) = struct.unpack("<Q", f.read(8))
    return f.read(n).decode("utf-8", errors="replace")


def _value(f: BinaryIO, vtype: int):
    if vtype == 8:
        return _string(f)
    if vtype == 9:
        etype, count = struct.unpack("<IQ", f.read(12))
        if etype in _NUMPY:
            arr = np.frombuffer(f.read(count * np.dtype(_NUMPY[etype]).itemsize), dtype=_NUMPY[etype])
            return arr.tolist()
        return [_value(f, etype) for _ in range(count)]
    fmt = _SCALARS.get(vtype)
    if fmt is None:
        raise ValueError(f"unknown GGUF metadata value type {vtype}")
    return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]


def read_gguf(path: str) -> Tuple[Dict[str, object], Dict[str, GGUFTensor]]:
    """``(metadata, tensors)`` of a GGUF file (version 2 or 3). Tensors of a type not in
    :data:`TYPES` keep ``type_name`` ``"type<id>"`` and no data (refused when dequantized)."""
    with open(path, "rb") as f:
        magic, version = f.read(4), struct.unpack("<I", f.read(4))[0]
        if magic != b"GGUF" or version not in (2, 3):
            raise ValueError(f"{path}: not a GGUF file of version 2 or 3 (magic {magic!r}, version {version})")
        n_tensors, n_kv = struct.unpack("<QQ", f.read(16))
        meta = {}
        for _ in range(n_kv):
            key = _string(f)
            (vtype,) = struct.unpack("<I", f.read(4))
            meta[key] = _value(f, vtype)
        infos = []
        for _ in range(n_tensors):
            name = _string(f)
            (n_dims,) = struct.unpack("<I", f.read(4))
            ne = struct.unpack(f"<{n_dims}Q", f.read(8 * n_dims))
            ttype, offset = struct.unpack("<IQ", f.read(12))
            infos.append((name, tuple(int(d) for d in reversed(ne)), ttype, offset))
        align = int(meta.get("general.alignment", 32))
        start = -(-f.tell() // align) * align
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    tensors = {}
    for name, shape, ttype, offset in infos:
        type_name, per_block, block_bytes = TYPES.get(ttype, (f"type{ttype}", 0, 0))
        n = int(np.prod(shape))
        data = mm[start + offset:start + offset + n // per_block * block_bytes] if per_block else mm[:0]
        tensors[name] = GGUFTensor(name, shape, type_name, data)
    return meta, tensors


def _f16(blocks: Tensor, start: int) -> Tensor:
    """The float16 at bytes ``start:start + 2`` of each block ``[n, nbytes]`` -> float32 ``[n, 1]``."""
    return blocks[:, start:start + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: Tensor) -> Tensor:
    """16 bytes per block ``[n, 16]`` -> its 32 4-bit values as float32 ``[n, 32]`` (the low
    nibbles are values 0-15, the high ones 16-31)."""
    out = torch.empty(qs.shape[0], QK, dtype=torch.float32)
    out[:, :QK // 2] = qs & 0x0F
    out[:, QK // 2:] = qs >> 4
    return out


def dequantize(data: Tensor, type_name: str, shape) -> Tensor:
    """A GGUF tensor's bytes (uint8) -> float32 ``shape``. F32/F16/BF16 are reinterpreted;
    Q8_0 blocks hold a float16 scale d and 32 int8 q: ``d * q``; Q4_0 d and 32 nibbles:
    ``d * (q - 8)``; Q4_1 d, a float16 minimum m and 32 nibbles: ``d * q + m``."""
    n = int(np.prod(shape))
    if type_name in ("F32", "F16", "BF16"):
        dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[type_name]
        if data.dtype == torch.uint8:
            data = data.contiguous().view(dtype)
        return data.reshape(shape).float()
    if type_name not in ("Q8_0", "Q4_0", "Q4_1"):
        raise ValueError(f"GGUF tensor type {type_name} is not supported (F32, F16, BF16, Q8_0, Q4_0, Q4_1 are)")
    size = {"Q8_0": 2 + QK, "Q4_0": 2 + QK // 2, "Q4_1": 4 + QK // 2}[type_name]
    if n % QK or data.numel() != n // QK * size:
        raise ValueError(f"{type_name} data of {data.numel()} bytes does not hold a {tuple(shape)} tensor")
    blocks = data.reshape(n // QK, size)
    if type_name == "Q8_0":
        out = blocks[:, 2:].contiguous().view(torch.int8).float().mul_(_f16(blocks, 0))
    elif type_name == "Q4_0":
        out = _nibbles(blocks[:, 2:]).sub_(8).mul_(_f16(blocks, 0))
    else:
        out = _nibbles(blocks[:, 4:]).mul_(_f16(blocks, 0)).add_(_f16(blocks, 2))
    return out.reshape(shape)
