"""Timing, tables, JSON and plots shared by every benchmark file of the suite."""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import platform
import subprocess
from typing import Callable, Dict, List, Optional

import torch
from torch.utils.benchmark import Timer

from leanformer import _C


@dataclasses.dataclass(frozen=True)
class Case:
    """One op at one shape and pass: leanformer's function and its baselines, all timed in
    the same run. `targets` maps a baseline name to the speed-up the project aims for."""

    op: str
    shape: str
    mode: str  # "fwd", "fwd+bwd" or "step"
    ours: Callable[[], object]
    baselines: Dict[str, Callable[[], object]]
    targets: Dict[str, float] = dataclasses.field(default_factory=dict)
    # Seconds per timing for calls so long that the suite's default would give one or two runs.
    min_run_time: Optional[float] = None


@dataclasses.dataclass(frozen=True)
class Timing:
    op: str
    shape: str
    mode: str
    impl: str
    median_ms: Optional[float]
    iqr_ms: Optional[float]
    runs: int
    error: Optional[str] = None


# Rounds per case: leanformer and its baselines take turns, each timed for 1/ROUNDS of the
# run time per round, so that a drift of the host's speed (a third within seconds on a shared
# 2-core VM) lands on both sides of a ratio instead of on whichever was timed during it.
ROUNDS = 3


def time_callable(fn: Callable[[], object], min_run_time: float) -> List[float]:
    """Per-call seconds of blocked runs (torch.utils.benchmark synchronizes CUDA). Timer runs on
    one thread unless told otherwise; time with the threads torch uses (and the results
    record), as a user's model would run."""
    m = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=min_run_time)
    return list(m.times)


def run_case(case: Case, min_run_time: float) -> List[Timing]:
    """Every implementation of the case, timed in ROUNDS alternating rounds after a warm-up
    call each: the median and interquartile range of all their blocked runs."""
    impls = [("leanformer", case.ours), *case.baselines.items()]
    per_round = max(min_run_time, case.min_run_time or 0.0) / ROUNDS
    times: Dict[str, List[float]] = {}
    errors: Dict[str, str] = {}
    for impl, fn in impls:
        try:
            fn()
            times[impl] = []
        except Exception as e:  # a baseline that cannot run here is reported, not fatal
            errors[impl] = f"{type(e).__name__}: {e}"[:300]
    for _ in range(ROUNDS):
        for impl, fn in impls:
            if impl in times:
                try:
                    times[impl] += time_callable(fn, per_round)
                except Exception as e:
                    errors[impl] = f"{type(e).__name__}: {e}"[:300]
                    del times[impl]
    out = []
    for impl, _ in impls:
        if impl in errors:
            out.append(Timing(case.op, case.shape, case.mode, impl, None, None, 0, errors[impl]))
            continue
        t = torch.tensor(times[impl], dtype=torch.float64)
        q1, med, q3 = torch.quantile(t, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)).tolist()
        out.append(Timing(case.op, case.shape, case.mode, impl, med * 1e3, (q3 - q1) * 1e3, len(times[impl])))
    return out


def speedups(cases: List[Case], timings: List[Timing]) -> List[dict]:
    """One row per (case, baseline): the ratio baseline time / leanformer time."""
    by_key = {(t.op, t.shape, t.mode, t.impl): t for t in timings}
    rows = []
    for c in cases:
        ours = by_key[(c.op, c.shape, c.mode, "leanformer")]
        for name in c.baselines:
            base = by_key[(c.op, c.shape, c.mode, name)]
            ratio = (base.median_ms / ours.median_ms
                     if ours.median_ms and base.median_ms else None)
            target = c.targets.get(name)
            rows.append({
                "op": c.op, "shape": c.shape, "mode": c.mode, "baseline": name,
                "leanformer_ms": ours.median_ms, "baseline_ms": base.median_ms,
                "speedup": ratio, "target": target,
                "met": None if target is None or ratio is None else ratio >= target,
                "error": base.error or ours.error,
            })
    return rows


def format_table(rows: List[dict]) -> str:
    header = ["op", "shape", "pass", "leanformer ms", "baseline", "baseline ms", "speed-up", "target"]
    lines = [header]
    for r in rows:
        fmt = lambda x: "-" if x is None else f"{x:.3f}"
        target = "" if r["target"] is None else f">= {r['target']:g}x " + ("met" if r["met"] else "BELOW")
        speed = "error" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        lines.append([r["op"], r["shape"], r["mode"], fmt(r["leanformer_ms"]), r["baseline"],
                      fmt(r["baseline_ms"]), speed, target])
    widths = [max(len(str(l[i])) for l in lines) for i in range(len(header))]
    text = ["  ".join(str(c).ljust(w) for c, w in zip(l, widths)).rstrip() for l in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    errors = [f"  {r['op']} {r['shape']} {r['mode']} {r['baseline']}: {r['error']}" for r in rows if r["error"]]
    return "\n".join(text + (["errors:"] + errors if errors else []))


def machine_info(device: str) -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "device": device, "cpu_vector_isa": _C.cpu_vector_isa()}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def git_commit(repo: str) -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_results(path_stem: str, device: str, repo: str, timings: List[Timing], rows: List[dict],
                  extra: Optional[dict] = None) -> dict:
    report = {
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "commit": git_commit(repo),
        "timings": [dataclasses.asdict(t) for t in timings],
        "speedups": rows,
        **(extra or {}),
    }
    with open(path_stem + ".json", "w") as f:
        json.dump(report, f, indent=1)
    plot(rows, path_stem + ".png", title=f"leanformer {report['commit'][:12]} · torch {torch.__version__} · "
                                         f"{report['machine'].get('gpu', report['machine']['cpu'])}")
    return report


def plot(rows: List[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["speedup"]]
    labels = [f"{r['op']} {r['mode']}\n{r['shape']} vs {r['baseline']}" for r in rows]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.5))
    ys = range(len(rows))
    colors = ["tab:green" if r["met"] else ("tab:red" if r["met"] is False else "tab:blue") for r in rows]
    ax.barh(list(ys), [r["speedup"] for r in rows], color=colors)
    for y, r in zip(ys, rows):
        if r["target"]:
            ax.plot([r["target"]] * 2, [y - 0.4, y + 0.4], color="black", lw=1.5)
    ax.set_xscale("log")
    ax.axvline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_yticks(list(ys), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("speed-up over baseline (x, log scale; black tick = target)")
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
