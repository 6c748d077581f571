"""The `leanformer` command: `leanformer info`, `leanformer bench`, `leanformer train NAME`,
`leanformer experiment NAME` and `leanformer layers NAME`."""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional


def info() -> int:
    import torch

    import leanformer
    from leanformer import _C
    from leanformer._extension import build_config

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
    """The suite lives in the source checkout's bench/ folder, next to its results."""
    import leanformer

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(leanformer.__file__))))
    for root in (repo, os.getcwd()):
        if os.path.isfile(os.path.join(root, "bench", "run.py")):
            sys.path.insert(0, root)
            from bench.run import main as run

            return run(argv)
    print("leanformer bench needs the source checkout (its bench/ folder): install it with "
          "`pip install --no-build-isolation -e .` from the checkout, or run it from there.",
          file=sys.stderr)
    return 2


TRAINERS = {"vit-digits": "leanformer.train.vit_digits", "lm-text": "leanformer.train.lm_text",
            "llama-text": "leanformer.train.llama_text"}


EXPERIMENTS = {"topk-minilm": "leanformer.experiments.topk_minilm",
               "lazy-neuron-lm": "leanformer.experiments.lazy_neuron_lm",
               "tree-decoding": "leanformer.experiments.tree_decoding",
               "elastic-minilm": "leanformer.experiments.elastic_minilm",
               "dsformer-minilm": "leanformer.experiments.dsformer_minilm"}


# `leanformer layers NAME`: module and entry point of each intermediate-layer analysis.
LAYERS = {"soft": ("leanformer.experiments.layers_soft", "main"),
          "early-exit": ("leanformer.experiments.layers_early_exit", "main"),
          "drop": ("leanformer.experiments.layers_drop", "main"),
          "logit-lens": ("leanformer.experiments.layers_lens", "main"),
          "tuned-lens": ("leanformer.experiments.layers_lens", "tuned_main"),
          "residual": ("leanformer.experiments.layers_residual", "main"),
          "back-patching": ("leanformer.experiments.layers_back_patching", "main"),
          "self-speculative": ("leanformer.experiments.layers_self_speculative", "main")}


def layers(argv: List[str]) -> int:
    import importlib

    if not argv or argv[0] not in LAYERS:
        print(f"usage: leanformer layers {{{','.join(LAYERS)}}} [options] (--help for each)", file=sys.stderr)
        return 2
    module, entry = LAYERS[argv[0]]
    return getattr(importlib.import_module(module), entry)(argv[1:])


def experiment(argv: List[str]) -> int:
    import importlib

    if not argv or argv[0] not in EXPERIMENTS:
        print(f"usage: leanformer experiment {{{','.join(EXPERIMENTS)}}} [options] (--help for each)", file=sys.stderr)
        return 2
    return importlib.import_module(EXPERIMENTS[argv[0]]).main(argv[1:])


def train(argv: List[str]) -> int:
    import importlib

    if not argv or argv[0] not in TRAINERS:
        print(f"usage: leanformer train {{{','.join(TRAINERS)}}} [options] (--help for each)", file=sys.stderr)
        return 2
    return importlib.import_module(TRAINERS[argv[0]]).main(argv[1:])


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
