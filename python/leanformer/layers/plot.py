"""The plot every layer analysis writes beside its JSON: one or more named curves."""
from __future__ import annotations

import os
from typing import Dict, Sequence, Tuple


def lines(stem: str, curves: Dict[str, Tuple[Sequence[float], Sequence[float]]], xlabel: str, ylabel: str, *,
          title: str = "", logy: bool = False, markers: bool = True) -> str:
    """``stem.png`` with one line per ``name: (xs, ys)``; returns the path ("" without matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
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
    fig.tight_layout()
    fig.savefig(stem + ".png", dpi=100)
    plt.close(fig)
    return stem + ".png"
