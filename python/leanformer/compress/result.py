"""What a compression pass returns: the achieved compression, overall and per layer."""
from __future__ import annotations

import dataclasses
from typing import Dict


@dataclasses.dataclass
class LayerCompression:
    """One replaced Linear: its storage before and after, and how it was compressed."""

    dense_bits: int
    compressed_bits: int
    rank: int = 0  # 0 where there is no rank (N:M pruning)
    error: float = 0.0  # ||W - W_hat||_F / ||W||_F of the replacement at conversion
    pattern: str = ""  # "n:m" of the sparse part, "" for none

    @property
    def compression(self) -> float:
        return self.dense_bits / self.compressed_bits


@dataclasses.dataclass
class CompressionResult:
    """``compression``: the replaced layers' dense storage over their compressed storage (both
    in bits, metadata and biases included); ``layers``: per replaced module name."""

    method: str
    layers: Dict[str, LayerCompression]

    @property
    def dense_bits(self) -> int:
        return sum(l.dense_bits for l in self.layers.values())

    @property
    def compressed_bits(self) -> int:
        return sum(l.compressed_bits for l in self.layers.values())

    @property
    def compression(self) -> float:
        return self.dense_bits / self.compressed_bits

    def as_dict(self) -> dict:
        return {"method": self.method, "compression": self.compression, "dense_bits": self.dense_bits,
                "compressed_bits": self.compressed_bits,
                "layers": {k: {**dataclasses.asdict(v), "compression": v.compression} for k, v in self.layers.items()}}
