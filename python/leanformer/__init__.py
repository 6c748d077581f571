"""leanformer: fused C++/CUDA kernels for efficient transformers, as drop-in torch ops.

``import leanformer`` loads the compiled kernels (:mod:`leanformer._extension`), the typed ops
(:mod:`leanformer.ops`) and the drop-in modules (:mod:`leanformer.nn`). The rest of the library
(``models``, ``decoding``, ``layers``, ``compress``, ``fold_batchnorm``, ``generate``, ...) is
imported the first time it is used, as ``leanformer.models`` or ``from leanformer import generate``.
The training scripts and experiments (:mod:`leanformer.lab`) are not part of the library.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

from leanformer import _extension

_extension.load()

from leanformer import nn, ops  # noqa: E402,F401  (the eager part of the public API)

__version__ = "0.1.0"

# name -> (module, attribute of it; None for the module itself), imported on first access.
_LAZY: Dict[str, Tuple[str, Optional[str]]] = {
    "analysis": ("leanformer.analysis", None),
    "compress": ("leanformer.compress", None),
    "convert": ("leanformer.convert", None),
    "decoding": ("leanformer.decoding", None),
    "fold": ("leanformer.fold", None),
    "layers": ("leanformer.layers", None),
    "models": ("leanformer.models", None),
    "reference": ("leanformer.reference", None),
    "sparse": ("leanformer.sparse", None),
    "training": ("leanformer.training", None),
    "fold_batchnorm": ("leanformer.fold", "fold_batchnorm"),
    "generate": ("leanformer.decoding", "generate"),
}

__all__ = sorted(["nn", "ops", "__version__", *_LAZY])

if TYPE_CHECKING:  # what the names are, for type checkers and IDEs; nothing is imported at run time
    from leanformer import analysis, compress, convert, decoding, fold, layers, models  # noqa: F401
    from leanformer import reference, sparse, training  # noqa: F401
    from leanformer.decoding import generate  # noqa: F401
    from leanformer.fold import fold_batchnorm  # noqa: F401


def __getattr__(name: str) -> Any:
    try:
        module, attribute = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'leanformer' has no attribute {name!r}") from None
    value = importlib.import_module(module)
    if attribute is not None:
        value = getattr(value, attribute)
    globals()[name] = value  # later accesses skip __getattr__
    return value


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(__all__))
