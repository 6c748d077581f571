"""Loads leanformer._C, the compiled kernels, or fails with the way to fix it.

There is no pure-Python fallback: without the extension, leanformer does not import.
"""
from __future__ import annotations

import json
import os
from typing import Any

import torch

_REBUILD = "pip install --no-build-isolation --force-reinstall --no-deps -e ."


def build_config() -> dict[str, Any]:
    path = os.path.join(os.path.dirname(__file__), "_build_config.json")
    try:
        with open(path) as f:
            return json.load(f)
    except OSError:
        return {}


def load() -> None:
    config = build_config()
    built_for = config.get("torch")
    if built_for is not None and built_for != torch.__version__:
        raise ImportError(
            f"leanformer._C was built against torch {built_for}, but torch {torch.__version__} "
            f"is installed. Rebuild it against this torch from the source checkout: {_REBUILD} "
            f"(or install torch=={built_for})."
        )
    try:
        from leanformer import _C  # noqa: F401  (registers the torch.ops.leanformer ops)
    except ImportError as e:
        raise ImportError(
            f"leanformer's compiled extension leanformer._C could not be loaded ({e}). "
            f"It must be built against the installed torch {torch.__version__}"
            + (f" (it was built against torch {built_for})" if built_for else "")
            + f": from the source checkout run {_REBUILD}"
        ) from e
