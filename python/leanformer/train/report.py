"""Where the training scripts write their results: a JSON with the machine, torch and commit
beside the numbers, and a PNG of the curves."""
from __future__ import annotations

import json
import os
import platform
import subprocess
from typing import Dict, List

import torch


def commit() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write(stem: str, summary: dict, curves: Dict[str, List[dict]], metric: str, ylabel: str) -> None:
    """``stem.json`` (summary, curves, machine) and ``stem.png`` (``metric`` against step and time)."""
    os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)
    report = {"summary": summary, "curves": curves, "torch": torch.__version__, "commit": commit(),
              "machine": {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                          "threads": torch.get_num_threads()}}
    with open(stem + ".json", "w") as f:
        json.dump(report, f, indent=2)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, hist in curves.items():
        axes[0].plot([h["step"] for h in hist], [h[metric] for h in hist], label=name)
        axes[1].plot([h["time_s"] for h in hist], [h[metric] for h in hist], label=name)
    for ax, xl in zip(axes, ("training step", "training time (s)")):
        ax.set_xlabel(xl)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{os.path.basename(stem)} · torch {torch.__version__} · commit {report['commit']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(stem + ".png", dpi=100)
    plt.close(fig)
