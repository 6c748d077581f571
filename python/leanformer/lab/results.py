"""The one writer of result files: the training scripts, experiments, layer analyses and the
benchmark suite all write through this module.

A result is ``<folder>/<name>-<machine class>.json`` (with a ``.png`` beside it where there is a
plot): the latest result of one kind on one class of machine, so a new run replaces the last one
and git keeps the history. The JSON holds the numbers with torch, the commit and the machine
beside them. ``machine_class`` is ``cpu-avx512``, ``cpu-avx2``, ``cpu-portable`` (the vector tiles
leanformer's CPU kernels use) or ``cuda-<gpu name>``.

Plots need matplotlib (the ``lab`` and ``bench`` extras); without it the JSON is still
written and the plot helpers return ``""``.
"""
from __future__ import annotations

import json
import os
import platform
import re
import subprocess
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from leanformer import _C

# Where the scripts write by default: relative to the working directory, which is the source
# checkout's root when they run from there.
FOLDER = os.path.join("bench", "results")


def commit() -> str:
    """The checkout's short commit, ``+dirty`` when tracked files differ from it: a result
    measured on uncommitted code must not name a commit alone. ``"unknown"`` outside a git
    checkout (an installed package)."""
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        head = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# The code a run executes is the code it imported: a run that outlives a commit must still name
# the commit it started on, so the commit is read once, when the scripts import this module.
STARTED_ON = commit()


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: str = "cpu") -> dict:
    """The machine a result was measured on: ``platform``, ``cpu`` (the model name),
    ``cpu_count``, ``torch_threads``, ``python``, ``device``, ``cpu_vector_isa`` (``avx512``,
    ``avx2`` or ``portable``) and, for a CUDA device, ``gpu`` (its name)."""
    info = {"platform": platform.platform(), "cpu": _cpu_model(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "device": device, "cpu_vector_isa": _C.cpu_vector_isa()}
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def machine_class(info: Mapping) -> str:
    """The class of machine whose results compare: ``cuda-<gpu name, slugified>`` for a GPU
    result (e.g. ``cuda-nvidia-h100-80gb-hbm3``), else ``cpu-<vector ISA>`` (``cpu-avx512``,
    ``cpu-avx2``, ``cpu-portable``)."""
    if info.get("gpu"):
        return "cuda-" + _slug(info["gpu"])
    return "cpu-" + _slug(info.get("cpu_vector_isa") or "portable")


def stem(folder: str, name: str, device: str = "cpu") -> str:
    """``folder/name-<machine class>``: where the result ``name`` measured on ``device`` goes,
    without its extension."""
    return os.path.join(folder, f"{name}-{machine_class(machine(device))}")


def write_json(stem: str, data: dict, device: str = "cpu") -> str:
    """``stem.json``: ``data`` with ``torch``, ``commit`` and ``machine`` (:func:`machine` of
    ``device``) beside it, replacing an older file; returns the path. ``commit`` is the checkout
    when the run started; ``commit_at_write`` is added when the checkout changed (a commit, an
    edit) while it ran."""
    os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)
    now = commit()
    provenance = {"torch": torch.__version__, "commit": STARTED_ON, "machine": machine(device)}
    if now != STARTED_ON:
        provenance["commit_at_write"] = now
    with open(stem + ".json", "w") as f:
        json.dump({**data, **provenance}, f, indent=2)
    return stem + ".json"


def write(stem: str, summary: dict, curves: Dict[str, List[dict]], metric: str, ylabel: str,
          logy: bool = False) -> None:
    """``stem.json`` (summary, curves, machine) and ``stem.png`` (``metric`` against step and time)."""
    write_json(stem, {"summary": summary, "curves": curves})
    plot(stem, metric, ylabel, logy)


def _pyplot():
    """matplotlib.pyplot on the Agg backend, or None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _save(fig, path: str, dpi: int = 100) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    return path


def plot(stem: str, metric: str, ylabel: str, logy: bool = False) -> str:
    """``stem.png`` from ``stem.json``'s training curves: ``metric`` against training step and
    training time; returns the path (``""`` without matplotlib)."""
    plt = _pyplot()
    if plt is None:
        return ""
    with open(stem + ".json") as f:
        report = json.load(f)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, hist in report["curves"].items():
        axes[0].plot([h["step"] for h in hist], [h[metric] for h in hist], label=name)
        axes[1].plot([h["time_s"] for h in hist], [h[metric] for h in hist], label=name)
    for ax, xl in zip(axes, ("training step", "training time (s)")):
        ax.set_xlabel(xl)
        ax.set_ylabel(ylabel)
        if logy:  # an eval while PRepBN still decays can be off the chart: keep the others readable
            ax.set_yscale("log")
            top = min(max(h[metric] for h in hist) for hist in report["curves"].values())
            bottom = min(min(h[metric] for h in hist) for hist in report["curves"].values())
            ax.set_ylim(bottom * 0.8, top * 1.5)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{os.path.basename(stem)} · torch {report['torch']} · commit {report['commit']}", fontsize=9)
    path = _save(fig, stem + ".png")
    plt.close(fig)
    return path


def lines(stem: str, curves: Dict[str, Tuple[Sequence[float], Sequence[float]]], xlabel: str, ylabel: str, *,
          title: str = "", logy: bool = False, markers: bool = True) -> str:
    """``stem.png`` with one line per ``name: (xs, ys)``; returns the path (``""`` without matplotlib)."""
    plt = _pyplot()
    if plt is None:
        return ""
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, (xs, ys) in curves.items():
        ax.plot(list(xs), list(ys), marker="o" if markers else None, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or os.path.basename(stem), fontsize=9)
    path = _save(fig, stem + ".png")
    plt.close(fig)
    return path


def heatmaps(stem: str, tables: Dict[str, dict], metrics: Sequence[Tuple[str, str]], *, title: str = "",
             xlabel: str = "", ylabel: str = "") -> str:
    """``stem.png``: one heatmap per (metric, table), metrics as rows and tables as columns.
    Each table is ``{row: {column: {metric key: value in [0, 1]}}}``; ``metrics`` is a list of
    ``(key, label)``. Returns the path (``""`` without matplotlib)."""
    plt = _pyplot()
    if plt is None:
        return ""
    fig, axes = plt.subplots(len(metrics), len(tables), figsize=(5 * len(tables), 3.75 * len(metrics)),
                             squeeze=False)
    for r, (key, label) in enumerate(metrics):
        for c, (name, table) in enumerate(tables.items()):
            rows = sorted(table)
            cols = sorted(table[rows[0]])
            grid = [[table[i][j][key] for j in cols] for i in rows]
            ax = axes[r, c]
            im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", origin="lower", aspect="auto")
            for i, line in enumerate(grid):
                for j, v in enumerate(line):
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8,
                            color="white" if v < 0.6 else "black")
            ax.set_xticks(range(len(cols)), [str(j) for j in cols])
            ax.set_yticks(range(len(rows)), [str(i) for i in rows])
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.set_title(f"{label}: {name}", fontsize=9)
            fig.colorbar(im, ax=ax)
    fig.suptitle(title or os.path.basename(stem), fontsize=9)
    path = _save(fig, stem + ".png")
    plt.close(fig)
    return path


def ratios(stem: str, rows: Sequence[Mapping], *, title: str = "", label: Optional[str] = None) -> str:
    """``stem.png``: one horizontal bar per row, its speed-up over a baseline on a log scale,
    with the row's target (if any) as a black tick. A row holds ``speedup`` (None: not
    measured, left out), ``target`` (or None), ``met`` (True, False or None: green, red, blue)
    and the text of its label: ``label`` formats it from the row's keys (default
    ``"{op} {mode}\\n{shape} vs {baseline}"``). Returns the path (``""`` without matplotlib)."""
    plt = _pyplot()
    if plt is None:
        return ""
    label = label or "{op} {mode}\n{shape} vs {baseline}"
    rows = [r for r in rows if r.get("speedup")]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.5))
    ys = list(range(len(rows)))
    colors = ["tab:green" if r.get("met") else ("tab:red" if r.get("met") is False else "tab:blue") for r in rows]
    ax.barh(ys, [r["speedup"] for r in rows], color=colors)
    for y, r in zip(ys, rows):
        if r.get("target"):
            ax.plot([r["target"]] * 2, [y - 0.4, y + 0.4], color="black", lw=1.5)
    ax.set_xscale("log")
    ax.axvline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_yticks(ys, [label.format(**r) for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("speed-up over baseline (x, log scale; black tick = target)")
    ax.set_title(title or os.path.basename(stem), fontsize=8)
    path = _save(fig, stem + ".png", dpi=110)
    plt.close(fig)
    return path
