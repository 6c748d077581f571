"""What the `leanformer layers` scripts share: the language model they train (SLA attention with
LayerNorm, so every exit sees the per-token norm the last layer does, and decoding has a
cache), the held-out pydoc windows, loading a saved model, and where results go."""
from __future__ import annotations

import argparse
from typing import Optional

from torch import Tensor

from leanformer.lab.data import pydoc_text
from leanformer.lab.results import FOLDER, stem
from leanformer.models import LMConfig, load_pretrained
from leanformer.training import sequential_windows


def lm_config(dim: int = 128, depth: int = 6, num_heads: int = 2) -> LMConfig:
    return LMConfig(vocab_size=256, dim=dim, depth=depth, num_heads=num_heads, attention="sla", norm="layernorm")


def parser(name: str, doc: str, *, model: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"leanformer layers {name}", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    if model:
        p.add_argument("--model", required=True, help="folder of a saved LM (save_pretrained)")
    p.add_argument("--length", type=int, default=64, help="tokens per validation window")
    p.add_argument("--windows", type=int, default=64, help="validation windows")
    p.add_argument("--out", default=FOLDER, help="folder of the result files")
    return p


def val_windows(length: int, windows: Optional[int]) -> Tensor:
    """Held-out pydoc windows ``[windows, length + 1]`` (the last topics, never trained on)."""
    _, val = pydoc_text()
    w = sequential_windows(val, length)
    return w if windows is None else w[:windows]


def load_lm(path: str):
    return load_pretrained(path).eval()


def result_stem(out: str, name: str) -> str:
    return stem(out, f"layers-{name}")

