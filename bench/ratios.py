"""The speed-up of leanformer over each baseline, from the suite's per-round timings.

Within one round every implementation of a case runs one after another, so the ratio of a
baseline's time to leanformer's in that round compares them under the same load; the suite
reports the median of those per-round ratios and their range (min-max) over the rounds.
"""
from __future__ import annotations

import statistics
from typing import Dict, Iterable, List, Mapping, Optional

from bench.case import LEANFORMER


def ratio_rows(records: Iterable[Mapping]) -> List[dict]:
    """One row per (case, baseline). Each record is one timed test: ``family``, ``op``,
    ``shape``, ``mode``, ``impl``, ``round``, ``median_s`` (None if it did not run),
    ``error`` and ``targets`` (the case's baseline -> target speed-up)."""
    cases: Dict[tuple, dict] = {}
    for r in records:
        key = (r["family"], r["op"], r["shape"], r["mode"])
        case = cases.setdefault(key, {"targets": r["targets"], "impls": {}})
        impl = case["impls"].setdefault(r["impl"], {"times": {}, "errors": []})
        if r["median_s"] is not None:
            impl["times"][r["round"]] = r["median_s"]
        if r["error"]:
            impl["errors"].append(r["error"])
    rows = []
    for (family, op, shape, mode), case in cases.items():
        ours = case["impls"].get(LEANFORMER, {"times": {}, "errors": ["not run"]})
        for name, base in case["impls"].items():
            if name == LEANFORMER:
                continue
            per_round = [base["times"][k] / ours["times"][k] for k in sorted(base["times"])
                         if k in ours["times"] and ours["times"][k] > 0]
            speedup = statistics.median(per_round) if per_round else None
            target = case["targets"].get(name)
            errors = [f"leanformer: {e}" for e in ours["errors"]] + base["errors"]
            rows.append({
                "family": family, "op": op, "shape": shape, "mode": mode, "baseline": name,
                "leanformer_ms": _median_ms(ours["times"].values()),
                "baseline_ms": _median_ms(base["times"].values()),
                "speedup": speedup,
                "speedup_min": min(per_round) if per_round else None,
                "speedup_max": max(per_round) if per_round else None,
                "round_speedups": per_round,
                "target": target,
                "met": None if target is None or speedup is None else speedup >= target,
                "error": errors[0] if errors and speedup is None else None,
            })
    return rows


def _median_ms(times) -> Optional[float]:
    times = list(times)
    return statistics.median(times) * 1e3 if times else None


def format_table(rows: List[Mapping]) -> str:
    """The ratio table: each baseline's time over leanformer's, the median of the rounds and
    their range, and the target (met or BELOW)."""
    header = ["op", "shape", "pass", "leanformer ms", "baseline", "baseline ms", "speed-up", "round range", "target"]
    ms = lambda x: "-" if x is None else f"{x:.3f}"
    lines = [header]
    for r in rows:
        speed = "error" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        spread = "" if r["speedup"] is None else f"{r['speedup_min']:.2f}-{r['speedup_max']:.2f}x"
        target = "" if r["target"] is None else f">= {r['target']:g}x" + {True: " met", False: " BELOW", None: ""}[r["met"]]
        lines.append([r["op"], r["shape"], r["mode"], ms(r["leanformer_ms"]), r["baseline"],
                      ms(r["baseline_ms"]), speed, spread, target])
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    text = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    errors = [f"  {r['op']} {r['shape']} {r['mode']} {r['baseline']}: {r['error']}" for r in rows if r["error"]]
    return "\n".join(text + (["errors:", *errors] if errors else []))
