"""RepBN / PRepBN under torch.distributed: synchronized batch statistics.

The real test launches tests/ops/rep_batchnorm_sync_worker.py on two gloo ranks (CPU) through
torch.distributed.run and checks it against one process on the concatenated batch; the
others check the ops the synchronized path is made of, in this process, and that nothing
changes without an initialized process group.
"""
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

import leanformer
from leanformer.nn import PRepBN, RepBN
from leanformer.ops import progressive_norm, rep_batchnorm, sync_rep_batchnorm
from tests.helpers import DEVICES, skip_on_emu

_ops = torch.ops.leanformer
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "rep_batchnorm_sync_worker.py")


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                    reason="needs torch.distributed with gloo")
def test_two_gloo_ranks_match_one_process_on_the_concatenated_batch():
    env = dict(os.environ)
    # The ranks import this same leanformer (an in-place build included).
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(leanformer.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", WORKER]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the two-rank run did not finish in {e.timeout} s:\n{e.stdout}\n{e.stderr}")
    out = f"$ {' '.join(cmd)}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    assert proc.returncode == 0, out
    assert "9 cases x 2 steps compared, 0 mismatches" in proc.stdout, out


def make_params(C, device="cpu"):
    p = dict(ln_weight=torch.rand(C) + 0.5, ln_bias=torch.randn(C), bn_weight=torch.rand(C) + 0.5,
             bn_bias=torch.randn(C), alpha=torch.tensor([0.6]))
    return {k: v.to(device) for k, v in p.items()}


def test_without_a_process_group_the_modules_are_unchanged():
    assert not dist.is_initialized()
    x = torch.randn(3, 9, 8) + 2
    mask = torch.rand(3, 9) > 0.3
    m = RepBN(8)
    assert not m.synchronized()
    rm, rv = torch.zeros(8), torch.ones(8)
    want = rep_batchnorm(x, m.weight, m.bias, m.alpha, rm, rv, training=True, mask=mask)
    assert torch.equal(m(x, mask), want)
    assert torch.equal(m.running_mean, rm) and torch.equal(m.running_var, rv)

    pm = PRepBN(8, total_steps=4)
    pm.step.fill_(1)
    bn = pm.bn
    rm, rv = torch.zeros(8), torch.ones(8)
    want = progressive_norm(x, pm.ln.weight, pm.ln.bias, bn.weight, bn.bias, bn.alpha, rm, rv, 0.75,
                            training=True, mask=mask)
    assert torch.equal(pm(x, mask), want)
    assert torch.equal(bn.running_mean, rm) and torch.equal(bn.running_var, rv)


def test_bad_process_group_raises_clear_errors():
    with pytest.raises(TypeError, match="process_group must be a torch.distributed.ProcessGroup"):
        RepBN(8, process_group="world")
    with pytest.raises(TypeError, match="process_group must be a torch.distributed.ProcessGroup"):
        PRepBN(8, total_steps=4, process_group=0)
    x = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="initialized torch.distributed process group"):
        sync_rep_batchnorm(x, torch.ones(8), torch.zeros(8), torch.ones(1), torch.zeros(8), torch.ones(8))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("masked", [False, True])
def test_stats_are_the_sums_over_counted_tokens(device, dtype, masked):
    x = (torch.randn(5, 13, 11, dtype=torch.float64) * 3 + 40).to(device, dtype)
    mask = (torch.rand(5, 13) > 0.4).to(device) if masked else None
    s = _ops.rep_batchnorm_stats(x, mask)
    assert s.dtype == torch.float64 and s.shape == (23,) and s.device == x.device
    rows = x.double().reshape(-1, 11)
    if masked:
        rows = rows[mask.reshape(-1)]
    count = torch.tensor([float(rows.shape[0])], dtype=torch.float64, device=device)
    want = torch.cat([rows.sum(0), (rows * rows).sum(0), count])
    tol = 1e-12 if dtype == torch.float64 else 1e-6  # fp32 blocks inside, about shifts in the data
    torch.testing.assert_close(s, want, rtol=tol, atol=tol)
    # no token counted (one rank may have none)
    s0 = _ops.rep_batchnorm_stats(x, torch.zeros(5, 13, dtype=torch.bool, device=device))
    assert torch.equal(s0, torch.zeros(23, dtype=torch.float64, device=device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("gamma", [0.0, 0.35])
@pytest.mark.parametrize("masked", [False, True])
def test_backward_reduce_and_elemt_compose_to_the_backward(device, gamma, masked):
    """One rank's split backward (column sums, then dx from their means) is the fused one."""
    x = (torch.randn(4, 9, 10) * 2 + 1).to(device)
    dy = torch.randn(4, 9, 10).to(device)
    mask = (torch.rand(4, 9) > 0.3).to(device) if masked else None
    p = make_params(10, device)
    rm, rv = torch.zeros(10, device=device), torch.ones(10, device=device)
    _, mean, invstd = _ops.progressive_norm(x, *p.values(), rm, rv, gamma, True, 1e-5, 1e-5, mask)
    want = _ops.progressive_norm_backward(dy, x, p["ln_weight"], p["bn_weight"], p["alpha"], mean, invstd,
                                          gamma, True, 1e-5, mask)
    sums = _ops.progressive_norm_backward_reduce(dy, x, mean, invstd, gamma, 1e-5)
    assert sums.dtype == torch.float64 and sums.shape == (4, 10) and sums.device == x.device
    count = mask.sum() if masked else 36
    ln_weight = p["ln_weight"] if gamma else None
    dx = _ops.progressive_norm_backward_elemt(dy, x, ln_weight, p["bn_weight"], p["alpha"], mean, invstd,
                                              sums[0] / count, sums[1] / count, gamma, 1e-5, mask)
    torch.testing.assert_close(dx, want[0], rtol=1e-5, atol=1e-6)
    g = gamma
    derived = [g * sums[3], g * sums[0], (1 - g) * sums[1], (1 - g) * sums[0], (1 - g) * sums[2].sum(0, True)]
    for got, ref in zip(derived, want[1:]):
        torch.testing.assert_close(got.float(), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_sync_ops_opcheck_and_bad_inputs(device):
    skip_on_emu(device, "opcheck traces the fake kernels, not an EmuTensor")
    x = torch.randn(6, 7, 8, device=device)
    dy = torch.randn(6, 7, 8, device=device)
    mask = (torch.rand(6, 7) > 0.2).to(device)
    p = make_params(8, device)
    mean, invstd = torch.randn(8, device=device), torch.rand(8, device=device) + 0.5
    m1 = torch.randn(8, dtype=torch.float64, device=device)
    m2 = torch.randn(8, dtype=torch.float64, device=device)
    torch.library.opcheck(_ops.rep_batchnorm_stats.default, (x, mask))
    torch.library.opcheck(_ops.progressive_norm_backward_reduce.default, (dy, x, mean, invstd, 0.3, 1e-5))
    torch.library.opcheck(_ops.progressive_norm_backward_elemt.default,
                          (dy, x, p["ln_weight"], p["bn_weight"], p["alpha"], mean, invstd, m1, m2, 0.3,
                           1e-5, mask))
    with pytest.raises(RuntimeError, match="ln_weight is required when gamma != 0"):
        _ops.progressive_norm_backward_elemt(dy, x, None, p["bn_weight"], p["alpha"], mean, invstd, m1, m2,
                                             0.3, 1e-5, None)
    with pytest.raises(RuntimeError, match="mean_dy must be Double"):
        _ops.progressive_norm_backward_elemt(dy, x, None, p["bn_weight"], p["alpha"], mean, invstd, m1.float(),
                                             m2, 0.0, 1e-5, None)
    with pytest.raises(RuntimeError, match="mask must have the leading shape"):
        _ops.rep_batchnorm_stats(x, mask[:3])
