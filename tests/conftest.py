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
    skips with the reason the emulation is not available."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is None or callspec.params.get("device") != "emu":
        yield
        return
    if EMU_UNAVAILABLE:
        pytest.skip(EMU_UNAVAILABLE)
    with emu.emulation():
        yield
