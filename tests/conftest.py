import pytest
import torch

import leanformer  # noqa: F401  (loads the extension once for every test)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def dtypes_for(device):
    """Every dtype the ops accept on that device (fp64 is for gradcheck, tested there)."""
    return [torch.float32, torch.bfloat16] + ([torch.float16] if device == "cuda" else [])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def assert_compiles_like_eager(f, args):
    """torch.compile(f, fullgraph=True) (aot_eager: the fake kernels and autograd through
    AOTAutograd, no codegen) gives eager's output and gradients w.r.t. every arg."""
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out, out_ref = compiled(*args), f(*args)
    torch.testing.assert_close(out, out_ref)
    for g, g_ref in zip(torch.autograd.grad(out.sum(), args), torch.autograd.grad(out_ref.sum(), args)):
        torch.testing.assert_close(g, g_ref)
