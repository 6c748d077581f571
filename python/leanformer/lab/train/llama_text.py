"""A LlamaLM (RoPE, RMSNorm, SwiGLU, GQA) on Python's pydoc topics, byte level, with the last
topics held out: validation perplexity over training, then its KV-cached decoding (a batch
of prompts of different lengths, prefill then steps) checked against the full forward.

    leanformer train llama-text [--steps 600] [--out bench/results] [--save DIR]
"""
from __future__ import annotations

import sys
from typing import List, Optional

import torch

from leanformer.lab import results as report
from leanformer.lab.train.lm_text import lm_loss, pydoc_lm_data, text_lm_parser
from leanformer.models import LlamaConfig, LlamaLM, save_pretrained
from leanformer.training import random_windows, train


def config() -> LlamaConfig:
    return LlamaConfig(vocab_size=256, dim=192, depth=4, num_heads=6, num_kv_heads=2, max_seq_len=1024)


@torch.no_grad()
def cached_vs_full(model: LlamaLM, windows: torch.Tensor) -> float:
    """Max |logit difference| between the full forward and a prefill of right-padded prompts of
    different lengths followed by single steps."""
    B, N = windows.shape
    lengths = torch.tensor([N // 4 + 7 * b for b in range(B)]).clamp(max=N - 8)
    cache = model.new_cache(B, N + 8)
    pre = model(windows[:, :int(lengths.max())], cache=cache, lengths=lengths)
    worst = 0.0
    full = model(windows)
    for b in range(B):
        worst = max(worst, (pre[b, :lengths[b]] - full[b, :lengths[b]]).abs().max().item())
    for t in range(8):
        ids = windows[torch.arange(B), lengths + t][:, None]
        step = model(ids, cache=cache)[:, 0]
        worst = max(worst, (step - full[torch.arange(B), lengths + t]).abs().max().item())
    return worst


def main(argv: Optional[List[str]] = None) -> int:
    p = text_lm_parser("leanformer train llama-text", __doc__)
    p.add_argument("--save", default=None, help="folder to save the trained model in")
    args = p.parse_args(argv)
    train_tokens, _, val, evaluate = pydoc_lm_data(args.length, args.eval_windows)

    torch.manual_seed(args.seed)
    model = LlamaLM(config())
    data = random_windows(train_tokens, args.batch, args.length, torch.Generator().manual_seed(args.seed))
    curves = {"LlamaLM": train(model, data, lm_loss, steps=args.steps, lr=args.lr, evaluate=evaluate,
                               eval_every=max(1, args.steps // 20), desc="LlamaLM")}
    model.eval()
    diff = cached_vs_full(model, val[:4, :-1])
    summary = {"params": sum(t.numel() for t in model.parameters()), "steps": args.steps, "batch": args.batch,
               "length": args.length, "config": vars(config()), "final": curves["LlamaLM"][-1],
               "cached_vs_full_max_abs_logit_diff": diff}
    report.write(report.stem(args.out, "train-llama-text"), summary, curves, "val_ppl",
                 "validation perplexity (bytes)", logy=True)
    if args.save:
        save_pretrained(model, args.save)
    h = curves["LlamaLM"][-1]
    print(f"LlamaLM ({summary['params']:,} params) step {h['step']}  val ppl {h['val_ppl']:.3f}  train time "
          f"{h['time_s']:.0f} s; cached (variable-length batch) vs full forward max |diff| {diff:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
