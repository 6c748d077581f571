"""Tree-verified decoding of a real pretrained model, SmolLM2-135M-Instruct, against the engines a
user would otherwise run: leanformer plain greedy, leanformer with the Medusa heads and with
Hidden Transfer trained by ``leanformer train smollm2-drafters`` (each with the accuracy-tuned
tree of the size that decodes fastest here, :func:`leanformer.decoding.fastest_tree`, sized on
training prompts), leanformer with lookup drafts (:class:`leanformer.decoding.LookupDrafter`:
chains copied from the prompt and output so far, continued by an n-gram table of the drafters'
training corpus, the model's own greedy continuations of training prompts; the chain length
that decodes fastest on the training prompts), Hugging Face transformers ``generate`` (greedy, and prompt-lookup decoding),
and llama.cpp through ``llama-cpp-python`` on an F32 GGUF (the Q4_1 file dequantized, the same
weights as ours) and on the Q4_1 GGUF itself.

Held-out prompts (:func:`leanformer.lab.data.pydoc_prompts` ``"test"``: chat instructions and
plain-text passages from pydoc topics the drafters never saw), greedy, up to ``--new-tokens``
new tokens, stopping at the end of turn (``--no-eos``: always that many), batch 1 and batch 4
(prompts of different lengths; transformers left-pads). The engines take turns within each
round; per engine: tokens/s (its new tokens over wall time, prefill included) as the median
and range over rounds, accepted tokens per forward with its standard error across prompts, and
how many outputs equal leanformer's plain greedy tokens at batch 1 (prompt lookup is also compared with
transformers' own greedy; llama.cpp computes in its own order and, on Q4_1, with 8-bit
activations, so its tokens may part from ours after a near-tie).

    leanformer experiment real-llm [--prompts 32] [--new-tokens 128] [--rounds 2]
"""
from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from leanformer.decoding import LookupDrafter, NgramTable, TreeShape, fastest_tree, generate
from leanformer.decoding.tree_size import decoding_rates
from leanformer.lab.data import prompt_ids, pydoc_prompts
from leanformer.lab.results import FOLDER, stem, write_json
from leanformer.lab.train.smollm2_drafters import CACHE, WEIGHTS, load_drafter, load_smollm2
from leanformer.models import smollm2_path

Engine = Callable[[List[List[int]]], dict]  # a batch of prompts -> {"sequences", "accepted"?}


def leanformer_engine(model, new_tokens: int, eos: Optional[int], drafter=None, tree=None) -> Engine:
    def run(batch: List[List[int]]) -> dict:
        out = generate(model, batch, max_new_tokens=new_tokens, drafter=drafter, tree=tree, eos_token_id=eos)
        return {"sequences": [s.tolist() for s in out.sequences], "accepted": out.accepted_lengths}
    return run


def lookup_drafter(model, folder: str, depths: List[int], candidates: List[torch.Tensor], new_tokens: int,
                   count: int = 4, repeats: int = 2):
    """The :class:`LookupDrafter` (its n-gram table from ``<folder>/corpus.pt`` where there is
    one) whose chain length, of ``depths``, decodes the first ``count`` of ``candidates`` that
    the corpus does not hold fastest (each depth's best of ``repeats`` rounds, the depths
    alternating): ``(drafter, what was chosen from)``."""
    path = os.path.join(folder, "corpus.pt")
    table, about, prompts = None, {"datastore": None}, candidates[:count]
    if os.path.exists(path):
        seqs = torch.load(path)["sequences"]
        prompts = [p for p in candidates
                   if not any(tuple(s[:len(p)].tolist()) == tuple(p.tolist()) for s in seqs)][:count] or prompts
        table = NgramTable.from_sequences(seqs, vocab_size=model.config.vocab_size, max_ngram=3)
        about["datastore"] = {"sequences": len(seqs), "tokens": sum(len(s) for s in seqs), "max_ngram": 3,
                              "ngrams": [len(t) for t in table.tables]}
    drafters = {k: LookupDrafter(model, k, min_ngram=2 if table is not None else 1, datastore=table) for k in depths}
    rates = decoding_rates({k: dict(drafter=d) for k, d in drafters.items()}, model, prompts,
                           max_new_tokens=new_tokens, repeats=repeats)
    k = max(depths, key=lambda d: (rates[d], -d))
    about.update(num_future=k, min_ngram=drafters[k].min_ngram,
                 tokens_per_s_by_depth={str(d): round(r, 1) for d, r in rates.items()})
    return drafters[k], about


def transformers_engine(path: str, new_tokens: int, eos: Optional[int], prompt_lookup: Optional[int] = None):
    """transformers' model from the GGUF (dequantized by transformers itself), or None with the
    reason when transformers or gguf is missing."""
    try:
        from transformers import AutoModelForCausalLM, GenerationConfig
        import gguf  # noqa: F401  (transformers reads GGUF files through it)
    except ImportError as e:
        return None, f"transformers/gguf not installed ({e}): pip install \"leanformer[hf]\""
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                 dtype=torch.float32).eval()

    def run(batch: List[List[int]]) -> dict:
        width = max(len(p) for p in batch)  # left padding: every prompt ends where decoding starts
        ids = torch.tensor([[0] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=eos,
                                  pad_token_id=0 if eos is None else eos, prompt_lookup_num_tokens=prompt_lookup)
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, generation_config=config)
        rows = out[:, width:].tolist()  # a finished row is padded with eos: cut after its first
        return {"sequences": [row[:row.index(eos) + 1] if eos in row else row for row in rows]}
    return run, None


def llamacpp_engine(gguf_path: str, new_tokens: int, eos: Optional[int], threads: int, max_prompt: int):
    """llama.cpp greedy decoding of ``gguf_path`` through llama-cpp-python's low-level API (one
    ``llama_decode`` for the prompt, then one per token, argmax of the last row's logits), or
    None with the reason. The ``Llama`` object stays alive with the closure: freeing it while
    its context is in use crashes. Logits are read at row -1 (an absolute row past the last
    batch's outputs is a NULL pointer in release builds)."""
    try:
        import llama_cpp
    except ImportError as e:
        return None, f"llama-cpp-python not installed ({e}): pip install \"leanformer[llamacpp]\" (builds llama.cpp)"
    llm = llama_cpp.Llama(gguf_path, n_ctx=max_prompt + new_tokens + 16, n_batch=max(max_prompt, 32),
                          n_ubatch=max(max_prompt, 32), n_threads=threads, n_threads_batch=threads,
                          logits_all=False, verbose=False)
    ctx, vocab = llm.ctx, llm.n_vocab()
    memory = llama_cpp.llama_get_memory(ctx)
    one = (ctypes.c_int32 * 1)()

    def decode(ids, n: int) -> None:
        if llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(ids, n)) != 0:
            raise RuntimeError("llama_decode failed")

    def run(batch: List[List[int]]) -> dict:
        seqs = []
        for p in batch:  # llama-cpp-python decodes one sequence at a time
            llama_cpp.llama_memory_clear(memory, True)
            decode((ctypes.c_int32 * len(p))(*p), len(p))
            out = []
            while True:
                t = int(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(vocab,)).argmax())
                out.append(t)
                if t == eos or len(out) == new_tokens:
                    break
                one[0] = t
                decode(one, 1)
            seqs.append(out)
        return {"sequences": seqs}
    run.llm = llm  # kept alive as long as the engine
    return run, None


def write_f32_gguf(src: str, dst: str) -> None:
    """``dst``: the GGUF ``src`` with every tensor dequantized to F32 (the ``gguf`` package's
    reader and writer): every metadata key/value copied with its type (the tokenizer
    included), the tensors in the same order and shapes, ``general.file_type`` set to all-F32."""
    import gguf
    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"]
    writer = gguf.GGUFWriter(dst + ".partial", bytes(arch.parts[arch.data[0]]).decode())  # renamed when complete
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue  # written by GGUFWriter itself
        vtype, sub = gguf.GGUFValueType(field.types[0]), None
        if vtype == gguf.GGUFValueType.ARRAY:
            sub = gguf.GGUFValueType(field.types[1])
            value = [bytes(field.parts[i]) if sub == gguf.GGUFValueType.STRING else field.parts[i][0].item()
                     for i in field.data]
        elif vtype == gguf.GGUFValueType.STRING:
            value = bytes(field.parts[field.data[0]])
        else:
            value = field.parts[field.data[0]][0].item()
        if name == "general.file_type":
            value = int(gguf.LlamaFileType.ALL_F32)
        if name == "general.alignment":
            writer.data_alignment = int(value)
        writer.add_key_value(name, value, vtype, sub_type=sub)
    for t in reader.tensors:
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))  # GGUF lists the fastest dimension first
        data = np.asarray(t.data, dtype=np.float32) if t.tensor_type == gguf.GGMLQuantizationType.F32 \
            else gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        writer.add_tensor(t.name, np.ascontiguousarray(data.reshape(shape)))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(dst + ".partial", dst)


def f32_gguf(src: str, dst: str) -> str:
    """``dst``, the F32 copy of ``src`` (:func:`write_f32_gguf`), written on first use."""
    if not os.path.exists(dst):
        os.makedirs(os.path.dirname(dst) or ".", exist_ok=True)
        write_f32_gguf(src, dst)
    return dst


def summarize(times: List[float], result: dict, reference: List[List[int]],
              greedy_self: Optional[List[List[int]]] = None) -> dict:
    """An engine's row: tokens/s (median and range over rounds, its own tokens of the last round
    counted: every round decodes the same ones), accepted tokens per forward with its standard
    error across prompts (groups of prompts at batch > 1), and how many of its outputs equal
    ``reference`` (and ``greedy_self``)."""
    seqs = result["sequences"]
    tokens = sum(map(len, seqs))
    row = {"tokens_per_s": round(tokens / statistics.median(times), 2),
           "tokens_per_s_range": [round(tokens / max(times), 2), round(tokens / min(times), 2)],
           "seconds": [round(t, 2) for t in times],
           "same_as_plain_greedy": sum(a == b for a, b in zip(seqs, reference)), "outputs": len(seqs)}
    if "per_prompt_accepted" in result:
        per = result["per_prompt_accepted"]
        mean = statistics.mean(per)
        row["accepted_per_forward"] = round(mean, 3)
        row["accepted_per_forward_se"] = round(statistics.stdev(per) / len(per) ** 0.5, 3) if len(per) > 1 else 0.0
    if greedy_self is not None:
        row["same_as_own_greedy"] = sum(a == b for a, b in zip(seqs, greedy_self))
    return row


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="leanformer experiment real-llm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=32, help="held-out prompts")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--no-eos", action="store_true", help="decode --new-tokens tokens past the end of turn")
    p.add_argument("--rounds", type=int, default=2, help="rounds in which the engines take turns")
    p.add_argument("--batches", default="1,4")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--engines", default="all", help="comma-separated engine names to run (leanformer plain, the "
                   "reference, always runs), e.g. 'leanformer + medusa,llama.cpp Q4_1'")
    p.add_argument("--drafters", default=CACHE, help="folder of the drafters (leanformer train smollm2-drafters)")
    p.add_argument("--tree-sizes", default="4,7,11,16,24,32", help="tree sizes fastest_tree chooses from")
    p.add_argument("--lookup-depths", default="3,4,6", help="chain lengths of the lookup drafter to choose from")
    p.add_argument("--tune-tokens", type=int, default=48, help="new tokens per prompt of fastest_tree's timing")
    p.add_argument("--f32-gguf", default=os.path.join(CACHE, "SmolLM2-135M-Instruct.F32.gguf"))
    p.add_argument("--weights", choices=WEIGHTS, default="fp32",
                   help="leanformer's weights: fp32 (the GGUF dequantized), gguf (its Q4_1 / Q8_0 blocks as they are), "
                   "or our blockwise quantizer's (see leanformer.lab.train.smollm2_drafters.load_smollm2); the "
                   "plain greedy output of these weights is the reference of the drafters' outputs")
    p.add_argument("--out", default=FOLDER)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    path = smollm2_path()
    model, tokenizer = load_smollm2(weights=args.weights)
    prompts = [prompt_ids(tokenizer, q) for q in pydoc_prompts("test", args.prompts)]
    eos = None if args.no_eos else tokenizer.eos_token_id
    width = max(map(len, prompts))
    tune = [torch.tensor(prompt_ids(tokenizer, q)) for q in pydoc_prompts("train", 4, seed=1)]
    model_name = {"fp32": "SmolLM2-135M-Instruct (Q4_1 GGUF; fp32 for all but llama.cpp Q4_1)",
                  "gguf": "SmolLM2-135M-Instruct (Q4_1 GGUF; leanformer and llama.cpp Q4_1 on its blocks, "
                          "transformers and llama.cpp F32 on them dequantized)"}.get(
        args.weights, f"SmolLM2-135M-Instruct (leanformer: the GGUF's fp32 weights requantized to {args.weights}, "
                      "head q8_0)")
    report: dict = {"args": vars(args), "model": model_name,
                    "prompt_tokens": [len(q) for q in prompts], "skipped": {}, "drafters": {}, "results": {}}

    engines: Dict[str, Engine] = {"leanformer plain": leanformer_engine(model, args.new_tokens, eos)}
    sizes = [int(s) for s in args.tree_sizes.split(",")]
    trees = {}
    for name in ("medusa", "hidden-transfer"):
        if not os.path.exists(os.path.join(args.drafters, f"{name}.safetensors")):
            report["skipped"][f"leanformer + {name}"] = f"no trained drafter in {args.drafters}"
            continue
        drafter, meta = load_drafter(model, args.drafters, name)
        acc = torch.tensor(meta["rank_accuracy"])
        t0 = time.perf_counter()
        tree, rates = fastest_tree(model, drafter, acc, tune, sizes=sizes, max_new_tokens=args.tune_tokens)
        trees[name] = (drafter, acc, tree)
        report["drafters"][name] = {k: meta[k] for k in ("num_future", "layer", "command", "rank_accuracy") if k in meta}
        report["drafters"][name].update(tree_nodes=tree.num_nodes, fastest_tree_tokens_per_s={
            str(n): round(r, 1) for n, r in rates.items()}, fastest_tree_s=round(time.perf_counter() - t0, 1))
        engines[f"leanformer + {name}"] = leanformer_engine(model, args.new_tokens, eos, drafter, tree)
        print(f"{name}: tree of {tree.num_nodes} nodes (tokens/s by size {report['drafters'][name]['fastest_tree_tokens_per_s']})",
              file=sys.stderr)
    if len(trees) == 2:  # the two drafters at the same tree size: Medusa's
        n = trees["medusa"][2].num_nodes
        if trees["hidden-transfer"][2].num_nodes != n:
            ht, acc, _ = trees["hidden-transfer"]
            engines[f"leanformer + hidden-transfer @{n}"] = leanformer_engine(model, args.new_tokens, eos, ht,
                                                                                  TreeShape.from_accuracies(acc, n))

    if args.engines == "all" or "leanformer + lookup" in args.engines.split(","):
        lookup = lookup_drafter(model, args.drafters, [int(k) for k in args.lookup_depths.split(",")],
                                [torch.tensor(prompt_ids(tokenizer, q)) for q in pydoc_prompts("train", 16, seed=1)],
                                args.tune_tokens)
        report["drafters"]["lookup"] = lookup[1]
        engines["leanformer + lookup"] = leanformer_engine(model, args.new_tokens, eos, lookup[0])
        print(f"lookup: chains of {lookup[0].num_future} (tokens/s by length {lookup[1]['tokens_per_s_by_depth']})",
              file=sys.stderr)

    for name, make in (("transformers greedy", lambda: transformers_engine(path, args.new_tokens, eos)),
                       ("transformers prompt-lookup", lambda: transformers_engine(path, args.new_tokens, eos, prompt_lookup=10)),
                       ("llama.cpp F32", lambda: llamacpp_engine(f32_gguf(path, args.f32_gguf), args.new_tokens, eos, args.threads, width)),
                       ("llama.cpp Q4_1", lambda: llamacpp_engine(path, args.new_tokens, eos, args.threads, width))):
        if args.engines != "all" and name not in args.engines.split(","):
            continue
        try:
            engine, why = make()
        except Exception as e:  # an engine that fails to load is reported, the others still run
            engine, why = None, f"failed to load: {type(e).__name__}: {e}"
        if engine is None:
            report["skipped"][name] = why
            print(f"skipped {name}: {why}", file=sys.stderr)
        else:
            engines[name] = engine
    if args.engines != "all":
        engines = {k: v for k, v in engines.items() if k in args.engines.split(",") or k == "leanformer plain"}

    reference = None
    for batch in [int(b) for b in args.batches.split(",")]:
        groups = [prompts[i:i + batch] for i in range(0, len(prompts), batch)]
        names = [n for n in engines if batch == 1 or not n.startswith(("llama.cpp", "transformers prompt"))]
        for n in set(engines) - set(names):
            report["skipped"][f"{n}, batch {batch}"] = ("llama-cpp-python's Llama decodes one sequence" if "llama" in n
                                                        else "transformers' prompt lookup decodes one sequence")
        for n in names:  # warm-up: one short generation each
            engines[n]([prompts[0][:16]])
        times: Dict[str, List[float]] = {n: [] for n in names}
        loads = [round(os.getloadavg()[0], 2)]  # the host's 1-minute load average before and after each round
        last: Dict[str, dict] = {}
        for r in range(args.rounds):
            for n in (names if r % 2 == 0 else names[::-1]):  # alternated, and the order reversed each round
                seqs, per_prompt = [], []
                t0 = time.perf_counter()
                for g in groups:
                    out = engines[n](g)
                    seqs += out["sequences"]
                    if "accepted" in out:
                        per_prompt.append(statistics.mean(out["accepted"]))
                times[n].append(time.perf_counter() - t0)
                last[n] = {"sequences": seqs, **({"per_prompt_accepted": per_prompt} if per_prompt else {})}
                print(f"batch {batch} round {r + 1}: {n} {sum(map(len, seqs)) / times[n][-1]:.1f} tok/s",
                      file=sys.stderr, flush=True)
            loads.append(round(os.getloadavg()[0], 2))
        if reference is None:  # plain greedy at the first batch size (batch 1 by default) is the reference
            reference = last["leanformer plain"]["sequences"]
        rows = {}
        for n in names:
            own = last.get("transformers greedy", {}).get("sequences") if n == "transformers prompt-lookup" else None
            rows[n] = summarize(times[n], last[n], reference, own)
        for n, row in rows.items():
            row["vs_leanformer_plain"] = round(row["tokens_per_s"] / rows["leanformer plain"]["tokens_per_s"], 3)
        report["results"][f"batch{batch}"] = rows
        report[f"load_average_batch{batch}"] = loads
        for n, row in rows.items():
            acc = (f"  accepted/forward {row['accepted_per_forward']:.2f} +- {row['accepted_per_forward_se']:.2f}"
                   if "accepted_per_forward" in row else "")
            print(f"batch {batch}  {n:36s} {row['tokens_per_s']:7.1f} tok/s ({row['tokens_per_s_range'][0]:.1f}-"
                  f"{row['tokens_per_s_range'][1]:.1f})  x{row['vs_leanformer_plain']:.2f} plain  same as plain greedy "
                  f"{row['same_as_plain_greedy']}/{row['outputs']}" + acc)
    for n, why in report["skipped"].items():
        print(f"skipped: {n}: {why}")
    name = "experiment-real-llm" + ("" if args.weights == "fp32" else f"-{args.weights}")  # one file per weights
    out = write_json(stem(args.out, name), report)
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
