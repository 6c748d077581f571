"""packed_linears: a context in which a model's ``nn.Linear`` layers run ``ops.packed_linear``
on prepacked weights, for decoding on the CPU (one token, or a token tree of a few dozen, per
forward). :func:`leanformer.generate` decodes inside it.

Inside the context each eligible layer (exactly ``nn.Linear``, float32 on the CPU) gets an
instance ``forward`` that calls the packed kernel for ``min_rows`` to ``max_rows`` rows, and
``F.linear`` otherwise: for one row (MKL's GEMV is as fast there), for a long prompt's
prefill (the BLAS GEMM is faster), or where gradients are needed (the packed copy of the
weight would not pass them on). Each path and reason is logged the first time it is taken in
a context (logger ``leanformer.nn.packed_linear_layers``, INFO). The packed weights are copies,
refreshed when a weight changes in place; leaving the context restores the layers and frees
them. Costs the linears' weight memory once more while active. Linears that are not modules
(a drafter's heads stacked into one GEMM) join in through :func:`packed_or_linear`.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from leanformer.ops.packed_linear import pack_linear_weight, packed_linear

logger = logging.getLogger(__name__)

#: Rows (tokens) from and up to which the packed kernel runs. Measured on the 2-core AVX-512 dev
#: machine: about 2x F.linear at 19 rows and 1.1x at 76 (256 -> 1024); at one row (a plain
#: decoding step) MKL's GEMV reads the weight at least as fast, and a LlamaLM step was ~5% slower
#: packed, so single rows stay on F.linear.
DEFAULT_MIN_ROWS = 2
DEFAULT_MAX_ROWS = 128


class _Settings:
    """One open :func:`packed_linears` context: its row range and the paths it has logged."""

    def __init__(self, min_rows: int, max_rows: int):
        self.min_rows, self.max_rows, self.logged = min_rows, max_rows, set()

    def use_packed(self, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> bool:
        rows = x.numel() // x.shape[-1] if x.dim() and x.shape[-1] else 0
        if torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad or
                                        (bias is not None and bias.requires_grad)):
            why = "gradients needed"
        elif x.dtype != torch.float32 or weight.dtype != torch.float32 or x.device.type != "cpu":
            why = "not float32 on the CPU"
        elif rows < self.min_rows or rows > self.max_rows:
            why = f"{rows} rows, outside {self.min_rows}..{self.max_rows}"
        else:
            why = None
        path = "F.linear" if why else "packed_linear"
        if (path, why) not in self.logged:  # once per context and reason, not once per call
            self.logged.add((path, why))
            logger.info("packed_linears: %s%s", path, f" ({why})" if why else f" for {rows} rows")
        return why is None


# The innermost open packed_linears context (None outside one): linears that are not nn.Linear
# modules (a drafter's stacked heads) follow it through packed_or_linear.
_ACTIVE: contextvars.ContextVar[Optional[_Settings]] = contextvars.ContextVar("packed_linears", default=None)


def _key(w: Tensor) -> tuple:
    # inference tensors keep no version counter; they cannot be changed in place outside
    # inference mode either, so their storage identifies them
    return (w.data_ptr(), None if w.is_inference() else w._version)


def _linear(settings: Optional[_Settings], x: Tensor, weight: Tensor, bias: Optional[Tensor], cache: dict) -> Tensor:
    if settings is None or not settings.use_packed(x, weight, bias):
        return F.linear(x, weight, bias)
    if cache.get("key") != _key(weight):
        with torch.no_grad():
            cache["packed"], cache["key"] = pack_linear_weight(weight.detach()), _key(weight)
    return packed_linear(x, cache["packed"], bias, weight.shape[0])


def packed_or_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], cache: dict) -> Tensor:
    """``F.linear(x, weight, bias)``, through :func:`packed_linear` where an open
    :func:`packed_linears` context would pack an ``nn.Linear``. ``cache`` (a dict the caller
    keeps with the weight) holds the packed copy, remade when the weight changes."""
    return _linear(_ACTIVE.get(), x, weight, bias, cache)


class _PackedForward:
    """The instance forward of one ``nn.Linear`` inside :func:`packed_linears` (packed on entry)."""

    def __init__(self, linear: nn.Linear, settings: _Settings):
        self.linear, self.settings = linear, settings
        with torch.no_grad():
            self.cache = {"packed": pack_linear_weight(linear.weight.detach()), "key": _key(linear.weight)}

    def __call__(self, x: Tensor) -> Tensor:
        return _linear(self.settings, x, self.linear.weight, self.linear.bias, self.cache)


@contextlib.contextmanager
def packed_linears(*modules: nn.Module, min_rows: int = DEFAULT_MIN_ROWS,
                   max_rows: int = DEFAULT_MAX_ROWS) -> Iterator[int]:
    """Runs the ``nn.Linear`` layers of ``modules`` (float32, CPU) through
    :func:`leanformer.ops.packed_linear` while the context is open; yields how many it packed.

    Example::

        >>> with torch.inference_mode(), packed_linears(model, drafter):
        ...     logits = model(tokens[:, None], cache=cache)   # a decoding step
    """
    if not 1 <= min_rows <= max_rows:
        raise ValueError(f"packed_linears: need 1 <= min_rows <= max_rows, got {min_rows} and {max_rows}")
    seen, patched, settings = set(), [], _Settings(min_rows, max_rows)
    try:
        for module in modules:
            if module is None:
                continue
            for m in module.modules():
                if (type(m) is nn.Linear and id(m) not in seen and m.weight.device.type == "cpu"
                        and m.weight.dtype == torch.float32 and "forward" not in m.__dict__):
                    seen.add(id(m))
                    m.forward = _PackedForward(m, settings)
                    patched.append(m)
        token = _ACTIVE.set(settings)
        try:
            yield len(patched)
        finally:
            _ACTIVE.reset(token)
    finally:
        for m in patched:
            del m.forward
