"""What the tests share: the devices and dtypes to run on, the tolerance per dtype and the
comparison against a reference, the torch.compile check, gradients of a function, and the
sample inputs more than one test file builds (random and drafted token trees, MLP weights,
trained-like weights), and a failure that has to happen in a fresh process."""
import os
import subprocess
import sys

import pytest
import torch

from leanformer import emu
from leanformer.reference import ancestor_mask

# ---- devices and dtypes ----

# "emu": the CUDA kernels emulated on the CPU (leanformer.emu, built by `python -m
# leanformer.emu build`): the CUDA test cases run there on every machine, skipped with the
# reason where the emulation is not built. tests/conftest.py makes the device string "emu"
# work in a test that takes a `device` parameter.
EMU_UNAVAILABLE = emu.unavailable_reason()
GPU_DEVICES = (["cuda"] if torch.cuda.is_available() else []) + ["emu"]
DEVICES = ["cpu"] + GPU_DEVICES
# The devices torch itself knows, for tests of modules, models and formats above the ops (the
# emulated device is for the op tests: nn.Module.to does not take "emu").
TORCH_DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def is_gpu(device):
    """The CUDA kernels run on this device: "cuda", or "emu", their CPU emulation."""
    return device in ("cuda", "emu")


def generator_device(device):
    """The device of a torch.Generator that draws tensors for `device` ("emu" draws on the CPU)."""
    return "cpu" if device == "emu" else device


def skip_on_emu(device, why):
    """Skips a case of the emulated device: tests of what the emulation does not model (fake
    kernels under torch.compile / opcheck, two device types, CUDA generators, host syncs)."""
    if device == "emu":
        pytest.skip(f"not on the CUDA emulation: {why}")


def dtypes_for(device):
    """Every dtype the ops accept on that device (fp64 is for gradcheck, tested there)."""
    return [torch.float32, torch.bfloat16] + ([torch.float16] if is_gpu(device) else [])


def device_dtypes(*, fp64=False, devices=None):
    """(device, dtype) pairs for ``@pytest.mark.parametrize("device,dtype", ...)``: every
    device (of ``devices``, default DEVICES) with :func:`dtypes_for`, plus float64 where ``fp64``."""
    return [(d, dt) for d in (DEVICES if devices is None else devices)
            for dt in dtypes_for(d) + ([torch.float64] if fp64 else [])]


# ---- tolerances and the comparison against a reference ----

# Error allowed against a reference of the same (rounded) inputs, relative to the reference's
# largest magnitude (at least 1): a few units in the last place of the 16-bit dtypes (the
# output's own rounding), the error of short fp32 / fp64 sums. A family whose math needs
# another tolerance passes `scale`, with a comment saying why, rather than keeping a table.
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float64: 1e-12}


def tolerance(dtype, scale=1.0):
    """``TOL[dtype]`` times ``scale``: a number for every dtype, or ``{dtype: factor}`` for the
    dtypes it names (the others keep 1), e.g. fp32 results of long sums compared with an fp32
    reference. Also for a test that compares with another metric (an elementwise
    torch.testing.assert_close, a norm-wise error)."""
    factor = scale.get(dtype, 1.0) if isinstance(scale, dict) else scale
    return factor * TOL[dtype]


def rel_error(actual, expected):
    """max |actual - expected| / max(max |expected|, 1), in fp64 (0 for empty tensors)."""
    if actual.numel() == 0:
        return 0.0
    scale = expected.double().abs().max().clamp_min(1.0)
    return ((actual.double() - expected.double()).abs().max() / scale).item()


def assert_close(actual, expected, dtype, what="", *, scale=1.0, absolute=False):
    """Same shape, and :func:`rel_error` within ``tolerance(dtype, scale)``. ``absolute``:
    max |actual - expected| itself within it, for outputs known to be O(1) (attention's
    weighted averages), where an error relative to a larger max |expected| would allow more."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    tol = tolerance(dtype, scale)
    if absolute:
        err = (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0
        assert err <= tol, f"{what}: max error {err:.3g} > {tol:g}"
    else:
        err = rel_error(actual, expected)
        assert err <= tol, f"{what}: relative error {err:.3g} > {tol:g}"


# ---- autograd and torch.compile ----

def grads_of(fn, inputs, grad_out):
    """fn(*inputs) and the gradients of <fn(*inputs), grad_out> w.r.t. each input (None
    inputs stay None), computed on detached copies."""
    inputs = [x.detach().clone().requires_grad_(True) if x is not None else None for x in inputs]
    out = fn(*inputs)
    out.backward(grad_out)
    return out, [x.grad if x is not None else None for x in inputs]


def opcheck_each(samples):
    """torch.library.opcheck of each sample, (name, args) or (name, args, kwargs) of a
    torch.ops.leanformer op."""
    for name, args, *kwargs in samples:
        torch.library.opcheck(getattr(torch.ops.leanformer, name).default, args, *kwargs)


def assert_compiles_like_eager(f, args):
    """torch.compile(f, fullgraph=True) (aot_eager: the fake kernels and autograd through
    AOTAutograd, no codegen) gives eager's output and gradients w.r.t. every arg."""
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out, out_ref = compiled(*args), f(*args)
    torch.testing.assert_close(out, out_ref)
    for g, g_ref in zip(torch.autograd.grad(out.sum(), args), torch.autograd.grad(out_ref.sum(), args)):
        torch.testing.assert_close(g, g_ref)


def assert_fails_in_subprocess(script, message):
    """Runs the Python script in a fresh process and checks that it fails saying message: for
    a CUDA device-side assert, which poisons the CUDA context of the process it trips in."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode != 0, "a bad value must not pass silently"
    assert message in run.stdout + run.stderr, run.stdout + run.stderr


# ---- token trees ----

def random_parents(T, batch=None, generator=None):
    """parents [T] (or [batch, T]) of a random tree: parents[0] = -1, parents[i] uniform in [0, i)."""
    shape = (T,) if batch is None else (batch, T)
    u = torch.rand(shape, generator=generator)
    parents = (u * torch.arange(T)).long()
    parents[..., 0] = -1
    return parents


def random_tree(T, batch=None, device="cpu", generator=None):
    """(parents, tree_mask) on device."""
    parents = random_parents(T, batch, generator)
    return parents.to(device), ancestor_mask(parents).to(device)


def drafted_tree(B, T, V, device="cpu", batched_parents=False, pad_fraction=0.15, repeat_fraction=0.0,
                 generator=None):
    """(logits [B, T, V], tokens [B, T], parents) of a random tree whose tokens often are their
    parent's argmax, so greedy paths run deep (no two peaks of a row tie); about pad_fraction
    of the nodes are -1 padding, and about repeat_fraction repeat the token of the sibling
    before them."""
    parents = random_parents(T, B if batched_parents else None, generator)
    tokens = torch.randint(0, V, (B, T), generator=generator)
    logits = torch.randn(B, T, V, generator=generator)
    par = parents.expand(B, T)
    for i in range(1, T):
        hit = torch.rand(B, generator=generator) < 0.6   # the parent's argmax is this node's token
        logits[hit, par[hit, i]] = logits[hit, par[hit, i]].scatter(-1, tokens[hit, i, None], 10.0 + i / T)
    tokens[:, 1:][torch.rand(B, T - 1, generator=generator) < pad_fraction] = -1
    if repeat_fraction:
        repeat = torch.rand(B, T, generator=generator) < repeat_fraction
        siblings = par[:, 2:] == par[:, 1:-1]
        tokens[:, 2:] = torch.where(repeat[:, 2:] & siblings, tokens[:, 1:-1], tokens[:, 2:])
    return logits.to(device), tokens.to(device), parents.to(device)


# ---- weights ----

def make_mlp(N, d_model, d_ff, dtype, device, bias=True):
    """x [*N, d_model] and an MLP's (w_up, b_up, w_down_t, b_down) at init scale, the
    argument order of topk_mlp; the biases None without bias."""
    g = lambda *s, scale=1.0: (torch.randn(*s, device=device) * scale).to(dtype)
    x = g(*N, d_model)
    w_up, w_down_t = g(d_ff, d_model, scale=d_model ** -0.5), g(d_ff, d_model, scale=d_ff ** -0.5)
    b_up, b_down = (g(d_ff, scale=0.1), g(d_model, scale=0.1)) if bias else (None, None)
    return x, w_up, b_up, w_down_t, b_down


def trained_like(out_f, in_f, decay=0.9, dtype=torch.float32, device="cpu"):
    """A weight with a decaying spectrum, like trained layers (a random one is nearly flat)."""
    u, _ = torch.linalg.qr(torch.randn(out_f, out_f))
    v, _ = torch.linalg.qr(torch.randn(in_f, in_f))
    k = min(out_f, in_f)
    s = decay ** torch.arange(k, dtype=torch.float32)
    return ((u[:, :k] * s) @ v[:, :k].T).to(device=device, dtype=dtype)


def sequential_decode_steps(qkv, kc, vc, lens, cos, sin, H, parents):
    """Each node by plain decode_attention steps along its path (root first) on a copy of the
    cache: its output, and the cache rows its path leaves (what decode_attention_tree must equal,
    bit for bit; parents [T] or [B, T])."""
    from leanformer.ops import decode_attention as step
    B, T = qkv.shape[:2]
    outs = torch.empty(B, T, H * kc.shape[-1], dtype=qkv.dtype)
    rows = []
    for b in range(B):
        par = parents if parents.dim() == 1 else parents[b]
        for i in range(T):
            path, n = [], i
            while n >= 0:
                path.append(n)
                n = int(par[n])
            k2, v2, l2 = kc[b:b + 1].clone(), vc[b:b + 1].clone(), lens[b:b + 1].clone()
            for node in path[::-1]:
                o = step(qkv[b:b + 1, node], k2, v2, l2, cos, sin, H)
                l2 += 1
            outs[b, i] = o[0]
            rows.append((b, i, k2[0, l2[0] - 1], v2[0, l2[0] - 1]))
    return outs, rows


@pytest.fixture
def two_threads():
    """torch's thread count set to 2 for the test (then restored): the threading tests count
    parallel chunks and helper work the same way on any machine. Use it with
    ``pytestmark = pytest.mark.usefixtures("two_threads")`` after importing it."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def assert_two_token_sampling(out, expected, V):
    """Chi-square of the first two tokens of ``out`` (a Generation of N sequences) against
    ``expected`` (``[V * V]``, the exact probability of each pair) at the 99.9% level, and the
    rare pairs (under 5 expected draws) drawn about as rarely."""
    import math
    pairs = out.padded()
    N = pairs.shape[0]
    counts = torch.bincount(pairs[:, 0] * V + pairs[:, 1], minlength=V * V).double()
    keep = expected * N >= 5
    assert counts[~keep].sum() <= max(10, 3 * expected[~keep].sum() * N)
    chi2 = (((counts[keep] - N * expected[keep]) ** 2) / (N * expected[keep])).sum().item()
    dof = int(keep.sum()) - 1
    # 99.9% quantile of chi-square by Wilson-Hilferty
    limit = dof * (1 - 2 / (9 * dof) + 3.09 * math.sqrt(2 / (9 * dof))) ** 3
    assert chi2 < limit, (chi2, limit, dof)
