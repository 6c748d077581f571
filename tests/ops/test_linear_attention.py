"""simplified_linear_attention and its decode step against the plain-PyTorch references."""
import itertools

import pytest
import torch

from leanformer.ops import simplified_linear_attention, simplified_linear_attention_step
from leanformer.reference import (
    sla_causal_chunked_reference,
    sla_causal_quadratic_reference,
    sla_noncausal_reference,
    sla_step_reference,
)
from tests.helpers import DEVICES, assert_close, device_dtypes, opcheck_each, skip_on_emu

CASES = device_dtypes()


def make_qkv(B, T, H, Dk, Dv, dtype, device, *, scale=1.0, noncontiguous=False):
    """q and k get a positive shift so denominators are not dominated by eps (that regime is
    ill-conditioned in any implementation); roughly a third of the features are still zero."""
    shape_k, shape_v = (B, T, H, Dk), (B, T, H, Dv)
    if noncontiguous:  # [B, H, T, D] storage seen as [B, T, H, D], plus a strided last dim
        mk = lambda D: torch.randn(B, H, T, 2 * D, device=device).transpose(1, 2)[..., ::2]
        q, k, v = mk(Dk), mk(Dk), mk(Dv)
    else:
        q, k, v = torch.randn(shape_k, device=device), torch.randn(shape_k, device=device), torch.randn(shape_v, device=device)
    q, k, v = (q + 0.5) * scale, (k + 0.5) * scale, v * scale
    return [x.to(dtype) for x in (q, k, v)]


def reference(q, k, v, causal, initial_state=None):
    """fp64 reference output and final state of the same (already rounded) inputs."""
    q, k, v = (x.double() for x in (q, k, v))
    if causal:
        return sla_causal_quadratic_reference(q, k, v, initial_state=initial_state)
    o = sla_noncausal_reference(q, k, v)
    kf = torch.relu(k)
    return o, (torch.einsum("bthd,bthe->bhde", kf, v), kf.sum(1))


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("T", [1, 63, 64, 65, 1000])
@pytest.mark.parametrize("Dk,Dv", [(16, 60), (60, 16), (64, 64), (128, 60), (200, 40)])
def test_forward_backward_matches_reference(device, dtype, causal, T, Dk, Dv):
    B, H = 2, 3
    q, k, v = make_qkv(B, T, H, Dk, Dv, dtype, device, noncontiguous=(T == 65))
    for x in (q, k, v):
        x.requires_grad_(True)
    o, (S, z) = simplified_linear_attention(q, k, v, causal=causal, output_final_state=True)
    assert o.dtype == dtype and o.shape == (B, T, H, Dv)
    assert S.dtype == torch.float32 and S.shape == (B, H, Dk, Dv) and z.shape == (B, H, Dk)

    qd, kd, vd = (x.detach().double().requires_grad_(True) for x in (q, k, v))
    o_ref, (S_ref, z_ref) = reference(qd, kd, vd, causal)
    assert_close(o, o_ref, dtype, "o")
    assert_close(S, S_ref, torch.float32, "S")
    assert_close(z, z_ref, torch.float32, "z")

    go = torch.randn_like(o)
    gS, gz = torch.randn_like(S) * 1e-2, torch.randn_like(z) * 1e-2
    torch.autograd.backward([o, S, z], [go, gS, gz])
    torch.autograd.backward([o_ref, S_ref, z_ref], [go.double(), gS.double(), gz.double()])
    for name, x, xr in (("dq", q, qd), ("dk", k, kd), ("dv", v, vd)):
        assert x.grad.dtype == dtype
        assert_close(x.grad, xr.grad, dtype, name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [False, True])
def test_empty_batch_and_sequence(device, causal):
    for B, T in ((0, 17), (2, 0)):
        q, k, v = make_qkv(B, T, 2, 8, 12, torch.float32, device)
        q.requires_grad_(True)
        o, (S, z) = simplified_linear_attention(q, k, v, causal=causal, output_final_state=True)
        assert o.shape == (B, T, 2, 12) and S.shape == (B, 2, 8, 12)
        assert torch.all(S == 0) and torch.all(z == 0)
        o.sum().backward()
        assert q.grad.shape == q.shape


@pytest.mark.parametrize("device,dtype", CASES)
def test_chunked_prefill_then_steps_equals_full_causal(device, dtype):
    B, T, H, Dk, Dv = 2, 150, 2, 32, 24
    q, k, v = make_qkv(B, T, H, Dk, Dv, dtype, device)
    full = simplified_linear_attention(q, k, v, causal=True)
    outs, state = [], None
    for t0, t1 in ((0, 70), (70, 130)):
        o, state = simplified_linear_attention(q[:, t0:t1], k[:, t0:t1], v[:, t0:t1], causal=True,
                                               initial_state=state, output_final_state=True)
        outs.append(o)
    for t in range(130, T):
        o, state = simplified_linear_attention_step(q[:, t], k[:, t], v[:, t], state)
        outs.append(o.unsqueeze(1))
    assert_close(torch.cat(outs, 1), full.double(), dtype, "prefill + steps")


@pytest.mark.parametrize("device,dtype", CASES)
def test_step_matches_reference_and_keeps_input_state(device, dtype):
    B, H, Dk, Dv = 3, 4, 20, 36
    q, k, v = (x[:, 0] for x in make_qkv(B, 1, H, Dk, Dv, dtype, device))
    S = torch.rand(B, H, Dk, Dv, device=device)
    z = torch.rand(B, H, Dk, device=device)
    S_before = S.clone()
    o, (S1, z1) = simplified_linear_attention_step(q, k, v, (S, z))
    o_ref, (S_ref, z_ref) = sla_step_reference(q.double(), k.double(), v.double(), (S.double(), z.double()))
    assert_close(o, o_ref, dtype, "o")
    assert_close(S1, S_ref, torch.float32, "S")
    assert_close(z1, z_ref, torch.float32, "z")
    assert torch.equal(S, S_before)
    o0, _ = simplified_linear_attention_step(q, k, v, None)
    o0_ref = simplified_linear_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), causal=True)
    assert_close(o0, o0_ref[:, 0].double(), dtype, "step from empty state")


@pytest.mark.parametrize("device,dtype", CASES)
def test_long_sequence_large_activations_stay_finite(device, dtype):
    # T = 16384 with activations ~1e3: S and z reach ~1e10, beyond fp16 and bf16 precision.
    q, k, v = make_qkv(1, 16384, 2, 32, 32, dtype, device, scale=1e3)
    o, (S, z) = simplified_linear_attention(q, k, v, causal=True, output_final_state=True)
    assert torch.isfinite(o).all() and torch.isfinite(S).all()
    o_ref, (S_ref, _) = sla_causal_chunked_reference(q.double(), k.double(), v.double())
    assert_close(o, o_ref, dtype, "o")
    assert_close(S, S_ref, torch.float32, "S")
    o_nc = simplified_linear_attention(q, k, v, causal=False)
    assert torch.isfinite(o_nc).all()
    assert_close(o_nc, sla_noncausal_reference(q.double(), k.double(), v.double()), dtype, "o non-causal")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [False, True])
def test_nan_propagates_like_the_reference(device, causal):
    q, k, v = make_qkv(1, 70, 2, 8, 8, torch.float32, device)
    q[0, 3, 1, 0] = float("nan")
    o = simplified_linear_attention(q, k, v, causal=causal)
    o_ref = reference(q, k, v, causal)[0]
    assert torch.equal(torch.isnan(o), torch.isnan(o_ref)) and torch.isnan(o).any()


def test_references_agree():
    q, k, v = make_qkv(2, 130, 3, 16, 24, torch.float64, "cpu")
    S0, z0 = torch.rand(2, 3, 16, 24, dtype=torch.float64), torch.rand(2, 3, 16, dtype=torch.float64)
    a, (Sa, za) = sla_causal_quadratic_reference(q, k, v, initial_state=(S0, z0))
    b, (Sb, zb) = sla_causal_chunked_reference(q, k, v, initial_state=(S0, z0))
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(Sa, Sb)
    torch.testing.assert_close(za, zb)


# ---- gradcheck, opcheck, compile ----

def _double_inputs(B, T, H, Dk, Dv, device):
    return [x.requires_grad_(True) for x in make_qkv(B, T, H, Dk, Dv, torch.float64, device)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck(device, causal):
    q, k, v = _double_inputs(2, 70, 2, 5, 3, device)
    fn = lambda q, k, v: simplified_linear_attention(q, k, v, causal=causal, output_final_state=True)
    torch.autograd.gradcheck(lambda q, k, v: (fn(q, k, v)[0], *fn(q, k, v)[1]), (q, k, v))


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_initial_state_and_step(device):
    q, k, v = _double_inputs(1, 67, 2, 4, 3, device)
    S0 = torch.rand(1, 2, 4, 3, dtype=torch.float64, device=device, requires_grad=True)
    z0 = torch.rand(1, 2, 4, dtype=torch.float64, device=device, requires_grad=True)

    def chunk(q, k, v, S0, z0):
        o, (S, z) = simplified_linear_attention(q, k, v, causal=True, initial_state=(S0, z0),
                                                output_final_state=True)
        return o, S, z

    torch.autograd.gradcheck(chunk, (q, k, v, S0, z0))

    def step(q, k, v, S0, z0):
        o, (S, z) = simplified_linear_attention_step(q, k, v, (S0, z0))
        return o, S, z

    torch.autograd.gradcheck(step, (q[:, 0], k[:, 0], v[:, 0], S0, z0))


def _opcheck_samples(device):
    for dtype, causal in itertools.product([torch.float32, torch.float64], [False, True]):
        q, k, v = (x.requires_grad_(True) for x in make_qkv(2, 65, 2, 8, 12, dtype, device))
        yield "sla_forward", (q, k, v, None, None, causal, 1e-6)
        if causal:
            sd = torch.float64 if dtype == torch.float64 else torch.float32
            S0 = torch.rand(2, 2, 8, 12, dtype=sd, device=device, requires_grad=True)
            z0 = torch.rand(2, 2, 8, dtype=sd, device=device, requires_grad=True)
            yield "sla_forward", (q, k, v, S0, z0, True, 1e-6)
            yield "sla_step", (q[:, 0], k[:, 0], v[:, 0], S0, z0, 1e-6)
        o = torch.ops.leanformer.sla_forward(q, k, v, None, None, causal, 1e-6)[0].detach()
        yield "sla_backward", (torch.randn_like(o), None, None, *(x.detach() for x in (q, k, v)), o,
                               None, None, causal, 1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    skip_on_emu(device, "opcheck traces the fake kernels, not an EmuTensor")
    opcheck_each(_opcheck_samples(device))


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_ops(device):
    skip_on_emu(device, "opcheck and torch.compile trace the fake kernels, not an EmuTensor")
    q, k, v = make_qkv(2, 40, 2, 8, 8, torch.float32, device)

    def f(q, k, v):
        o, state = simplified_linear_attention(q, k, v, causal=True, output_final_state=True)
        o2, _ = simplified_linear_attention_step(q[:, -1], k[:, -1], v[:, -1], state)
        return o, o2

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for a, b in zip(compiled(q, k, v), f(q, k, v)):
        torch.testing.assert_close(a, b)


# ---- bad input: every error names the argument ----

@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs_raise_clear_errors(device):
    q, k, v = make_qkv(2, 10, 3, 8, 6, torch.float32, device)
    sla = simplified_linear_attention
    cases = [
        (lambda: sla(q[0], k, v), "q must be \\[B, T, H, Dk\\]"),
        (lambda: sla(q, k[0], v), "k must be \\[B, T, H, Dk\\]"),
        (lambda: sla(q, k, v[..., 0]), "v must be \\[B, T, H, Dv\\]"),
        (lambda: sla(q, k[:1], v), "k must match q in \\[B, T, H\\]"),
        (lambda: sla(q, k[:, :5], v), "k must match q in \\[B, T, H\\]"),
        (lambda: sla(q, k, v[:, :, :2]), "v must match q in \\[B, T, H\\]"),
        (lambda: sla(q, k[..., :4], v), "k must have the same head dim Dk"),
        (lambda: sla(q, k.double(), v), "k must have the dtype of q"),
        (lambda: sla(q, k, v.half()), "v must have the dtype of q"),
        (lambda: sla(q.int(), k.int(), v.int()), "q must be float32, float16, bfloat16 or float64"),
        (lambda: sla(q, k, v, initial_state=(torch.zeros(2, 3, 8, 6), torch.zeros(2, 3, 8))),
         "initial_state is only supported with causal=True"),
        (lambda: sla(q, k, v, causal=True, initial_state=(torch.zeros(2, 3, 6, 8, device=device),
                                                          torch.zeros(2, 3, 8, device=device))),
         "initial_state S must have shape \\[B, H, Dk, Dv\\] = \\[2, 3, 8, 6\\]"),
        (lambda: sla(q, k, v, causal=True, initial_state=(torch.zeros(2, 3, 8, 6, device=device),
                                                          torch.zeros(2, 3, 7, device=device))),
         "initial_state z must have shape \\[B, H, Dk\\]"),
        (lambda: sla(q, k, v, causal=True, initial_state=(torch.zeros(2, 3, 8, 6, device=device, dtype=torch.bfloat16),
                                                          torch.zeros(2, 3, 8, device=device))),
         "initial_state S must be Float"),
        (lambda: sla(q, k, v, causal=True, initial_state=torch.zeros(2)), "initial_state must be a pair"),
        (lambda: simplified_linear_attention_step(q[:, 0], k[:, 0], v[:, 0],
                                                  (torch.zeros(2, 3, 8, 5, device=device), torch.zeros(2, 3, 8, device=device))),
         "state S must have shape \\[B, H, Dk, Dv\\]"),
        (lambda: simplified_linear_attention_step(q, k[:, 0], v[:, 0], None), "q and v must be \\[B, H, D\\]"),
        (lambda: simplified_linear_attention_step(q[:, 0], k[:, 0, :2], v[:, 0], (torch.zeros(2, 3, 8, 6, device=device), torch.zeros(2, 3, 8, device=device))),
         "k must have the shape of q"),
    ]
    if device == "cuda":
        cases.append((lambda: sla(q, k.cpu(), v), "k is on cpu but q is on cuda"))
    for fn, message in cases:
        with pytest.raises((RuntimeError, ValueError), match=message):
            fn()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU for a second device type")
def test_mixed_devices_raise():
    q, k, v = make_qkv(1, 4, 1, 4, 4, torch.float32, "cuda")
    with pytest.raises(RuntimeError, match="v is on cpu but q is on cuda"):
        simplified_linear_attention(q, k, v.cpu())
