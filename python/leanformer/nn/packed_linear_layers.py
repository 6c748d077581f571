"""packed_linears: a context in which a model's ``nn.Linear`` layers run ``ops.packed_linear``
on prepacked weights, for decoding on the CPU (one token, or a token tree of a few dozen, per
forward). :func:`leanformer.generate` decodes inside it.

Inside the context each eligible layer (exactly ``nn.Linear``, float32 on the CPU) gets an
instance ``forward`` that calls the packed kernel for up to ``max_rows`` rows, and
``F.linear`` for more (a prompt's prefill: the BLAS GEMM is the faster call there) or where
gradients are needed (the packed copy of the weight would not pass them on). Each switch of
path is logged (logger ``leanformer.nn.packed_linear_layers``, INFO). The packed weights are copies,
refreshed when a weight changes in place; leaving the context restores the layers and frees
them. Costs the linears' weight memory once more while active.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from leanformer.ops.packed_linear import pack_linear_weight, packed_linear

logger = logging.getLogger(__name__)

#: Rows (tokens) up to which the packed kernel runs; measured on the 2-core AVX-512 dev machine,
#: it beats F.linear by about 2x at 19 rows and 1.1x at 76 (256 -> 1024).
DEFAULT_MAX_ROWS = 128


class _PackedForward:
    """The instance forward of one ``nn.Linear`` inside :func:`packed_linears`."""

    def __init__(self, linear: nn.Linear, max_rows: int, state: dict):
        self.linear, self.max_rows, self.state = linear, max_rows, state
        self._pack()

    def _pack(self) -> None:
        w = self.linear.weight
        with torch.no_grad():
            self.packed = pack_linear_weight(w.detach())
        self.key = self._key(w)

    @staticmethod
    def _key(w: Tensor) -> tuple:
        # inference tensors keep no version counter; they cannot be changed in place outside
        # inference mode either, so their storage identifies them
        return (w.data_ptr(), None if w.is_inference() else w._version)

    def _path(self, path: str, rows: int) -> None:
        if self.state.get("path") != path:
            self.state["path"] = path
            logger.info("packed_linears: %s for %d rows (packed up to %d rows, F.linear beyond or with "
                        "gradients)", path, rows, self.max_rows)

    def __call__(self, x: Tensor) -> Tensor:
        lin = self.linear
        rows = x.numel() // x.shape[-1] if x.dim() and x.shape[-1] else 0
        needs_grad = torch.is_grad_enabled() and (lin.weight.requires_grad or x.requires_grad or
                                                  (lin.bias is not None and lin.bias.requires_grad))
        if rows > self.max_rows or needs_grad or x.dtype != self.packed.dtype or x.device != self.packed.device:
            self._path("F.linear", rows)
            return F.linear(x, lin.weight, lin.bias)
        if self._key(lin.weight) != self.key:
            self._pack()
        self._path("packed_linear", rows)
        return packed_linear(x, self.packed, lin.bias, lin.out_features)


@contextlib.contextmanager
def packed_linears(*modules: nn.Module, max_rows: int = DEFAULT_MAX_ROWS) -> Iterator[int]:
    """Runs the ``nn.Linear`` layers of ``modules`` (float32, CPU) through
    :func:`leanformer.ops.packed_linear` while the context is open; yields how many it packed.

    Example::

        >>> with torch.inference_mode(), packed_linears(model, drafter):
        ...     logits = model(tokens[:, None], cache=cache)   # a decoding step
    """
    if max_rows < 1:
        raise ValueError(f"packed_linears: max_rows must be >= 1, got {max_rows}")
    seen, patched, state = set(), [], {}
    try:
        for module in modules:
            if module is None:
                continue
            for m in module.modules():
                if (type(m) is nn.Linear and id(m) not in seen and m.weight.device.type == "cpu"
                        and m.weight.dtype == torch.float32 and "forward" not in m.__dict__):
                    seen.add(id(m))
                    m.forward = _PackedForward(m, max_rows, state)
                    patched.append(m)
        yield len(patched)
    finally:
        for m in patched:
            del m.forward
