"""packed_linears: a context in which a model's ``nn.Linear`` layers run ``ops.packed_linear``
on prepacked weights, for decoding on the CPU (one token, or a token tree of a few dozen, per
forward). :func:`leanformer.generate` decodes inside it.

Inside the context each eligible layer (exactly ``nn.Linear``, float32 on the CPU) gets an
instance ``forward`` that calls the packed kernel for ``min_rows`` to ``max_rows`` rows, and
``F.linear`` otherwise: for one row where MKL's GEMV is as fast (AVX-512 CPUs; see
:data:`DEFAULT_MIN_ROWS`), for a long prompt's prefill (the BLAS GEMM is faster), or where
gradients are needed (the packed copy of the weight would not pass them on). Each path and
reason is logged the first time it is taken in a context (logger
``leanformer.nn.packed_linear_layers``, INFO). The packed weights are copies,
made on a layer's first packed call and refreshed when its weight changes in place; leaving
the context restores the layers and frees them, unless ``keep_packed=True`` (what
:func:`leanformer.generate` passes): then they stay with their layers for the next context
(packing takes milliseconds per model, which every generate call would pay again) until
:func:`release_packed`. Costs the packed linears' weight memory once more while kept.
Linears that are not modules (a drafter's heads stacked into one GEMM) join in through
:func:`packed_or_linear`; a SwiGLU MLP (a module with ``swiglu_linears()``, e.g. LlamaLM's)
runs its gate, up and silu product as one :func:`leanformer.ops.packed_swiglu`.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import weakref
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from leanformer.ops.packed_linear import pack_linear_weight, pack_swiglu_weight, packed_linear, packed_swiglu

logger = logging.getLogger(__name__)


#: Rows (tokens) from and up to which the packed kernel runs. As guidance on 2-core CPUs: the
#: packed kernel is about 2x F.linear at a few dozen rows (256 -> 1024) and close to it at a
#: hundred; at one row (a plain decoding step) it was 1.6-1.9x F.linear with AVX2 tiles (AMD),
#: 1.0-1.2x with AVX-512 ones (Intel), and SmolLM2-135M's plain greedy decoding ran 1.7-1.9x
#: faster packed on an AMD Zen 4 host with AVX-512 (MKL's GEMV reads ~9 GB/s there): single rows
#: are packed on every ISA.
DEFAULT_MIN_ROWS = 1
DEFAULT_MAX_ROWS = 128


class _Settings:
    """One open :func:`packed_linears` context: its row range and the paths it has logged."""

    def __init__(self, min_rows: int, max_rows: int):
        self.min_rows, self.max_rows, self.logged = min_rows, max_rows, set()

    def use_packed(self, x: Tensor, weight: Tensor, bias: Optional[Tensor], min_rows: Optional[int] = None) -> bool:
        rows = x.numel() // x.shape[-1] if x.dim() and x.shape[-1] else 0
        min_rows = self.min_rows if min_rows is None else min_rows
        if torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad or
                                        (bias is not None and bias.requires_grad)):
            why = "gradients needed"
        elif x.dtype != torch.float32 or weight.dtype != torch.float32 or x.device.type != "cpu":
            why = "not float32 on the CPU"
        elif rows < min_rows or rows > self.max_rows:
            why = f"{rows} rows, outside {min_rows}..{self.max_rows}"
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


def _linear(settings: Optional[_Settings], x: Tensor, weight: Tensor, bias: Optional[Tensor], cache: dict,
            min_rows: Optional[int] = None) -> Tensor:
    if settings is None or not settings.use_packed(x, weight, bias, min_rows):
        return F.linear(x, weight, bias)
    if cache.get("key") != _key(weight):
        with torch.no_grad():
            cache["packed"], cache["key"] = pack_linear_weight(weight.detach()), _key(weight)
    return packed_linear(x, cache["packed"], bias, weight.shape[0])


def packed_or_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], cache: dict,
                     min_rows: Optional[int] = None) -> Tensor:
    """``F.linear(x, weight, bias)``, through :func:`packed_linear` where an open
    :func:`packed_linears` context would pack an ``nn.Linear`` (``min_rows`` overrides the
    context's lower row bound for this weight). ``cache`` (a dict the caller keeps with the
    weight) holds the packed copy, remade when the weight changes."""
    return _linear(_ACTIVE.get(), x, weight, bias, cache, min_rows)


class _PackedForward:
    """The instance forward of one ``nn.Linear`` inside :func:`packed_linears`; the weight is
    packed on its first packed call (plain decoding, one row a step, never packs at all)."""

    def __init__(self, linear: nn.Linear, settings: _Settings):
        self.linear, self.settings, self.cache = linear, settings, {}

    def __call__(self, x: Tensor) -> Tensor:
        return _linear(self.settings, x, self.linear.weight, self.linear.bias, self.cache)


class _PackedSwiGLU:
    """The instance forward of a SwiGLU MLP (a module with ``swiglu_linears() -> (gate, up,
    down)``, gate and up without bias) inside :func:`packed_linears`: ``down(packed_swiglu(x))``,
    where the rows would be packed; the module's own forward elsewhere."""

    def __init__(self, module: nn.Module, settings: _Settings):
        self.module, self.settings, self.cache = module, settings, {}

    def __call__(self, x: Tensor) -> Tensor:
        gate, up, down = self.module.swiglu_linears()
        if gate.bias is not None or up.bias is not None or up.weight.requires_grad != gate.weight.requires_grad \
                or not self.settings.use_packed(x, gate.weight, None):
            return type(self.module).forward(self.module, x)
        key = (_key(gate.weight), _key(up.weight))
        if self.cache.get("key") != key:
            with torch.no_grad():
                self.cache["packed"] = pack_swiglu_weight(gate.weight.detach(), up.weight.detach())
            self.cache["key"] = key
        return down(packed_swiglu(x, self.cache["packed"], gate.out_features))


# module -> its packed-weight cache, for packed_linears(keep_packed=True); weak, so a model that
# is dropped takes its packed copies with it
_KEPT: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def release_packed(*modules: nn.Module) -> int:
    """Frees the packed weights that ``packed_linears(..., keep_packed=True)`` kept for the layers
    of ``modules``; returns how many layers had some."""
    n = 0
    for module in modules:
        if isinstance(module, nn.Module):
            for m in module.modules():
                n += _KEPT.pop(m, None) is not None
    return n


def _eligible(m: nn.Module) -> bool:
    """A plain fp32 nn.Linear on the CPU (not, e.g., a QuantizedLinear of a SwiGLU)."""
    return isinstance(m, nn.Linear) and m.weight.device.type == "cpu" and m.weight.dtype == torch.float32 and "forward" not in m.__dict__


@contextlib.contextmanager
def packed_linears(*modules: nn.Module, min_rows: int = DEFAULT_MIN_ROWS,
                   max_rows: int = DEFAULT_MAX_ROWS, keep_packed: bool = False) -> Iterator[int]:
    """Runs the ``nn.Linear`` layers of ``modules`` (float32, CPU) through
    :func:`leanformer.ops.packed_linear`, and their SwiGLU MLPs through
    :func:`leanformer.ops.packed_swiglu`, while the context is open; yields how many layers and
    MLPs it took over. Arguments that are not modules (None; a drafter such as
    ``layers.ShallowExitDrafter`` that runs the model's own layers) add nothing.
    ``keep_packed``: the packed weights outlive the context, for the next one to reuse (still
    repacked if a weight changed); :func:`release_packed` frees them.

    Example::

        >>> with torch.inference_mode(), packed_linears(model, drafter):
        ...     logits = model(tokens[:, None], cache=cache)   # a decoding step
    """
    if not 1 <= min_rows <= max_rows:
        raise ValueError(f"packed_linears: need 1 <= min_rows <= max_rows, got {min_rows} and {max_rows}")
    seen, patched, settings = set(), [], _Settings(min_rows, max_rows)
    try:
        for module in modules:
            if not isinstance(module, nn.Module):  # None, or a drafter made of the model's own layers
                continue
            for m in module.modules():
                if id(m) in seen:
                    continue
                if type(m) is nn.Linear and _eligible(m):
                    m.forward = _PackedForward(m, settings)
                elif hasattr(m, "swiglu_linears") and all(_eligible(lin) for lin in m.swiglu_linears()[:2]) \
                        and "forward" not in m.__dict__:
                    m.forward = _PackedSwiGLU(m, settings)
                else:
                    continue
                if keep_packed:
                    m.forward.cache = _KEPT.setdefault(m, {})
                seen.add(id(m))
                patched.append(m)
        token = _ACTIVE.set(settings)
        try:
            yield len(patched)
        finally:
            _ACTIVE.reset(token)
    finally:
        for m in patched:
            del m.forward
