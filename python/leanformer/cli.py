"""The `leanformer` command: `leanformer info`, `leanformer bench`, `leanformer train NAME`,
`leanformer experiment NAME` and `leanformer layers NAME`.

The training scripts, experiments and layer analyses live in :mod:`leanformer.lab`; each command
imports its script only when it runs, so `leanformer info` loads the library alone."""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from typing import Dict, List, Optional, Tuple

import torch

import leanformer
from leanformer import _C
from leanformer._extension import build_config


def info() -> int:
    config = build_config()
    ops = sorted(n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names()
                 if n.startswith("leanformer::"))
    print(f"leanformer {leanformer.__version__} ({os.path.dirname(leanformer.__file__)})")
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda or '-'}, "
          f"GPU: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    print(f"built against torch {config.get('torch', '?')}, "
          f"CUDA kernels: {'yes, archs ' + ', '.join(config.get('cuda_archs', [])) if config.get('cuda_kernels') else 'no'}"
          + (f", CUTLASS 2:4 GEMM: {'yes' if config.get('cutlass') else 'no'}" if config.get("cuda_kernels") else ""))
    print(f"CPU kernels' vector tiles here: {_C.cpu_vector_isa()}")
    print("ops (backends with a kernel):")
    for name in ops:
        keys = [k for k in ("CPU", "CUDA")
                if torch._C._dispatch_has_kernel_for_dispatch_key(f"leanformer::{name}", k)]
        print(f"  leanformer::{name:<24} {', '.join(keys)}")
    return 0


def bench(argv: List[str]) -> int:
    """`leanformer bench`: runs the pytest-benchmark suite of the source checkout's bench/ folder
    (pytest bench --benchmark-only with the options below), which prints the ratio table and
    writes bench/results/<family>-<machine class>.json and .png. Other arguments go to pytest
    (e.g. -k sla_step, --benchmark-autosave, --benchmark-compare)."""
    p = argparse.ArgumentParser(prog="leanformer bench", description=bench.__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes, short timings (a smoke test)")
    p.add_argument("--suite", nargs="+", action="extend", metavar="FAMILY",
                   help="run only these families (bench/bench_FAMILY.py), e.g. topk_mlp tree_attention")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--dtype", help="float32 (CPU default) or bfloat16 (CUDA default)")
    p.add_argument("--rounds", type=int, default=3, help="rounds in which the implementations take turns")
    p.add_argument("--run-time", type=float, help="seconds per implementation of a case (default 1.0, quick 0.05)")
    p.add_argument("--out", help="folder for the result files (default: the checkout's bench/results; "
                                 "--quick results are named <family>-quick-<machine class>)")
    args, pytest_args = p.parse_known_args(argv)

    package = os.path.dirname(os.path.abspath(leanformer.__file__))
    folders = [os.path.join(os.path.dirname(os.path.dirname(package)), "bench"), os.path.join(os.getcwd(), "bench")]
    folder = next((f for f in folders if os.path.isfile(os.path.join(f, "conftest.py"))
                   and os.path.isfile(os.path.join(f, "pytest.ini"))), None)
    missing = [name for name in ("pytest", "pytest_benchmark") if importlib.util.find_spec(name) is None]
    if folder is None or missing:
        print("leanformer bench runs the benchmark suite in the source checkout's bench/ folder, with "
              "pytest-benchmark" + (f" (missing here: {', '.join(missing)})" if missing else "")
              + (" (no bench/ folder found: an installed package does not include it)" if folder is None else "")
              + ". Clone the repository, `pip install \"leanformer[bench]\"`, and run `leanformer bench` "
              "(or `pytest bench --benchmark-only`) from the checkout.", file=sys.stderr)
        return 2
    suites = sorted(f[len("bench_"):-3] for f in os.listdir(folder) if f.startswith("bench_") and f.endswith(".py"))
    unknown = sorted(set(args.suite or ()) - set(suites))
    if unknown:
        p.error(f"unknown suite {', '.join(unknown)}: choose from {', '.join(suites)}")
    import pytest

    options = [os.path.join(folder, f"bench_{s}.py") for s in args.suite] if args.suite else [folder]
    options += ["--benchmark-only", "-q", "--benchmark-columns=median,iqr,rounds,iterations",
                f"--rounds={args.rounds}", f"--results-dir={args.out or os.path.join(folder, 'results')}"]
    options += ["--quick"] if args.quick else []
    options += [f"--{name.replace('_', '-')}={value}" for name, value in
                (("device", args.device), ("dtype", args.dtype), ("run_time", args.run_time)) if value is not None]
    return int(pytest.main(options + pytest_args))


# `leanformer train NAME`, `leanformer experiment NAME`, `leanformer layers NAME`: the module and
# entry point (called with the remaining arguments, returns the exit status) of each script.
TRAINERS: Dict[str, Tuple[str, str]] = {
    "vit-digits": ("leanformer.lab.train.vit_digits", "main"),
    "lm-text": ("leanformer.lab.train.lm_text", "main"),
    "llama-text": ("leanformer.lab.train.llama_text", "main"),
    "smollm2-drafters": ("leanformer.lab.train.smollm2_drafters", "main"),
}
EXPERIMENTS: Dict[str, Tuple[str, str]] = {
    "topk-minilm": ("leanformer.lab.experiments.topk_minilm", "main"),
    "lazy-neuron-lm": ("leanformer.lab.experiments.lazy_neuron_lm", "main"),
    "tree-decoding": ("leanformer.lab.experiments.tree_decoding", "main"),
    "elastic-minilm": ("leanformer.lab.experiments.elastic_minilm", "main"),
    "dsformer-minilm": ("leanformer.lab.experiments.dsformer_minilm", "main"),
    "real-llm": ("leanformer.lab.experiments.real_llm", "main"),
    "quantize-smollm2": ("leanformer.lab.experiments.quantize_llm", "main"),
}
LAYERS: Dict[str, Tuple[str, str]] = {
    "soft": ("leanformer.lab.experiments.layers_soft", "main"),
    "early-exit": ("leanformer.lab.experiments.layers_early_exit", "main"),
    "drop": ("leanformer.lab.experiments.layers_drop", "main"),
    "logit-lens": ("leanformer.lab.experiments.layers_lens", "main"),
    "tuned-lens": ("leanformer.lab.experiments.layers_lens", "tuned_main"),
    "residual": ("leanformer.lab.experiments.layers_residual", "main"),
    "back-patching": ("leanformer.lab.experiments.layers_back_patching", "main"),
    "self-speculative": ("leanformer.lab.experiments.layers_self_speculative", "main"),
}


def _run_script(command: str, scripts: Dict[str, Tuple[str, str]], argv: List[str]) -> int:
    """Imports the script ``argv[0]`` names in ``scripts`` and runs it on the rest of ``argv``."""
    if not argv or argv[0] not in scripts:
        print(f"usage: leanformer {command} {{{','.join(scripts)}}} [options] (--help for each)", file=sys.stderr)
        return 2
    module, entry = scripts[argv[0]]
    return getattr(importlib.import_module(module), entry)(argv[1:])


def train(argv: List[str]) -> int:
    return _run_script("train", TRAINERS, argv)


def experiment(argv: List[str]) -> int:
    return _run_script("experiment", EXPERIMENTS, argv)


def layers(argv: List[str]) -> int:
    return _run_script("layers", LAYERS, argv)


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="leanformer")
    parser.add_argument("command", choices=["info", "bench", "train", "experiment", "layers"])
    args, rest = parser.parse_known_args(argv[:1])
    if args.command == "info":
        return info()
    if args.command == "train":
        return train(argv[1:])
    if args.command == "experiment":
        return experiment(argv[1:])
    if args.command == "layers":
        return layers(argv[1:])
    return bench(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
