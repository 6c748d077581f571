"""Where the training scripts write their results: a JSON with the machine, torch and commit
beside the numbers, and a PNG of the curves."""
from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
from typing import Dict, List

import torch

from leanformer import _C


def commit() -> str:
    """The checkout's short commit, ``+dirty`` when tracked files differ from it (as the bench
    suite marks its results): a result measured on uncommitted code must not name a commit alone."""
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


def stem(folder: str, name: str) -> str:
    """``folder/name-<UTC time>``: the path of one result, without its extension."""
    return os.path.join(folder, f"{name}-{dt.datetime.now(dt.timezone.utc).strftime('%Y%m%dT%H%M%SZ')}")


def machine() -> dict:
    return {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(), "cpu_vector_isa": _C.cpu_vector_isa()}


def write_json(stem: str, data: dict) -> str:
    """``stem.json``: ``data`` with torch, commit and machine beside it; returns the path.
    ``commit`` is the checkout when the run started; ``commit_at_write`` is added when the
    checkout changed (a commit, an edit) while it ran."""
    os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)
    now = commit()
    provenance = {"torch": torch.__version__, "commit": STARTED_ON, "machine": machine()}
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


def plot(stem: str, metric: str, ylabel: str, logy: bool = False) -> None:
    """``stem.png`` from ``stem.json``: ``metric`` against training step and training time."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
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
    fig.tight_layout()
    fig.savefig(stem + ".png", dpi=100)
    plt.close(fig)
