import pytest
import torch

import leanformer  # noqa: F401  (loads the extension once for every test)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
