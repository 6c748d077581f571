"""Running the layer methods' training loops under ``torchrun``: a gloo (CPU) or NCCL process
group from the environment torchrun sets, DistributedDataParallel around the trained module,
and results written by rank 0 only."""
from __future__ import annotations

import os
from typing import Tuple

import torch
import torch.distributed as dist
from torch import nn


def setup() -> Tuple[int, int]:
    """``(rank, world_size)``; joins the process group when launched by torchrun with more
    than one process (``(0, 1)`` otherwise)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def wrap(module: nn.Module) -> nn.Module:
    """``module`` in DistributedDataParallel when a process group is up (gradients averaged
    over the ranks), else unchanged."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return module
    return nn.parallel.DistributedDataParallel(module)


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0
