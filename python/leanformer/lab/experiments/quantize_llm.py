"""What blockwise quantization costs a real model: SmolLM2-135M-Instruct in each of the weights of
:data:`leanformer.lab.train.smollm2_drafters.WEIGHTS` against its fp32 weights (the Q4_1 GGUF
dequantized): perplexity on held-out pydoc text (the test topics of
:func:`leanformer.lab.data.pydoc_text`, never seen by the drafters), how often the next-token
argmax equals the fp32 model's, and the bits a weight of the Linear layers (codes, scales,
minima; the embedding table, dequantized for lookups, left out).

The variants: ``gguf`` reads the file's own Q4_1 blocks (and its Q8_0 embedding as the tied head);
``q4_1`` / ``q4_0`` / ``q8_0`` requantize the fp32 weights with :func:`leanformer.compress.quantize`
(BCT-style: each block's scale, and minimum, chosen by its reconstruction error over clipping
ratios), the head in q8_0 as the GGUF has it; ``-rtn`` the same with round-to-nearest scales (no
search). Every quantized variant also rounds activations to int8 per block of 32, as
:func:`leanformer.ops.quantized_linear` (and llama.cpp) do.

    leanformer experiment quantize-smollm2 [--windows 24] [--length 256]
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from typing import List, Optional

import torch
import torch.nn.functional as F

from leanformer.lab.data import pydoc_text
from leanformer.lab.results import FOLDER, stem, write_json
from leanformer.lab.train.smollm2_drafters import WEIGHTS, load_smollm2
from leanformer.nn import QuantizedLinear


def held_out_windows(tokenizer, n: int, length: int) -> torch.Tensor:
    """``n`` windows of ``length + 1`` tokens, evenly spaced over the held-out pydoc topics."""
    _, val = pydoc_text()
    text = bytes(val.tolist()).decode("utf-8", errors="replace")
    ids = torch.tensor(tokenizer.encode(text))
    if len(ids) < n * (length + 1):
        raise ValueError(f"the held-out text has {len(ids)} tokens, fewer than {n} windows of {length + 1}")
    starts = torch.linspace(0, len(ids) - length - 1, n).long()
    return torch.stack([ids[s:s + length + 1] for s in starts.tolist()])


def linear_bits(model) -> float:
    """Bits a weight over the model's Linear layers (tied weights once)."""
    bits = weights = 0
    seen = set()
    for m in model.modules():
        if isinstance(m, QuantizedLinear):
            bits += m.matrix().storage_bits()
            weights += m.in_features * m.out_features
        elif isinstance(m, torch.nn.Linear) and m.weight.data_ptr() not in seen:
            seen.add(m.weight.data_ptr())
            bits += m.weight.numel() * m.weight.element_size() * 8
            weights += m.weight.numel()
    return bits / weights


@torch.inference_mode()
def evaluate(model, windows: torch.Tensor, reference: Optional[List[torch.Tensor]], batch: int):
    """(perplexity, next-token agreement with ``reference``'s argmax, this model's argmax per batch)."""
    nll, count, agree, argmaxes = 0.0, 0, 0, []
    for i in range(0, len(windows), batch):
        w = windows[i:i + batch]
        logits = model(w[:, :-1])
        nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), w[:, 1:].reshape(-1),
                               reduction="sum").item()
        count += w[:, 1:].numel()
        top = logits.argmax(-1)
        argmaxes.append(top)
        if reference is not None:
            agree += (top == reference[len(argmaxes) - 1]).sum().item()
    return math.exp(nll / count), (agree / count if reference is not None else 1.0), argmaxes


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="leanformer experiment quantize-smollm2", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default=",".join(WEIGHTS), help="comma-separated variants (fp32 always runs first)")
    p.add_argument("--windows", type=int, default=24, help="held-out windows")
    p.add_argument("--length", type=int, default=256, help="tokens a window")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=FOLDER)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    variants = ["fp32"] + [w for w in args.weights.split(",") if w and w != "fp32"]
    for w in variants:
        if w not in WEIGHTS:
            p.error(f"unknown weights {w!r} (choose from {', '.join(WEIGHTS)})")
    report = {"args": vars(args), "model": "SmolLM2-135M-Instruct", "results": {}}
    reference = windows = None
    for name in variants:
        t0 = time.perf_counter()
        model, tokenizer = load_smollm2(weights=name)
        load_s = time.perf_counter() - t0
        if windows is None:
            windows = held_out_windows(tokenizer, args.windows, args.length)
            report["tokens"] = int(windows[:, 1:].numel())
        t0 = time.perf_counter()
        ppl, agree, top = evaluate(model, windows, reference, args.batch)
        if reference is None:
            reference = top
        row = {"perplexity": round(ppl, 4), "next_token_agreement": round(agree, 4),
               "linear_bits_per_weight": round(linear_bits(model), 3),
               "load_s": round(load_s, 1), "eval_s": round(time.perf_counter() - t0, 1)}
        report["results"][name] = row
        print(f"{name:10s} perplexity {ppl:8.3f}  agreement with fp32 {agree:.4f}  "
              f"{row['linear_bits_per_weight']:.2f} bits/weight  (load {load_s:.0f} s, eval {row['eval_s']:.0f} s)",
              file=sys.stderr, flush=True)
        del model
    out = write_json(stem(args.out, "experiment-quantize-smollm2"), report)
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
