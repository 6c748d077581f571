"""Fuzz simplified_linear_attention (causal or not, with or without an initial state) and its
decode step: odd and chunk-boundary lengths, head dims from 1, every layout of q, k, v and the
state, against the fp64 references; gradients (q, k, v and the state) on a subset."""
import torch

from leanformer.ops import simplified_linear_attention, simplified_linear_attention_step
from leanformer.reference import sla_causal_quadratic_reference, sla_noncausal_reference, sla_step_reference
from tests.fuzz.fuzzing import ALL_DTYPES, double, fuzz, grads_of, leaf


def qkv(case, lead, Dk, Dv, dtype):
    """q and k shifted positive so that denominators are not eps-dominated (as the family's tests)."""
    q = case.layout("q", case.randn(*lead, Dk, shift=0.5).to(dtype))
    k = case.layout("k", case.randn(*lead, Dk, shift=0.5).to(dtype))
    v = case.layout("v", case.randn(*lead, Dv).to(dtype))
    return q, k, v


def cancelling_terms(q, k, v, o, go, causal, z0, eps=1e-6, mask=None):
    """The magnitude of the terms that cancel in dq and dk (fp64): dq_t = relu'(q_t) (go_t . S_t
    - (go_t . o_t) z_t) / den_t and dk_j = relu'(k_j) sum_t relu(q_t) (go_t . v_j - go_t . o_t) /
    den_t nearly cancel where o_t ~ S_t z_t / den_t (one positive feature, or v ~ o): their error
    from o and grad_o rounded to q's dtype is relative to these terms, not to the small result.
    q, k, v, o, go [B, T, H, D] (the step's [B, H, D] as T = 1, its z0 the state it starts from);
    mask [B, T, T] (tree_linear_attention's ancestors) instead of causal or all."""
    qf, kf = torch.relu(q), torch.relu(k)
    B, T = q.shape[:2]
    if mask is None:
        mask = torch.ones(T, T).tril() if causal else torch.ones(T, T)
    mask = mask.double().expand(B, T, T)  # [b, t, j]: t sees j
    z_t = torch.einsum("btj,bjhd->bthd", mask, kf) + (0 if z0 is None else z0[:, None])
    den = (qf * z_t).sum(-1) + eps  # [B, T, H]
    go_o = (go * o).sum(-1).abs()
    m_q = (go_o[..., None] * z_t.abs() / den[..., None]).amax() if q.numel() else 0.0
    go_v = torch.einsum("bthe,bjhe->bhtj", go, v).abs() * mask[:, None]
    m_k = (torch.einsum("bthd,bhtj->bjhd", qf / den[..., None], go_v)
           + torch.einsum("btj,bthd->bjhd", mask, qf * (go_o / den)[..., None]))
    return max(float(m_q), float(m_k.amax()) if m_k.numel() else 0.0)


def grad_scale(terms, want):
    """assert_close's scale that holds the error to the tolerance times the cancelling terms."""
    return max(1.0, terms / max(float(want.abs().amax()) if want.numel() else 0.0, 1.0))


def reference(q, k, v, causal, state):
    if causal:
        return sla_causal_quadratic_reference(q, k, v, initial_state=state)
    kf = torch.relu(k)
    return sla_noncausal_reference(q, k, v), (torch.einsum("bthd,bthe->bhde", kf, v), kf.sum(1))


@fuzz("simplified_linear_attention")
def test_simplified_linear_attention(case):
    dtype = case.pick("dtype", ALL_DTYPES)
    causal = case.coin("causal")
    B, H = case.size("B", 3), case.size("H", 3, lo=1)
    T = case.size("T", 140, special=(63, 64, 65, 128, 129))
    Dk, Dv = case.size("Dk", 70, lo=1, special=(16, 17, 64)), case.size("Dv", 70, lo=1, special=(16, 17, 64))
    q, k, v = qkv(case, (B, T, H), Dk, Dv, dtype)
    sd = torch.float64 if dtype == torch.float64 else torch.float32
    state = None
    if causal and case.coin("initial_state"):
        state = (case.layout("S0", case.rand(B, H, Dk, Dv, dtype=sd)), case.layout("z0", case.rand(B, H, Dk, dtype=sd)))

    o, (S, z) = simplified_linear_attention(q, k, v, causal=causal, initial_state=state, output_final_state=True)
    ref_state = None if state is None else tuple(double(t) for t in state)
    o_ref, (S_ref, z_ref) = reference(double(q), double(k), double(v), causal, ref_state)
    assert o.dtype == dtype and S.dtype == z.dtype == sd
    case.close(o, o_ref, dtype, "o")
    case.close(S, S_ref, sd, "S")
    case.close(z, z_ref, sd, "z")

    if case.grads():
        leaves = [leaf(t) for t in (q, k, v, *(state or (None, None)))]
        go = case.randn(B, T, H, Dv, dtype=dtype)
        gS, gz = case.randn(B, H, Dk, Dv, dtype=sd, scale=1e-2), case.randn(B, H, Dk, dtype=sd, scale=1e-2)
        st = None if state is None else (leaves[3], leaves[4])
        o, (S, z) = simplified_linear_attention(*leaves[:3], causal=causal, initial_state=st, output_final_state=True)
        got = grads_of(torch.cat([o.double().flatten(), S.double().flatten(), z.double().flatten()]), leaves,
                       torch.cat([go.double().flatten(), gS.double().flatten(), gz.double().flatten()]))
        ref_leaves = [leaf(double(t)) for t in (q, k, v, *(state or (None, None)))]
        st = None if state is None else (ref_leaves[3], ref_leaves[4])
        o_r, (S_r, z_r) = reference(*ref_leaves[:3], causal, st)
        want = grads_of(torch.cat([o_r.flatten(), S_r.flatten(), z_r.flatten()]), ref_leaves,
                        torch.cat([go.double().flatten(), gS.double().flatten(), gz.double().flatten()]))
        # every gradient goes through o and grad_o in q's dtype: its tolerance, the state's included
        terms = cancelling_terms(double(q), double(k), double(v), o_r.detach(), go.double(), causal,
                                 None if state is None else double(state[1]))
        for name, g, w in zip(("dq", "dk", "dv", "dS0", "dz0"), got, want):
            if w is not None:
                case.close(g, w, dtype, name, scale=grad_scale(terms, w) if name in ("dq", "dk") else 1.0)


@fuzz("simplified_linear_attention_step")
def test_simplified_linear_attention_step(case):
    dtype = case.pick("dtype", ALL_DTYPES)
    B, H = case.size("B", 4), case.size("H", 4, lo=1)
    Dk, Dv = case.size("Dk", 70, lo=1, special=(16, 17)), case.size("Dv", 70, lo=1, special=(16, 17))
    q, k, v = qkv(case, (B, H), Dk, Dv, dtype)
    sd = torch.float64 if dtype == torch.float64 else torch.float32
    S = case.layout("S", case.rand(B, H, Dk, Dv, dtype=sd))
    z = case.layout("z", case.rand(B, H, Dk, dtype=sd))
    S_before, z_before = S.clone(), z.clone()

    o, (S1, z1) = simplified_linear_attention_step(q, k, v, (S, z))
    o_ref, (S_ref, z_ref) = sla_step_reference(double(q), double(k), double(v), (double(S), double(z)))
    assert o.dtype == dtype
    case.close(o, o_ref, dtype, "o")
    case.close(S1, S_ref, sd, "S")
    case.close(z1, z_ref, sd, "z")
    assert torch.equal(S, S_before) and torch.equal(z, z_before), "the input state must not change"

    if case.grads():
        leaves = [leaf(t) for t in (q, k, v, S, z)]
        go = case.randn(B, H, Dv, dtype=dtype)
        o, (S1, z1) = simplified_linear_attention_step(*leaves[:3], (leaves[3], leaves[4]))
        gS, gz = case.randn(B, H, Dk, Dv, dtype=sd, scale=1e-2), case.randn(B, H, Dk, dtype=sd, scale=1e-2)
        flat = lambda *ts: torch.cat([t.double().flatten() for t in ts])
        got = grads_of(flat(o, S1, z1), leaves, flat(go, gS, gz))
        ref_leaves = [leaf(double(t)) for t in (q, k, v, S, z)]
        o_r, (S_r, z_r) = sla_step_reference(*ref_leaves[:3], (ref_leaves[3], ref_leaves[4]))
        want = grads_of(flat(o_r, S_r, z_r), ref_leaves, flat(go, gS, gz))
        terms = cancelling_terms(*(double(t)[:, None] for t in (q, k, v)), o_r.detach()[:, None],
                                 go.double()[:, None], True, double(z))
        for name, g, w in zip(("dq", "dk", "dv", "dS", "dz"), got, want):  # through o and grad_o in q's dtype
            case.close(g, w, dtype, name, scale=grad_scale(terms, w) if name in ("dq", "dk") else 1.0)
