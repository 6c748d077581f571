"""Tree-verified decoding on models of the project trained on real text: a LlamaLM and a SLAB LM
of a few million parameters on Python's pydoc topics (byte level), then Hidden Transfer and
Medusa drafters distilled from each frozen model (by default on its own greedy continuations
of training prompts, Medusa-2's self-distillation); mean accepted tokens per forward and
wall-clock tokens/s against plain greedy decoding, at batch 1 and 4, on held-out prompts, with
a static tree, each drafter's accuracy-tuned tree of the same size and a dynamic tree
(``--tree-nodes auto``: of the size that decodes fastest on this host, per drafter, timed on
training prompts with :func:`leanformer.decoding.fastest_tree`).

Checkpoints go to ~/.cache/leanformer/tree-decoding/ (not in git): with --reuse a re-measure
of speed loads them instead of training again.

    leanformer experiment tree-decoding [--lm-steps 1500] [--drafter-steps 1200] [--reuse]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import List, Optional

import torch
from safetensors.torch import load_file, save_file

from leanformer.decoding import DynamicTree, HiddenTransfer, MedusaHeads, TokenTree, TreeShape, fastest_tree, generate
from leanformer.decoding.distill import distill, greedy_corpus, rank_accuracy
from leanformer.lab.data import pydoc_text
from leanformer.lab.results import FOLDER, stem, write_json
from leanformer.lab.train.lm_text import lm_loss
from leanformer.models import LMConfig, LlamaConfig, LlamaLM, SLABLM, load_pretrained, save_pretrained
from leanformer.training import random_windows, sequential_windows, train

CACHE = os.path.join(os.path.expanduser("~"), ".cache", "leanformer", "tree-decoding")
# Medusa's tree shape, scaled to 4 heads: wide near the root, a deep spine on the best guesses.
STATIC_PATHS = [[0], [1], [2], [3], [0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [2, 0], [0, 0, 0], [0, 0, 1],
                [0, 1, 0], [1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0], [0, 1, 0, 0]]


def base_models(lm_steps: int, dim: int = 256, depth: int = 6):
    return {"llama": LlamaLM(LlamaConfig(vocab_size=256, dim=dim, depth=depth, num_heads=dim // 32,
                                         num_kv_heads=dim // 64, max_seq_len=1024)),
            "slab": SLABLM(LMConfig(vocab_size=256, dim=dim, depth=depth, num_heads=dim // 64, dwc_kernel_size=4,
                                    prepbn_steps=int(0.6 * lm_steps)))}


def drafters_for(model, num_future: int, ht_layer: Optional[int] = None, ht_branch_depth: int = 1,
                 ht_readout: bool = False, ht_isolate_offsets: bool = False):
    """Medusa and Hidden Transfer for ``model``; the transfer after ``ht_layer`` blocks (default
    half the depth)."""
    layer = model.config.depth // 2 if ht_layer is None else ht_layer
    return {"medusa": MedusaHeads(model, num_future),
            "hidden-transfer": HiddenTransfer(model, layer, num_future, branch_depth=ht_branch_depth,
                                              readout=ht_readout, isolate_offsets=ht_isolate_offsets)}


def checkpoint_stem(model, drafter_name: str, drafter) -> str:
    """A drafter's checkpoint name: Hidden Transfer at a layer other than half the depth, or with
    a readout, or trained with isolated offsets, is another drafter (``hidden-transfer-l3``,
    ``hidden-transfer-ro``, ``hidden-transfer-iso``), not a reload of the default one."""
    name = drafter_name
    if isinstance(drafter, HiddenTransfer):
        name += f"-l{drafter.layer}" if drafter.layer != model.config.depth // 2 else ""
        name += "-ro" if drafter.readouts is not None else ""
        name += "-iso" if drafter.isolate_offsets else ""
    return name


def tree_path(cache: str, model_name: str, drafter_name: str) -> str:
    """Where the drafter's accuracy-tuned tree (its paths, JSON) is kept next to its weights."""
    return os.path.join(cache, f"{model_name}-{drafter_name}.tree.json")


def save_drafter(drafter, path: str) -> None:
    save_file({k: v.contiguous() for k, v in drafter.state_dict().items()}, path)


def load_drafter(drafter, path: str) -> None:
    drafter.load_state_dict(load_file(path))


@torch.no_grad()
def paired(model, prompts, max_new_tokens: int, repeats: int = 1, **kw):
    """Plain decoding and decoding with ``kw`` (a drafter and tree) of the same prompts,
    alternated run by run: ``((plain, tokens/s), (tree, tokens/s))`` (the second None without
    ``kw``), each from its fastest run. On a shared host whose speed drifts by a third within
    seconds, a baseline timed minutes apart does not make a ratio; one timed between the
    tree runs does."""
    generate(model, [p[:8] for p in prompts], max_new_tokens=8)  # warm-up
    if kw:
        generate(model, [p[:8] for p in prompts], max_new_tokens=8, **kw)
    best = {"plain": float("inf"), "tree": float("inf")}
    outs = {}
    for _ in range(repeats):
        for key, args in (("plain", {}), ("tree", kw)) if kw else (("plain", {}),):
            t0 = time.perf_counter()
            outs[key] = generate(model, prompts, max_new_tokens=max_new_tokens, **args)
            best[key] = min(best[key], time.perf_counter() - t0)
    rate = {k: sum(len(s) for s in o.sequences) / best[k] for k, o in outs.items()}
    return (outs["plain"], rate["plain"]), ((outs["tree"], rate["tree"]) if kw else None)


@torch.no_grad()
def acceptance(model, tokens, runs, count: int, prompt_length: int, new_tokens: int):
    """Accepted tokens per forward of each run in ``runs`` on ``count`` prompts spread over
    ``tokens``, one at a time and untimed (a wider sample than the timed runs): the mean over
    all forwards, each prompt's mean (the same prompts for every run, so two runs compare
    prompt by prompt), their standard error across prompts, and whether every output equals
    plain greedy decoding."""
    starts = torch.linspace(0, len(tokens) - prompt_length - 1, count).long().tolist()
    prompts = [tokens[s:s + prompt_length] for s in starts]
    plain = [generate(model, [p], max_new_tokens=new_tokens).sequences[0].tolist() for p in prompts]
    out = {}
    for key, kw in runs.items():
        acc, per_prompt, same = [], [], True
        for p, ref in zip(prompts, plain):
            o = generate(model, [p], max_new_tokens=new_tokens, **kw)
            acc += o.accepted_lengths
            per_prompt.append(sum(o.accepted_lengths) / len(o.accepted_lengths))
            same &= o.sequences[0].tolist() == ref
        m = torch.tensor(per_prompt, dtype=torch.float64)
        out[key] = {"mean_accepted": sum(acc) / len(acc), "standard_error": (m.std() / count ** 0.5).item(),
                    "forwards": len(acc), "per_prompt": [round(x, 4) for x in per_prompt],
                    "same_as_plain_greedy": same}
    return out


def _tree_nodes(value: str):
    if value == "auto":
        return value
    n = int(value)
    if n < 2:
        raise argparse.ArgumentTypeError(f"a tree needs >= 2 nodes (the root and one candidate), got {n}")
    return n


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="leanformer experiment tree-decoding", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lm-steps", type=int, default=1500)
    p.add_argument("--drafter-steps", type=int, default=1200)
    p.add_argument("--dim", type=int, default=256, help="model width (a multiple of 64)")
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--num-future", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompts", type=int, default=4, help="held-out prompts per measurement (batch 1 runs each)")
    p.add_argument("--prompt-length", type=int, default=64)
    p.add_argument("--tree-nodes", type=_tree_nodes, default=len(STATIC_PATHS) + 1,
                   help="nodes of the dynamic tree and of each drafter's accuracy-tuned static tree; 'auto': "
                        "per drafter, the size that decodes fastest here (timed on training prompts)")
    p.add_argument("--models", default="llama,slab")
    p.add_argument("--drafter-data", choices=["generated", "text"], default="generated",
                   help="drafters learn from the model's greedy continuations of training prompts "
                        "(self-distillation) or from the training text itself")
    p.add_argument("--generated-prompts", type=int, default=512)
    p.add_argument("--ht-layer", type=int, default=None,
                   help="blocks before Hidden Transfer's transfer (default half the depth); the pseudo tokens run "
                        "through the rest")
    p.add_argument("--ht-branch-depth", type=int, default=1,
                   help="Hidden Transfer's anchors: the main chain and every node this deep or shallower (0: the chain)")
    p.add_argument("--ht-all-anchors", action="store_true",
                   help="also measure Hidden Transfer with pseudo tokens after every tree node (branch_depth = "
                        "num_future), not only the main chain and the root's children")
    p.add_argument("--ht-readout", action="store_true",
                   help="Hidden Transfer with a trainable Medusa-style block before the LM head of its pseudo "
                        "tokens (not in the paper; its own checkpoint)")
    p.add_argument("--ht-isolate-offsets", action="store_true",
                   help="train each Hidden Transfer offset on its own loss alone (LlamaLM; not in the paper; its "
                        "own checkpoint)")
    p.add_argument("--accept-prompts", type=int, default=0,
                   help="also measure accepted tokens per forward (untimed, batch 1) on this many held-out "
                        "prompts, with a standard error across prompts: a wider sample than the timed --prompts")
    p.add_argument("--reuse", action="store_true", help="load the checkpoints under --cache instead of training")
    p.add_argument("--cache", default=CACHE)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=5,
                   help="timed runs per measurement, alternating plain and tree decoding; the fastest of each counts")
    p.add_argument("--out", default=FOLDER, help="folder of the result files")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    train_tokens, val_tokens = pydoc_text()
    val = sequential_windows(val_tokens, args.length)[:32]
    starts = torch.linspace(0, len(val_tokens) - args.prompt_length - 1, args.prompts).long().tolist()
    prompts = [val_tokens[s:s + args.prompt_length] for s in starts]
    static = TokenTree.from_paths(STATIC_PATHS)
    report = {"args": vars(args), "tree_static_paths": STATIC_PATHS, "tree_nodes": len(STATIC_PATHS) + 1,
              "models": {}}
    models = {n: m for n, m in base_models(args.lm_steps, args.dim, args.depth).items() if n in args.models.split(",")}
    for model in models.values():  # a drafter a model refuses fails now, not after the models before it trained
        try:
            drafters_for(model, args.num_future, args.ht_layer, args.ht_branch_depth, args.ht_readout,
                         args.ht_isolate_offsets)
        except ValueError as e:
            p.error(str(e))
    for name, model in models.items():
        folder = os.path.join(args.cache, name)
        if args.reuse and os.path.isdir(folder):
            model = load_pretrained(folder)
        else:
            torch.manual_seed(0)
            data = random_windows(train_tokens, args.batch, args.length, torch.Generator().manual_seed(0))
            train(model, data, lm_loss, steps=args.lm_steps, lr=2e-3, evaluate=lambda m: {
                "val_loss": sum(lm_loss(m, c).item() for c in val.split(16)) / len(val.split(16))},
                eval_every=max(1, args.lm_steps // 10), desc=f"{name} LM")
            save_pretrained(model.eval(), folder)
        model.eval()
        entry = {"params": sum(t.numel() for t in model.parameters()), "config": vars(model.config), "drafters": {}}
        tuned_trees, dynamic_trees = {}, {}
        with torch.no_grad():
            entry["val_loss"] = sum(lm_loss(model, c).item() for c in val.split(16)) / len(val.split(16))
        drafters = drafters_for(model, args.num_future, args.ht_layer, args.ht_branch_depth, args.ht_readout,
                                args.ht_isolate_offsets)
        generated = args.drafter_data == "generated"  # the model's own greedy text, as tree decoding meets it
        if generated:
            fit_windows = greedy_corpus(model, train_tokens, prompts=16, prompt_length=32, new_tokens=args.length,
                                        seed=1)[:, :args.length]
        else:
            fit_windows = sequential_windows(train_tokens, args.length)[-16:, :-1]
        drafter_tokens = None
        for dname, drafter in drafters.items():
            path = os.path.join(args.cache, f"{name}-{checkpoint_stem(model, dname, drafter)}.safetensors")
            if args.reuse and os.path.isfile(path):
                load_drafter(drafter, path)
                history = None
            else:
                if drafter_tokens is None:
                    drafter_tokens = greedy_corpus(model, train_tokens, prompts=args.generated_prompts, prompt_length=32,
                                                   new_tokens=args.length * 2).flatten() if generated else train_tokens
                torch.manual_seed(0)
                history = distill(drafter, drafter_tokens, val[:8, :-1], steps=args.drafter_steps, batch=args.batch,
                                  length=args.length, lr=1e-3, desc=f"{name} {dname}")
                save_drafter(drafter, path)
            # measured on text from training prompts: the held-out prompts stay unseen
            accuracy = rank_accuracy(drafter, fit_windows, top_k=8)
            info = {"distill_final": history[-1] if history else "reused", "checkpoint": os.path.basename(path),
                    "rank_accuracy": [[round(a, 4) for a in row] for row in accuracy.tolist()]}
            if args.tree_nodes == "auto":  # sized on training text, so the held-out prompts stay unseen
                tuned, rates = fastest_tree(model, drafter, accuracy, [w[:args.prompt_length] for w in fit_windows[:4]],
                                            max_new_tokens=max(args.new_tokens // 2, 1))
                info["tree_size_tokens_per_s"] = {str(n): round(r, 1) for n, r in rates.items()}
            else:
                tuned = TreeShape.from_accuracies(accuracy, args.tree_nodes)
            info.update(tuned_tree_nodes=tuned.num_nodes, tuned_tree_paths=[list(p) for p in tuned.paths])
            entry["drafters"][dname] = info
            tuned_trees[dname], dynamic_trees[dname] = tuned, DynamicTree(tuned.num_nodes, 4)
            with open(tree_path(args.cache, name, checkpoint_stem(model, dname, drafter)), "w") as f:
                json.dump([list(p) for p in tuned.paths], f)
        runs = {f"{d}/{t}": {"drafter": drafters[d], "tree": tree} for d in drafters
                for t, tree in (("static", static), ("dynamic", dynamic_trees[d]))}
        runs.update({f"{d}/tuned": {"drafter": drafters[d], "tree": tuned_trees[d]} for d in drafters})
        if args.ht_all_anchors:  # the same weights with pseudo tokens after every node: Medusa's coverage
            ht_all = HiddenTransfer(model, drafters["hidden-transfer"].layer, args.num_future,
                                    branch_depth=args.num_future, readout=args.ht_readout)
            ht_all.load_state_dict(drafters["hidden-transfer"].state_dict())
            runs.update({f"hidden-transfer-all/{t}": {"drafter": ht_all, "tree": tree}
                         for t, tree in (("static", static), ("tuned", tuned_trees["hidden-transfer"]))})
        if args.accept_prompts:
            entry["acceptance"] = acceptance(model, val_tokens, runs, args.accept_prompts, args.prompt_length,
                                             args.new_tokens)
            for key, r in entry["acceptance"].items():
                print(f"{name:6s} {args.accept_prompts} held-out prompts  {key:24s} accepted/forward "
                      f"{r['mean_accepted']:.3f} +- {r['standard_error']:.3f} over {r['forwards']} forwards  "
                      f"same as greedy: {r['same_as_plain_greedy']}")
        results = {}
        for batch in (1, 4):
            groups = [[q] for q in prompts] if batch == 1 else [prompts[i:i + batch] for i in range(0, len(prompts), batch)]
            row = {}
            for key, kw in {"plain": {}, **runs}.items():
                toks, secs, plain_secs, acc, outs, plain_outs = 0, 0.0, 0.0, [], [], []
                for group in groups:
                    (plain, plain_tps), tree = paired(model, group, args.new_tokens, args.repeats, **kw)
                    out, tps = tree if tree is not None else (plain, plain_tps)
                    n = sum(len(s) for s in out.sequences)
                    toks, secs, plain_secs = toks + n, secs + n / tps, plain_secs + n / plain_tps
                    acc += out.accepted_lengths
                    outs += [s.tolist() for s in out.sequences]
                    plain_outs += [s.tolist() for s in plain.sequences]
                # the speed-up is against the plain runs alternated with this configuration's
                row[key] = {"tokens_per_s": toks / secs, "plain_tokens_per_s": toks / plain_secs,
                            "speedup": plain_secs / secs, "mean_accepted": sum(acc) / len(acc),
                            "same_as_plain_greedy": outs == plain_outs}
            results[f"batch{batch}"] = row
            for key, r in row.items():
                print(f"{name:6s} batch {batch}  {key:24s} {r['tokens_per_s']:8.1f} tok/s  x{r['speedup']:.2f} "
                      f"(plain {r['plain_tokens_per_s']:.0f} tok/s alternated with it)  "
                      f"accepted/forward {r['mean_accepted']:.2f}  same as greedy: {r['same_as_plain_greedy']}")
        entry["results"] = results
        report["models"][name] = entry
    path = write_json(stem(args.out, "experiment-tree-decoding"), report)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
