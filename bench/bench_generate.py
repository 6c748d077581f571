"""generate() end to end: tree-verified greedy decoding (Hidden Transfer and Medusa drafters,
each with the accuracy-tuned tree the experiment saved) against plain greedy decoding of the same model, batch 1 and 4.
Uses the models `leanformer experiment tree-decoding` trained and cached when they exist (then
the speed-ups are real); otherwise small random-init models, which only show that it runs."""
from __future__ import annotations

import json
import os
from typing import List

import torch

import leanformer
from bench.case import Case, bench_cases, time_case
from leanformer.lab.data import pydoc_text
from leanformer.decoding import HiddenTransfer, MedusaHeads, TokenTree
from leanformer.lab.experiments.tree_decoding import CACHE, STATIC_PATHS, drafters_for, load_drafter, tree_path
from leanformer.models import LlamaConfig, LlamaLM, load_pretrained


def _trained_or_random(device: str, quick: bool):
    folder = os.path.join(CACHE, "llama")
    if not quick and os.path.isdir(folder):
        model = load_pretrained(folder, device=device)
        drafters = drafters_for(model, 4)
        trees = {}
        for name, d in drafters.items():
            load_drafter(d, os.path.join(CACHE, f"llama-{name}.safetensors"))
            with open(tree_path(CACHE, "llama", name)) as f:
                trees[name] = TokenTree.from_paths(json.load(f))
        return model, drafters, trees, "trained"
    torch.manual_seed(0)
    model = LlamaLM(LlamaConfig(dim=64, depth=2, num_heads=4, num_kv_heads=2)).to(device).eval()
    drafters = {"medusa": MedusaHeads(model, 4), "hidden-transfer": HiddenTransfer(model, 1, 4)}
    return model, drafters, {name: TokenTree.from_paths(STATIC_PATHS) for name in drafters}, "random"


def cases(device: str, dtype: torch.dtype, quick: bool = False) -> List[Case]:
    model, drafters, trees, kind = _trained_or_random(device, quick)
    model = model.to(dtype)
    for d in drafters.values():
        d.to(device=device, dtype=dtype)
    _, val = pydoc_text()
    new = 16 if quick else 128
    out = []
    for batch in ((1,) if quick else (1, 4)):
        prompts = [val[s:s + 64] for s in range(1000, 1000 + 5000 * batch, 5000)]

        def run(drafter=None, tree=None, prompts=prompts):
            return lambda: leanformer.generate(model, prompts, max_new_tokens=new, drafter=drafter, tree=tree)

        for name, drafter in drafters.items():
            targets = {"plain greedy": 1.8} if kind == "trained" and batch == 1 else {}
            out.append(Case("generate", f"{kind} llama {name} b{batch} new{new} tree{trees[name].num_nodes}",
                            "step", run(drafter, trees[name]), {"plain greedy": run()}, targets,
                            min_run_time=None if quick else 5.0))
    return out


@bench_cases(cases)
def test_generate(benchmark, case, impl, bench_round):
    time_case(benchmark, case, impl, bench_round)
