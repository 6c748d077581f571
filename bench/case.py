"""One benchmark case: leanformer's function at one op, shape and pass, beside its baselines.

Each ``bench_<family>.py`` builds its cases with ``cases(device, dtype, quick)`` and times them
with one test function; ``bench/conftest.py`` turns every (case, implementation, round) into a
pytest-benchmark test, in the order that makes leanformer and its baselines take turns.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable, Dict, List, Optional, Sequence

import pytest
import torch

LEANFORMER = "leanformer"


@dataclasses.dataclass(frozen=True)
class Case:
    """`ours` is leanformer's call and `baselines` the code a user would otherwise run, all
    timed in the same run. `targets` maps a baseline name to the speed-up the project aims
    for (baseline time / leanformer time)."""

    op: str
    shape: str
    mode: str  # "fwd", "fwd+bwd" or "step"
    ours: Callable[[], object]
    baselines: Dict[str, Callable[[], object]]
    targets: Dict[str, float] = dataclasses.field(default_factory=dict)
    # Seconds per implementation (all rounds together) for calls so long that the suite's
    # default run time would give one or two runs.
    min_run_time: Optional[float] = None

    @property
    def group(self) -> str:
        """The pytest-benchmark group: one table with leanformer beside its baselines."""
        return f"{self.op} {self.shape} {self.mode}"

    @property
    def id(self) -> str:
        """The case's part of the test id: the group without spaces or brackets."""
        return re.sub(r"[\s,]+", "_", re.sub(r"[()\[\]]", "", f"{self.op}-{self.shape}-{self.mode}"))

    @property
    def impls(self) -> List[str]:
        return [LEANFORMER, *self.baselines]

    def implementation(self, impl: str) -> Callable[[], object]:
        return self.ours if impl == LEANFORMER else self.baselines[impl]


def bench_cases(builder: Callable[..., List[Case]], devices: Optional[Sequence[str]] = None):
    """Marks a test function ``(benchmark, case, impl, bench_round)`` to time every
    implementation of each case ``builder(device, dtype, quick)`` returns, in alternating rounds
    (bench/conftest.py parametrizes it). ``devices``: where the cases exist (others skip)."""
    return pytest.mark.bench_cases.with_args(builder, devices=tuple(devices) if devices else None)


def time_case(benchmark, case: Case, impl: str, bench_round: int) -> None:
    """Times one implementation of `case` in one round. A baseline that cannot run here (a
    missing library, no kernel for this dtype) is skipped with its error, which the ratio
    table reports; leanformer's own failure fails the test."""
    benchmark.group = case.group
    benchmark.extra_info.update(op=case.op, shape=case.shape, mode=case.mode, impl=impl,
                                round=bench_round, target=case.targets.get(impl))
    try:
        benchmark(case.implementation(impl))
    except Exception as e:
        if impl == LEANFORMER:
            raise
        pytest.skip(f"baseline {impl} cannot run here: {type(e).__name__}: {e}"[:300])


def label(shape) -> str:
    return "x".join(map(str, shape))


def run_all(fn: Callable[..., object], args_list: Sequence[tuple]) -> None:
    """``fn(*args)`` for each args of ``args_list`` under inference mode, as ``generate`` runs
    decoding: a case that cycles through several weights (each larger than the caches, or together)."""
    with torch.inference_mode():
        for args in args_list:
            fn(*args)
