"""The CPU kernels pick their vector tiles (AVX-512, AVX2, portable) when the library loads;
LEANFORMER_DISABLE_AVX512=1 forces the AVX2 tiles, so both paths of the shared small GEMM and
the softmax (and packed_linear's tiles, decode_attention's vectors, nm_sparse_linear's GEMV) are
checked against the references on one AVX-512 machine."""
import json
import os
import subprocess
import sys

import pytest

from leanformer import _C

SCRIPT = r"""
import json, torch
from leanformer import _C
from leanformer.ops import simplified_linear_attention, tree_attention
from leanformer.reference import sla_causal_quadratic_reference, tree_attention_reference
torch.manual_seed(0)
errors = {}
# head dims 80 and 40: whole 64-column AVX-512 blocks plus a 16-column tail; fp64 as gradcheck runs it
for dtype in (torch.float32, torch.float64):
    B, L, T, Hq, Hkv, D = 2, 300, 21, 6, 2, 80
    args = [torch.randn(B, T, Hq, D, dtype=dtype), torch.randn(B, L, Hkv, D, dtype=dtype),
            torch.randn(B, L, Hkv, D, dtype=dtype), torch.tensor([300, 97]),
            torch.randn(B, T, Hkv, D, dtype=dtype), torch.randn(B, T, Hkv, D, dtype=dtype)]
    parents = torch.tensor([-1] + [int(i * 0.6) for i in range(1, T)])
    mask = torch.eye(T, dtype=torch.bool)
    for i in range(1, T):
        mask[i] |= mask[parents[i]]
    args.append(mask)
    errors[f"tree_attention {dtype}"] = (tree_attention(*args) - tree_attention_reference(*args)).abs().max().item()
    q, k, v = (torch.randn(1, 150, 3, 40, dtype=dtype) for _ in range(3))
    errors[f"linear_attention {dtype}"] = (simplified_linear_attention(q, k, v, causal=True)
                                           - sla_causal_quadratic_reference(q, k, v)[0]).abs().max().item()
    # packed_linear: 12-row (AVX-512) or 3-row (AVX2) tiles, a partial last panel, fp64 as gradcheck runs it
    from leanformer.ops import pack_linear_weight, packed_linear
    x, w, b = torch.randn(3, 17, 70, dtype=dtype), torch.randn(45, 70, dtype=dtype), torch.randn(45, dtype=dtype)
    errors[f"packed_linear {dtype}"] = (packed_linear(x, pack_linear_weight(w), b, 45)
                                        - torch.nn.functional.linear(x, w, b)).abs().max().item()
    from leanformer.ops import pack_swiglu_weight, packed_swiglu
    wu = torch.randn(45, 70, dtype=dtype)
    errors[f"packed_swiglu {dtype}"] = (packed_swiglu(x, pack_swiglu_weight(w, wu), 45) - torch.nn.functional.silu(
        torch.nn.functional.linear(x, w)) * torch.nn.functional.linear(x, wu)).abs().max().item()
# decode_attention: 16- (AVX-512) or 8-float (AVX2) vectors, head dim 40 (a partial vector), fp32
from leanformer.ops import decode_attention
from leanformer.reference import decode_attention_reference
qkv, kc, vc = torch.randn(2, 10 * 40), torch.randn(2, 300, 2, 40), torch.randn(2, 300, 2, 40)
angles = torch.rand(300, 20)
cs = (torch.cat([angles.cos()] * 2, -1), torch.cat([-angles.sin(), angles.sin()], -1))
lens = torch.tensor([299, 37])
want = decode_attention_reference(qkv, kc.clone(), vc.clone(), lens, *cs, 6)
errors["decode_attention float32"] = (decode_attention(qkv, kc, vc, lens, *cs, 6) - want).abs().max().item()
# nm_sparse_linear's one-token GEMV: 16 values per meta word (AVX-512) or 8 (AVX2), 4 rows at a
# time: 13 rows (a partial row block), 6 or 3 whole meta words and a tail of values; 3 tokens take
# the tile kernel. Relative to the largest output, as bf16 / fp16 outputs are rounded.
from leanformer.ops import nm_sparse_linear
from leanformer.sparse import NMSparseMatrix
for n in (2, 1):
    s = NMSparseMatrix.prune(torch.randn(13, 200), n, 4)
    bias = torch.randn(13)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for tokens in (1, 3):
            x = torch.randn(tokens, 200).to(dtype)
            values, b = s.values.to(dtype), bias.to(dtype)
            want = x.float() @ s.to_dense().to(dtype).float().T + b.float()
            got = nm_sparse_linear(x, values, s.meta, b, n=n, m=4).float()
            errors[f"nm_sparse_linear {n}:4 N={tokens} {str(dtype)[6:]}"] = (
                (got - want).abs().max() / want.abs().max()).item()
print(json.dumps({"isa": _C.cpu_vector_isa(), "errors": errors}))
"""


def run(disable_avx512: bool) -> dict:
    env = dict(os.environ)
    env.pop("LEANFORMER_DISABLE_AVX512", None)
    if disable_avx512:
        env["LEANFORMER_DISABLE_AVX512"] = "1"
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


TOLERANCES = {"float64": 1e-10, "float32": 1e-4, "bfloat16": 1e-2, "float16": 2e-3}


def check(result: dict) -> None:
    for what, err in result["errors"].items():
        tol = TOLERANCES[what.split()[-1].removeprefix("torch.")]
        assert err <= tol, f"{result['isa']} {what}: max error {err:.3g}"


def test_default_tiles_match_the_references():
    result = run(disable_avx512=False)
    assert result["isa"] == _C.cpu_vector_isa() or "LEANFORMER_DISABLE_AVX512" in os.environ
    check(result)


@pytest.mark.skipif(_C.cpu_vector_isa() != "avx512" or "LEANFORMER_DISABLE_AVX512" in os.environ,
                    reason="the CPU has no AVX-512: the default run already uses the AVX2 tiles")
def test_avx2_tiles_on_an_avx512_cpu_match_the_references():
    result = run(disable_avx512=True)
    assert result["isa"] == "avx2"
    check(result)


# quantized_linear has three paths (AVX-512 VNNI, AVX2, portable; LEANFORMER_DISABLE_AVX2=1 picks
# the portable loops), for x's int8 rounding and the products, that perform the same fp32 operations
# in the same order: the same bits.
QUANT_SCRIPT = r"""
import hashlib, json, torch
from leanformer.ops import quantized_linear
from leanformer.quant import FORMATS, BlockQuantizedMatrix
from leanformer.reference import quantized_linear_reference
torch.manual_seed(0)
digest, errors = hashlib.sha256(), {}
for fmt, (bits, sym) in FORMATS.items():
    q = BlockQuantizedMatrix.from_dense(torch.randn(45, 160), bits=bits, symmetric=sym)
    for rows in (1, 3, 13):
        x, b = torch.randn(rows, 160), torch.randn(45)
        y = quantized_linear(x, q, b)
        digest.update(y.numpy().tobytes())
        ref = quantized_linear_reference(x, q.qweight, q.scales, q.mins, b, bits, 45)
        errors[f"{fmt} {rows}"] = ((y - ref).abs().max() / ref.abs().max()).item()
    # the int8 rounding's edges: ties (max 127: v * 127 / max = v, half to even), a zero block, a tiny
    # row, an infinite block (every path's codes then -127 where v * 0 is NaN)
    x = torch.randn(5, 160) * 3
    x[0, :32] = torch.tensor([127.0] + [k + 0.5 for k in range(-15, 16)])
    x[1, 32:64] = 0.0
    x[2, 64:96] = torch.tensor([-127.0] + [k - 0.5 for k in range(31)])
    x[3] *= 1e-30
    x[4, :32] = float("inf")
    digest.update(torch.nan_to_num(quantized_linear(x, q)).numpy().tobytes())
print(json.dumps({"digest": digest.hexdigest(), "errors": errors}))
"""


def run_quant(script=QUANT_SCRIPT, **env_flags) -> dict:
    """script's JSON output, run in a fresh process with env_flags (and no ISA flags of ours)."""
    env = {k: v for k, v in os.environ.items() if k not in ("LEANFORMER_DISABLE_AVX512", "LEANFORMER_DISABLE_AVX2")}
    env.update(env_flags)
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_quantized_linear_paths_give_the_same_bits():
    results = [run_quant(), run_quant(LEANFORMER_DISABLE_AVX512="1"), run_quant(LEANFORMER_DISABLE_AVX2="1")]
    for r in results:
        assert max(r["errors"].values()) < 1e-5, r["errors"]
    assert len({r["digest"] for r in results}) == 1


# rms_norm has three paths (AVX-512, AVX2, portable) with one fixed summation order: the same bits.
# Widths around the 16-lane vectors and their tails, every dtype.
RMS_SCRIPT = r"""
import hashlib, json, torch
from leanformer.ops import rms_norm
from leanformer.reference import rms_norm_reference
torch.manual_seed(0)
digest, errors = hashlib.sha256(), {}
for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
    for C in (1, 7, 15, 16, 17, 24, 576, 1000):
        x, w = (torch.randn(5, C) * 3).to(dtype), torch.randn(C).to(dtype)
        y = rms_norm(x, w, 1e-6)
        digest.update(y.view(torch.uint8).numpy().tobytes())
        ref = rms_norm_reference(x, w, 1e-6)
        errors[f"{C} {dtype}"] = ((y.double() - ref.double()).abs().max() / ref.double().abs().max()).item()
print(json.dumps({"digest": digest.hexdigest(), "errors": errors}))
"""


def test_rms_norm_paths_give_the_same_bits():
    results = [run_quant(script=RMS_SCRIPT), run_quant(script=RMS_SCRIPT, LEANFORMER_DISABLE_AVX512="1"),
               run_quant(script=RMS_SCRIPT, LEANFORMER_DISABLE_AVX2="1")]
    for r in results:
        for what, err in r["errors"].items():
            assert err <= TOLERANCES[what.split()[-1].removeprefix("torch.")], (what, err)
    assert len({r["digest"] for r in results}) == 1
