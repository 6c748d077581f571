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
