"""Runs the suite: `leanformer bench` (or `python -m bench.run`) from the source checkout."""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import sys
from typing import List, Optional

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUITES = ["linear_attention", "rep_batchnorm", "topk_mlp", "nm_sparse", "dense_sparse_linear", "packed_linear", "tree_attention",
          "models", "generate", "nm_sparse_cuda", "tree_attention_cuda"]


def parse(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="leanformer bench", description=__doc__)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    p.add_argument("--suite", action="append", choices=SUITES, help="run only these (repeatable)")
    p.add_argument("--quick", action="store_true", help="tiny shapes, short timings (a smoke test)")
    p.add_argument("--min-run-time", type=float, default=None, help="seconds per timing (default 1.0)")
    p.add_argument("--out", default=os.path.join(REPO, "bench", "results"),
                   help="folder for the JSON and PNG results")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    import importlib

    from tqdm import tqdm

    from bench.harness import format_table, run_case, speedups, write_results

    args = parse(argv)
    dtype = getattr(torch, args.dtype or ("float32" if args.device == "cpu" else "bfloat16"))
    min_run_time = args.min_run_time or (0.05 if args.quick else 1.0)
    cases = []
    for name in args.suite or SUITES:
        cases += importlib.import_module(f"bench.{name}").cases(args.device, dtype, quick=args.quick)
    timings = []
    for case in tqdm(cases, desc="benchmarks", unit="case", file=sys.stderr):
        timings += run_case(case, min_run_time)
    rows = speedups(cases, timings)
    os.makedirs(args.out, exist_ok=True)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    stem = os.path.join(args.out, f"{args.device}-{'quick-' if args.quick else ''}{stamp}")
    report = write_results(stem, args.device, REPO, timings, rows,
                           {"dtype": str(dtype).removeprefix("torch."), "quick": args.quick,
                            "min_run_time_s": min_run_time})
    m = report["machine"]
    print(f"leanformer bench · {m.get('gpu', m['cpu'])} · {m['cpu_count']} cores ({m['cpu_vector_isa']}) · torch {report['torch']}"
          f" · commit {report['commit']} · {report['dtype']}")
    print(format_table(rows))
    print(f"results: {stem}.json, {stem}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
