"""RepBN and PRepBN: the BatchNorm of SLAB that replaces LayerNorm and folds away at inference."""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from leanformer.ops.rep_batchnorm import progressive_norm, rep_batchnorm
from leanformer.ops.rep_batchnorm import sync_progressive_norm, sync_rep_batchnorm


class _SharedGroup:
    """Holds a process group, which copy.deepcopy shares rather than copies: a communicator,
    not state (a ProcessGroup does not pickle, and fold_batchnorm and EMA copies deepcopy)."""

    def __init__(self, group):
        if group is not None:
            if not dist.is_available():
                raise RuntimeError("process_group was given but this torch has no torch.distributed")
            if not isinstance(group, dist.ProcessGroup):
                raise TypeError("process_group must be a torch.distributed.ProcessGroup (e.g. from "
                                "torch.distributed.new_group) or None for the default group, got "
                                f"{type(group).__name__}")
        self.group = group

    def __deepcopy__(self, memo):
        return self


class RepBN(nn.Module):
    """``RepBN(x) = BatchNorm(x) + alpha * x`` over the channels of ``x [..., C]``, statistics
    over every token (SLAB, Guo et al. ICML 2024).

    Args:
        num_features: C.
        alpha_init: initial alpha (1 in SLAB's vision models; the LLM variant uses 0).
        weight_init: initial BN weight (1; the LLM variant uses 0).
        momentum, eps: as in ``nn.BatchNorm1d``.
        process_group: the ``torch.distributed`` group whose ranks share the batch statistics
            in training; None is the default (WORLD) group.
        sync_stats: False keeps per-rank statistics even under ``torch.distributed``.

    Data parallelism: in training, when ``torch.distributed`` is initialized and the group has
    more than one rank (and ``sync_stats``), the statistics are those of the batch over every
    rank, as ``nn.SyncBatchNorm`` computes them: outputs, input gradients and running buffers
    (identical on every rank) are each rank's share of one process running the concatenated
    batch; parameter gradients are local, for DDP to reduce. Every rank must run each training
    forward and backward. That path is eager only: under ``torch.compile`` it raises.

    ``forward(x, mask=None)``: ``mask`` (bool, ``x.shape[:-1]``) marks the tokens that enter
    the statistics (padding excluded). In eval it normalizes with the running statistics, and
    refuses to run before any training step has produced them.
    """

    def __init__(self, num_features: int, *, alpha_init: float = 1.0, weight_init: float = 1.0,
                 momentum: float = 0.1, eps: float = 1e-5, process_group=None, sync_stats: bool = True):
        super().__init__()
        self._group = _SharedGroup(process_group)
        self.num_features, self.momentum, self.eps = num_features, momentum, eps
        self.sync_stats = sync_stats
        self.weight = nn.Parameter(torch.full((num_features,), float(weight_init)))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.alpha = nn.Parameter(torch.full((1,), float(alpha_init)))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long))

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        if x.shape[-1] != self.num_features:
            raise ValueError(f"x must be [..., {self.num_features}] (channels last), got {tuple(x.shape)}")
        if not self.training and self.num_batches_tracked.item() == 0:
            raise RuntimeError("RepBN in eval has no running statistics: it was never run in training "
                               "mode (train it, or load a state_dict that has them)")
        if self.training:
            self.num_batches_tracked.add_(1)
            if self.synchronized():
                return sync_rep_batchnorm(x, self.weight, self.bias, self.alpha, self.running_mean,
                                          self.running_var, process_group=self.process_group,
                                          momentum=self.momentum, eps=self.eps, mask=mask)
        return rep_batchnorm(x, self.weight, self.bias, self.alpha, self.running_mean, self.running_var,
                             training=self.training, momentum=self.momentum, eps=self.eps, mask=mask)

    @property
    def process_group(self):
        """The group whose ranks share the statistics (None: the default group)."""
        return self._group.group

    @process_group.setter
    def process_group(self, group) -> None:
        self._group = _SharedGroup(group)

    def synchronized(self) -> bool:
        """Whether a training forward now uses the statistics of every rank of the group."""
        if not self.sync_stats or not dist.is_available():
            return False
        return dist.is_initialized() and dist.get_world_size(self.process_group) > 1

    def extra_repr(self) -> str:
        return f"{self.num_features}, momentum={self.momentum}, eps={self.eps}" + (
            "" if self.sync_stats else ", sync_stats=False")


class PRepBN(nn.Module):
    """Progressive RepBN: ``gamma * LayerNorm(x) + (1 - gamma) * RepBN(x)`` while training, with
    gamma 1 for ``warmup_steps`` training steps, then decaying linearly to 0 over
    ``total_steps`` steps, then 0. In eval it is pure RepBN (``self.bn``), which is what folds
    into the neighbouring Linear.

    The step counter is a buffer (``step``): it is saved and restored with the state_dict and
    advances once per training forward. End the decay well before training does (SLAB's
    authors' advice): ending it at about 60% of the steps is safe, at 80% training can diverge
    to NaN.

    The training forward reads the counter on the host (gamma is a Python float for the
    kernel), so ``torch.compile(fullgraph=True)`` applies to the eval forward.

    ``process_group`` and ``sync_stats`` are :class:`RepBN`'s (kept on ``self.bn``): under
    ``torch.distributed`` the RepBN statistics are those of the batch over every rank.
    """

    def __init__(self, num_features: int, total_steps: int, warmup_steps: int = 0, *,
                 alpha_init: float = 1.0, weight_init: float = 1.0, momentum: float = 0.1,
                 eps: float = 1e-5, process_group=None, sync_stats: bool = True):
        super().__init__()
        if total_steps < 0 or warmup_steps < 0:
            raise ValueError(f"total_steps ({total_steps}) and warmup_steps ({warmup_steps}) must be >= 0")
        self.num_features, self.total_steps, self.warmup_steps = num_features, total_steps, warmup_steps
        self.ln = nn.LayerNorm(num_features, eps=eps)
        self.bn = RepBN(num_features, alpha_init=alpha_init, weight_init=weight_init,
                        momentum=momentum, eps=eps, process_group=process_group, sync_stats=sync_stats)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def gamma(self) -> float:
        step = int(self.step.item())
        if step < self.warmup_steps:
            return 1.0
        if self.total_steps == 0:
            return 0.0
        return max(0.0, 1.0 - (step - self.warmup_steps) / self.total_steps)

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        if not self.training:
            return self.bn(x, mask)
        if x.shape[-1] != self.num_features:
            raise ValueError(f"x must be [..., {self.num_features}] (channels last), got {tuple(x.shape)}")
        gamma = self.gamma()
        self.step.add_(1)
        self.bn.num_batches_tracked.add_(1)
        bn = self.bn
        if bn.synchronized():
            return sync_progressive_norm(x, self.ln.weight, self.ln.bias, bn.weight, bn.bias, bn.alpha,
                                         bn.running_mean, bn.running_var, gamma,
                                         process_group=bn.process_group, momentum=bn.momentum,
                                         ln_eps=self.ln.eps, bn_eps=bn.eps, mask=mask)
        return progressive_norm(x, self.ln.weight, self.ln.bias, bn.weight, bn.bias, bn.alpha,
                                bn.running_mean, bn.running_var, gamma, training=True,
                                momentum=bn.momentum, ln_eps=self.ln.eps, bn_eps=bn.eps, mask=mask)

    def extra_repr(self) -> str:
        return f"{self.num_features}, total_steps={self.total_steps}, warmup_steps={self.warmup_steps}"
