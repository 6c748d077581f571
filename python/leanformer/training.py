"""The training loop the library's trainers (drafter distillation, 2DMSE) and the training
scripts share: AdamW, linear warm-up then cosine decay, gradient clipping, a progress bar, and
periodic evaluation recorded with step and wall time; and the windows of a token stream they
train and evaluate on."""
from __future__ import annotations

import math
import sys
import time
from typing import Callable, Dict, Iterator, List

import torch
from torch import Tensor, nn
from tqdm import tqdm


def train(model: nn.Module, batches: Iterator, loss_fn: Callable[[nn.Module, object], Tensor], *,
          steps: int, lr: float, evaluate: Callable[[nn.Module], Dict[str, float]], eval_every: int,
          weight_decay: float = 0.05, warmup: int = 50, clip: float = 1.0, desc: str = "train") -> List[dict]:
    """Trains ``model`` for ``steps`` steps; returns the history of evaluations, each
    ``{"step", "time_s" (training time only), **evaluate(model)}``."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    history, train_time = [], 0.0
    # One bar per job, not per rank, under torch.distributed.
    rank0 = not (torch.distributed.is_available() and torch.distributed.is_initialized()) or torch.distributed.get_rank() == 0
    bar = tqdm(range(steps), desc=desc, unit="step", file=sys.stderr, disable=not rank0)
    for step in bar:
        model.train()
        t0 = time.perf_counter()
        loss = loss_fn(model, next(batches))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{desc}: loss is {loss.item()} at step {step}")
        nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        sched.step()
        train_time += time.perf_counter() - t0
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            model.eval()
            with torch.no_grad():
                metrics = evaluate(model)
            history.append({"step": step + 1, "time_s": round(train_time, 2), **metrics})
            bar.set_postfix(loss=f"{loss.item():.3f}", **{k: f"{v:.4g}" for k, v in metrics.items()})
    return history


def random_windows(tokens: Tensor, batch: int, length: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Endless batches ``[batch, length + 1]`` of random windows (inputs and shifted targets)."""
    if len(tokens) <= length + 1:
        raise ValueError(f"the text ({len(tokens)} tokens) is shorter than one window ({length + 1})")
    while True:
        start = torch.randint(0, len(tokens) - length - 1, (batch,), generator=generator)
        yield torch.stack([tokens[s:s + length + 1] for s in start.tolist()])


def sequential_windows(tokens: Tensor, length: int) -> Tensor:
    """Non-overlapping windows ``[n, length + 1]`` covering ``tokens`` (for evaluation)."""
    n = (len(tokens) - 1) // length
    return torch.stack([tokens[i * length:i * length + length + 1] for i in range(n)])
