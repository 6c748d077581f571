import functools

import pytest
import torch

import leanformer  # noqa: F401  (loads the extension once for every test)
from leanformer import emu
from tests.helpers import EMU_UNAVAILABLE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _emulated_cuda(request):
    """A case whose `device` parameter is "emu" runs inside leanformer.emu.emulation() (the
    device string "emu" makes tensors whose leanformer ops run the emulated CUDA kernels), or
    skips with the reason the emulation is not available. There, gradcheck runs in fast mode
    (the Jacobian checked along random directions, a few evaluations per input rather than one
    per element): the slow mode's thousands of emulated launches cost minutes a case, and the
    CUDA backward kernels are also compared with the CPU's in the reference cases."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is None or callspec.params.get("device") != "emu":
        yield
        return
    if EMU_UNAVAILABLE:
        pytest.skip(EMU_UNAVAILABLE)
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(torch.autograd, "gradcheck", functools.partial(torch.autograd.gradcheck, fast_mode=True))
    try:
        with emu.emulation():
            yield
    finally:
        monkeypatch.undo()
