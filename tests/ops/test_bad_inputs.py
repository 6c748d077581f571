"""Bad inputs, every op: one rule for the real and the fake kernels.

Each op's C++ Meta kernel (csrc/<family>_meta.cpp) runs the same argument checks as its CPU and
CUDA kernels, so a bad input raises the same error, naming the argument, from a CPU call, from
the same call on meta tensors (the fake path) and under FakeTensorMode (what torch.compile and
torch.export trace with). Per op, from one good sample:

- each tensor argument alone on meta, the others on the CPU: refused, the odd one named (before
  Meta kernels, the Python fakes returned uninitialized CPU memory there);
- each tensor argument in a wrong dtype (int32 and bool for floats, int32 for int64 indices and
  for bool masks, ...), and with a wrong rank;
- mismatched sizes and out-of-range scalar arguments (k > d_ff, out_features beyond the panels,
  ...), listed per op.

Value checks, which need the data (parents forming a tree, token ids in the vocabulary, ...),
stay in the real kernels: eager refuses them, meta tensors pass, a compiled graph refuses them
when its kernel runs (test_value_checks_run_in_the_real_kernels).
"""
import re

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._pytree import tree_map

from leanformer.ops import pack_linear_weight, pack_swiglu_weight
from leanformer.reference import ancestor_mask
from leanformer.sparse import NMSparseMatrix

ops = torch.ops.leanformer


class Sample:
    """A good call of op: args (list, in schema order; lists of tensors allowed) and kwargs.
    names: the name a message gives an argument when it is not the schema's; dtypes: the
    bad dtypes to try per argument (default by its dtype); flexible: the [..., X] arguments,
    whose rank is free (a scalar is the bad rank there); free_rank: arguments of any rank."""

    def __init__(self, op, args, kwargs=None, *, names=None, dtypes=None, flexible=(), free_rank=()):
        self.op, self.args, self.kwargs = op, list(args), dict(kwargs or {})
        schema = getattr(ops, op).default._schema
        self.arg_names = [a.name for a in schema.arguments if not a.kwarg_only]
        self.names = {**dict(zip(self.arg_names, self.arg_names)), **(names or {})}
        self.dtypes, self.flexible, self.free_rank = dtypes or {}, set(flexible), set(free_rank)

    def call(self, args=None, kwargs=None):
        return getattr(ops, self.op)(*(self.args if args is None else args),
                                     **(self.kwargs if kwargs is None else kwargs))

    def leaves(self):
        """(arg index, list index or None, message name, tensor) of every tensor argument."""
        for i, (name, a) in enumerate(zip(self.arg_names, self.args)):
            if isinstance(a, torch.Tensor):
                yield i, None, self.names[name], a
            elif isinstance(a, (list, tuple)):
                for j, t in enumerate(a):
                    if isinstance(t, torch.Tensor):
                        yield i, j, f"{self.names[name]}[{j}]", t

    def replaced(self, i, j, t):
        args = list(self.args)
        if j is None:
            args[i] = t
        else:
            args[i] = [t if jj == j else x for jj, x in enumerate(args[i])]
        return args

    def bad_dtypes(self, name, t):
        if name in self.dtypes:
            return self.dtypes[name]
        if t.is_floating_point():
            return [torch.int32, torch.bool]
        return {torch.int64: [torch.int32], torch.bool: [torch.int32], torch.int32: [torch.int64]}[t.dtype]


def to_meta(x):
    return x.to("meta") if isinstance(x, torch.Tensor) else x


def names_arg(name):
    """The message starts with the argument's name (after an "op: " prefix)."""
    return rf"^(\w+: )?{re.escape(name)}(?![\w\[])"


def assert_refused(sample, args, kwargs, match, *, fake=True):
    """The CPU call raises match; so do the same call on meta tensors and under FakeTensorMode."""
    with pytest.raises(RuntimeError, match=match):
        sample.call(args, kwargs)
    meta_args, meta_kwargs = tree_map(to_meta, (args, kwargs))
    with pytest.raises(RuntimeError, match=match):
        sample.call(meta_args, meta_kwargs)
    if fake:
        mode = FakeTensorMode()
        fake_args, fake_kwargs = tree_map(lambda x: mode.from_tensor(x) if isinstance(x, torch.Tensor) else x,
                                          (args, kwargs))
        with mode, pytest.raises(RuntimeError, match=match):
            sample.call(fake_args, fake_kwargs)


# ---- one good sample per op ----

def rand(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


def sla_samples():
    B, T, H, Dk, Dv = 2, 5, 3, 4, 6
    q, k, v = rand(B, T, H, Dk), rand(B, T, H, Dk), rand(B, T, H, Dv)
    S, z = rand(B, H, Dk, Dv).abs(), rand(B, H, Dk).abs()
    o = rand(B, T, H, Dv)
    yield Sample("sla_forward", [q, k, v, S, z, True, 1e-6],
                 names={"initial_S": "initial_state S", "initial_z": "initial_state z"})
    yield Sample("sla_backward", [rand(B, T, H, Dv), rand(B, H, Dk, Dv), rand(B, H, Dk), q, k, v, o, S, z, True, 1e-6],
                 names={"initial_S": "initial_state S", "initial_z": "initial_state z"})
    yield Sample("sla_step", [q[:, 0], k[:, 0], v[:, 0], S, z, 1e-6], names={"S": "state S", "z": "state z"})


def norm_samples():
    x, C = rand(2, 5, 8), 8
    w, b, rm, rv = rand(C), rand(C), rand(C), rand(C).abs() + 1
    alpha, mask = rand(1), torch.rand(2, 5) > 0.3
    mean, invstd = rand(C), rand(C).abs() + 1
    common = dict(flexible={"x"}, free_rank={"alpha"})
    yield Sample("rep_batchnorm", [x, w, b, alpha, rm, rv, True, 1e-5, mask], **common)
    yield Sample("rep_batchnorm_backward", [rand(2, 5, 8), x, w, alpha, mean, invstd, True, mask], **common)
    yield Sample("progressive_norm", [x, rand(C), rand(C), w, b, alpha, rm, rv, 0.5, True, 1e-5, 1e-5, mask], **common)
    yield Sample("progressive_norm_backward",
                 [rand(2, 5, 8), x, rand(C), w, alpha, mean, invstd, 0.5, True, 1e-5, mask], **common)
    yield Sample("rep_batchnorm_stats", [x, mask], **common)
    yield Sample("progressive_norm_backward_reduce", [rand(2, 5, 8), x, mean, invstd, 0.5, 1e-5], **common)
    yield Sample("progressive_norm_backward_elemt",
                 [rand(2, 5, 8), x, rand(C), w, alpha, mean, invstd, rand(C).double(), rand(C).double(), 0.5, 1e-5,
                  mask], **common)


def topk_samples():
    N, d_model, d_ff, k = 3, 8, 16, 4
    x, h = rand(N, d_model), rand(N, d_ff)
    w_up, b_up, w_down_t, b_down = rand(d_ff, d_model), rand(d_ff), rand(d_ff, d_model), rand(d_model)
    indices = torch.stack([torch.randperm(d_ff)[:k].sort().values for _ in range(N)])
    yield Sample("topk_activation", [h, k, "relu"], flexible={"h"})
    yield Sample("topk_activation_backward", [rand(N, k), h, indices, "relu"], flexible={"h"})
    yield Sample("sparse_down_projection", [rand(N, k), indices, w_down_t, b_down], flexible={"values"})
    yield Sample("sparse_down_projection_backward", [rand(N, d_model), rand(N, k), indices, w_down_t,
                                                     [True, True, True]], flexible={"values"})
    yield Sample("topk_mlp", [x, w_up, b_up, w_down_t, b_down, k, "relu"], flexible={"x"})
    yield Sample("topk_mlp_backward", [rand(N, d_model), x, w_up, w_down_t, rand(N, k), indices, "relu",
                                       [True] * 5], flexible={"x"})
    yield Sample("predicted_sparse_mlp", [x, w_up, b_up, w_down_t, b_down, indices, "relu"], flexible={"x"})


def nm_samples():
    s = NMSparseMatrix.prune(torch.randn(5, 16), 2, 4)
    x = rand(3, 16)
    yield Sample("nm_sparse_linear", [x, s.values, s.meta, rand(5)], dict(n=2, m=4), flexible={"x"})
    yield Sample("nm_sparse_linear_backward", [rand(3, 5), x, s.values, s.meta],
                 dict(n=2, m=4, output_mask=[True, True]), flexible={"x"})


def packed_samples():
    x = rand(3, 16)
    yield Sample("packed_linear", [x, pack_linear_weight(rand(40, 16)), rand(40), 40],
                 names={"bias": "packed_linear: bias"}, flexible={"x"})
    yield Sample("packed_swiglu", [x, pack_swiglu_weight(rand(40, 16), rand(40, 16)), 40], flexible={"x"})


def quantized_samples():
    from leanformer.quant import BlockQuantizedMatrix
    q = BlockQuantizedMatrix.from_dense(rand(40, 64), bits=4)
    yield Sample("quantized_linear", [rand(3, 64), q.qweight, q.scales, q.mins, rand(40), 4, 40],
                 names={n: f"quantized_linear: {n}" for n in ("qweight", "bias")},
                 dtypes={"qweight": [torch.int8, torch.int32], "scales": [torch.float32, torch.int32],
                         "mins": [torch.bfloat16, torch.int32]}, flexible={"x"})


def rms_norm_samples():
    yield Sample("rms_norm", [rand(3, 64), rand(64), 1e-6], flexible={"x"})


def tree_attention_samples():
    B, T, Hq, Hkv, D, Dv, L = 2, 3, 4, 2, 8, 6, 10
    mask = ancestor_mask(torch.tensor([-1, 0, 0]))
    yield Sample("tree_attention", [rand(B, T, Hq, D), rand(B, L, Hkv, D), rand(B, L, Hkv, Dv), torch.tensor([4, 7]),
                                    rand(B, T, Hkv, D), rand(B, T, Hkv, Dv), mask, None])
    yield Sample("tree_linear_attention", [rand(B, T, Hq, D), rand(B, T, Hq, D), rand(B, T, Hq, Dv),
                                           rand(B, Hq, D, Dv).abs(), rand(B, Hq, D).abs(), mask, 1e-6])


def tree_verify_samples():
    B, T, V = 2, 4, 10
    tokens, parents = torch.tensor([[1, 2, 3, 4], [5, 6, -1, 7]]), torch.tensor([-1, 0, 0, 1])
    yield Sample("verify_tree_greedy", [rand(B, T, V), tokens, parents])
    yield Sample("verify_tree_sampling", [torch.rand(B, T, V).softmax(-1), tokens, parents, torch.rand(B, T)],
                 dtypes={"uniforms": [torch.int32, torch.float64]})
    kc, vc = rand(B, 12, 2, 8), rand(B, 12, 2, 6)
    yield Sample("compact_kv_cache", [kc, vc, torch.tensor([3, 5]), torch.tensor([[0, 1, -1, -1], [0, 2, 3, -1]]),
                                      torch.tensor([2, 3])],
                 dtypes={"k_cache": [], "v_cache": []})  # any dtype: the op moves elements


def tree_state_samples():
    B, T, H, Dk, Dv, W, L = 2, 4, 3, 4, 6, 2, 2
    yield Sample("sla_tree_commit",
                 [[rand(B, H, Dk, Dv) for _ in range(L)], [rand(B, H, Dk) for _ in range(L)],
                  [rand(B * H, Dv, W) for _ in range(L)], [rand(B, T, H, Dk) for _ in range(L)],
                  [rand(B, T, H, Dv) for _ in range(L)], torch.tensor([[0, 1, 3], [0, 2, -1]]), torch.tensor([3, 2])],
                 names={n: f"sla_tree_commit: {n}" for n in ("S", "z", "conv_tail", "k", "v", "path", "num_accepted")})
    yield Sample("tree_dwconv", [rand(B, T, H, Dv), rand(B * H, Dv, W), torch.tensor([-1, 0, 0, 1]), rand(Dv, W + 1),
                                 rand(Dv)],
                 names={n: f"tree_dwconv: {n}" for n in ("v", "conv_tail", "parents", "weight", "bias")})


def decode_attention_samples():
    B, H, Hkv, D, L, P = 2, 4, 2, 8, 10, 12
    yield Sample("decode_attention", [rand(B, (H + 2 * Hkv) * D), rand(B, L, Hkv, D), rand(B, L, Hkv, D),
                                      torch.tensor([3, 9]), rand(P, D), rand(P, D), H])
    yield Sample("decode_attention_tree", [rand(B, 3, (H + 2 * Hkv) * D), rand(B, L, Hkv, D), rand(B, L, Hkv, D),
                                           torch.tensor([3, 7]), rand(P, D), rand(P, D), H, torch.tensor([-1, 0, 0])],
                 free_rank={"parents"})


SAMPLES = [*sla_samples(), *norm_samples(), *topk_samples(), *nm_samples(), *packed_samples(), *quantized_samples(),
           *rms_norm_samples(),
           *tree_attention_samples(), *tree_verify_samples(), *tree_state_samples(), *decode_attention_samples()]
BY_OP = {s.op: s for s in SAMPLES}
IN_PLACE = {"compact_kv_cache", "sla_tree_commit"}


def test_every_op_has_a_sample_and_a_meta_kernel():
    schemas = {s.name.split("::")[1] for s in torch._C._jit_get_all_schemas() if s.name.startswith("leanformer::")}
    assert schemas == set(BY_OP), schemas ^ set(BY_OP)
    for name in schemas:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"leanformer::{name}", "Meta"), name


@pytest.mark.parametrize("op", BY_OP)
def test_good_sample_runs_on_cpu_and_meta(op):
    """The samples are good: the real kernel runs, and the Meta kernel gives outputs of the same
    shapes, dtypes and strides, on meta."""
    s = BY_OP[op]
    out = s.call(tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, s.args))
    meta_out = s.call(*tree_map(to_meta, (s.args, s.kwargs)))
    if out is None:  # in place: compact_kv_cache, sla_tree_commit
        assert meta_out is None
        return
    for a, b in zip(*(o if isinstance(o, tuple) else (o,) for o in (out, meta_out))):
        assert b.device.type == "meta"
        assert (a.shape, a.dtype, a.stride()) == (b.shape, b.dtype, b.stride()), op


@pytest.mark.parametrize("op", BY_OP)
def test_each_tensor_alone_on_meta_is_named(op):
    s = BY_OP[op]
    if len(list(s.leaves())) == 1:
        pytest.skip("one tensor argument: on meta, it is a meta call")
    for i, j, name, t in s.leaves():
        args = s.replaced(i, j, t.to("meta"))
        # "<name> is on meta but ..." or "... is on cpu but <name> is on meta" (name the reference)
        match = rf"{names_arg(name)} is on meta|but {re.escape(name.split(': ')[-1])} is on meta"
        with pytest.raises(RuntimeError, match=match):
            s.call(args)
        # Under FakeTensorMode every fake tensor is a meta tensor inside the Meta kernel, so torch
        # itself refuses fakes of two devices, when it gives the outputs their device: the in-place
        # ops, with no output, are checked by their real kernels only.
        if s.op in IN_PLACE:
            continue
        mode = FakeTensorMode()
        fake_args = tree_map(lambda x: mode.from_tensor(x) if isinstance(x, torch.Tensor) else x, args)
        with mode, pytest.raises(RuntimeError, match="device"):
            s.call(fake_args)


@pytest.mark.parametrize("op", BY_OP)
def test_wrong_dtype_is_named(op):
    s = BY_OP[op]
    for i, j, name, t in s.leaves():
        for dtype in s.bad_dtypes(s.arg_names[i], t):
            assert_refused(s, s.replaced(i, j, t.to(dtype)), s.kwargs, names_arg(name))


@pytest.mark.parametrize("op", BY_OP)
def test_wrong_rank_is_named(op):
    s = BY_OP[op]
    for i, j, name, t in s.leaves():
        arg = s.arg_names[i]
        if arg in s.free_rank:
            continue
        bad = t.reshape(-1)[0] if arg in s.flexible else t.unsqueeze(0)
        assert_refused(s, s.replaced(i, j, bad), s.kwargs, names_arg(name))


# ---- mismatched sizes and out-of-range scalar arguments, per op: (op, change, message) ----

def with_args(**changes):
    """A change of the sample: arguments by name; a callable gets the sample's value."""
    def change(s):
        args = list(s.args)
        for name, value in changes.items():
            i = s.arg_names.index(name)
            args[i] = value(args[i]) if callable(value) else value
        return args
    return change


def first(f):
    return lambda ts: [f(ts[0]), *ts[1:]]


def second(f):
    return lambda ts: [ts[0], f(ts[1]), *ts[2:]]


SIZE_CASES = [
    ("sla_forward", with_args(k=lambda t: t[:, :4]), r"^k must match q in \[B, T, H\] = \[2, 5, 3\]"),
    ("sla_forward", with_args(v=lambda t: t[:, :, :2]), r"^v must match q in \[B, T, H\]"),
    ("sla_forward", with_args(k=lambda t: t[..., :3]), r"^k must have the same head dim Dk as q \(4\)"),
    ("sla_forward", with_args(initial_S=lambda t: t[..., :5]),
     r"^initial_state S must have shape \[B, H, Dk, Dv\] = \[2, 3, 4, 6\]"),
    ("sla_forward", with_args(initial_z=None), "^initial_state S and initial_state z must be given together"),
    ("sla_forward", with_args(causal=False), "^initial_state is only supported with causal=True"),
    ("sla_backward", with_args(o=lambda t: t[..., :5]), r"^o must be \[B, T, H, Dv\] = \[2, 5, 3, 6\]"),
    ("sla_backward", with_args(grad_o=lambda t: t[:, :4]), "^grad_o must have the shape of o"),
    ("sla_backward", with_args(grad_z=None), "^grad_S and grad_z must be given together"),
    ("sla_backward", with_args(grad_S=lambda t: t[:1]), r"^grad_S must have shape \[B, H, Dk, Dv\]"),
    ("sla_step", with_args(k=lambda t: t[:1]), "^k must have the shape of q"),
    ("sla_step", with_args(v=lambda t: t[:, :2]), r"^v must match q in \[B, H\] = \[2, 3\]"),
    ("sla_step", with_args(z=lambda t: t[..., :3]), r"^state z must have shape \[B, H, Dk\] = \[2, 3, 4\]"),
    ("rep_batchnorm", with_args(weight=lambda t: t[:7]), r"^weight must have shape \[C\] = \[8\]"),
    ("rep_batchnorm", with_args(running_var=lambda t: t[:7]), r"^running_var must have shape \[C\] = \[8\]"),
    ("rep_batchnorm", with_args(alpha=torch.ones(2)), "^alpha must hold one value"),
    ("rep_batchnorm", with_args(mask=lambda t: t[:, :4]), "^mask must have the leading shape of x"),
    ("rep_batchnorm", with_args(x=torch.randn(1, 8), mask=None), "more than one token per channel"),
    ("progressive_norm", with_args(gamma=1.5), r"^gamma must be in \[0, 1\]"),
    ("progressive_norm", with_args(ln_bias=lambda t: t[:7]), r"^ln_bias must have shape \[C\] = \[8\]"),
    ("progressive_norm", with_args(bn_bias=lambda t: t[:7]), r"^bn_bias must have shape \[C\] = \[8\]"),
    ("progressive_norm_backward", with_args(ln_weight=lambda t: t[:7]), r"^ln_weight must have shape \[C\]"),
    ("progressive_norm_backward", with_args(bn_invstd=lambda t: t[:7]), r"^bn_invstd must have shape \[C\]"),
    ("rep_batchnorm_backward", with_args(grad_y=lambda t: t[:1]), "^grad_y must have the shape of x"),
    ("rep_batchnorm_stats", with_args(mask=lambda t: t[:1]), "^mask must have the leading shape of x"),
    ("progressive_norm_backward_reduce", with_args(gamma=-1.0), r"^gamma must be in \[0, 1\]"),
    ("progressive_norm_backward_reduce", with_args(bn_mean=lambda t: t[:7]), r"^bn_mean must have shape \[C\]"),
    ("progressive_norm_backward_elemt", with_args(ln_weight=None), "^ln_weight is required when gamma != 0"),
    ("progressive_norm_backward_elemt", with_args(mean_dy=lambda t: t[:7]), r"^mean_dy must have shape \[C\]"),
    ("topk_activation", with_args(k=17), r"^k must be in \[0, d_ff\] = \[0, 16\], got 17"),
    ("topk_activation", with_args(k=-1), r"^k must be in \[0, d_ff\] = \[0, 16\], got -1"),
    ("topk_activation", with_args(activation="tanh"), '^activation must be "relu" or "gelu"'),
    ("topk_activation_backward", with_args(indices=lambda t: t[:2]), r"^indices must be \[..., k\] with the leading"),
    ("topk_activation_backward", with_args(grad_values=lambda t: t[:, :3]), "^grad_values must have shape"),
    ("topk_activation_backward", with_args(activation="tanh"), '^activation must be "relu" or "gelu"'),
    ("sparse_down_projection", with_args(w_down_t=lambda t: t[:3]), "^values must have at most d_ff = 3"),
    ("sparse_down_projection", with_args(indices=lambda t: t[:, :3]), "^indices must have the shape of values"),
    ("sparse_down_projection", with_args(bias=lambda t: t[:7]), r"^bias must have shape \[d_model\] = \[8\]"),
    ("sparse_down_projection_backward", with_args(grad_y=lambda t: t[:, :7]), r"^grad_y must have shape \[3, 8\]"),
    ("topk_mlp", with_args(k=17), r"^k must be in \[0, d_ff\] = \[0, 16\], got 17"),
    ("topk_mlp", with_args(w_up=lambda t: t[:, :7]), "^w_up must be \\[d_ff, d_model\\] with d_model = 8"),
    ("topk_mlp", with_args(w_down_t=lambda t: t[:15]), r"^w_down_t must be \[d_ff, d_model\] = \[16, 8\]"),
    ("topk_mlp", with_args(b_up=lambda t: t[:15]), r"^b_up must have shape \[d_ff\] = \[16\]"),
    ("topk_mlp", with_args(activation="tanh"), '^activation must be "relu" or "gelu"'),
    ("topk_mlp_backward", with_args(h_selected=lambda t: t[:, :3]), r"^h_selected must have shape \[3, 4\]"),
    ("topk_mlp_backward", with_args(grad_y=lambda t: t[:2]), r"^grad_y must have shape \[3, 8\]"),
    ("predicted_sparse_mlp", with_args(indices=torch.zeros(3, 17, dtype=torch.long)),
     r"^indices must have at most d_ff = 16 \(w_up.shape\[0\]\) entries per row, got k = 17"),
    ("predicted_sparse_mlp", with_args(indices=lambda t: t[:2]), r"^indices must be \[..., k\] with the leading dims"),
    ("predicted_sparse_mlp", with_args(b_down=lambda t: t[:7]), r"^b_down must have shape \[d_model\] = \[8\]"),
    ("nm_sparse_linear", with_args(x=lambda t: t[:, :14]), r"^x.shape\[-1\] \(K = 14\) must be a multiple of m = 4"),
    ("nm_sparse_linear", with_args(values=lambda t: t[:, :7]), r"^values must be \[rows, K/m\*n\] = \[rows, 8\]"),
    ("nm_sparse_linear", with_args(meta=lambda t: t[:4]), r"^meta must be int32 \[rows, .*\] = \[5, 1\]"),
    ("nm_sparse_linear", with_args(bias=lambda t: t[:4]), r"^bias must have shape \[rows\] = \[5\]"),
    ("nm_sparse_linear_backward", with_args(grad_y=lambda t: t[:, :4]), r"^grad_y must be \[..., rows\]"),
    ("quantized_linear", with_args(out_features=49), r"^quantized_linear: out_features = 49 does not fit qweight's 3"),
    ("quantized_linear", with_args(x=lambda t: t[:, :48]), r"^quantized_linear: x.shape\[-1\] = K = 48 must be a "),
    ("quantized_linear", with_args(bits=8), r"^quantized_linear: qweight must be \[ceil\(N/16\), K/32, 512\]"),
    ("quantized_linear", with_args(bits=2), r"^quantized_linear: bits must be 4 or 8, got 2"),
    ("quantized_linear", with_args(mins=lambda t: t[:2]), r"^quantized_linear: mins must be \[ceil\(N/16\), K/32, 16\]"),
    ("rms_norm", with_args(weight=lambda t: t[:63]),
     r"^rms_norm: weight must be \[C\] = \[64\] \(C = x.shape\[-1\]\), got \[63\]"),
    ("rms_norm", with_args(x=lambda t: t[:, :32]), r"^rms_norm: weight must be \[C\] = \[32\]"),
    ("rms_norm", with_args(weight=lambda t: t.double()), r"^rms_norm: weight must be in x's dtype \(Float\) or float32"),
    ("rms_norm", with_args(eps=-1e-6), r"^rms_norm: eps must be finite and >= 0, got -1e-06"),
    ("rms_norm", with_args(eps=float("nan")), r"^rms_norm: eps must be finite and >= 0, got nan"),
    ("rms_norm", with_args(eps=float("inf")), r"^rms_norm: eps must be finite and >= 0, got inf"),
    ("packed_linear", with_args(out_features=65),
     r"^packed_linear: out_features = 65 does not fit packed_weight's 2 panels of 32 columns"),
    ("packed_linear", with_args(out_features=32), r"^packed_linear: out_features = 32 does not fit"),
    ("packed_linear", with_args(x=lambda t: t[:, :15]),
     r"^packed_linear: packed_weight must be \[ceil\(N/32\), K, 32\]"),
    ("packed_linear", with_args(bias=lambda t: t[:39]), r"^packed_linear: bias must have shape \[out_features\]"),
    ("packed_swiglu", with_args(hidden=65), r"^packed_swiglu: hidden = 65 does not fit packed_gate_up's 2 panels"),
    ("packed_swiglu", with_args(x=lambda t: t[:, :15]), r"^packed_swiglu: packed_gate_up must be \[ceil\(hidden/32\)"),
    ("tree_attention", with_args(q=lambda t: t[:, :, :3]),
     r"^the query heads Hq = 3 \(q.shape\[2\]\) must be a multiple of the key/value heads Hkv = 2"),
    ("tree_attention", with_args(v_cache=lambda t: t[:, :9]),
     r"^v_cache must be \[B, L_max, Hkv, Dv\] = \[2, 10, 2, 6\]"),
    ("tree_attention", with_args(k_tree=lambda t: t[:, :2]), r"^k_tree must be \[B, T, Hkv, D\] = \[2, 3, 2, 8\]"),
    ("tree_attention", with_args(k_cache=lambda t: t[..., :7]),
     r"^k_cache must be \[B, L_max, Hkv, D\] = \[2, \*, \*, 8\]"),
    ("tree_attention", with_args(tree_mask=torch.ones(4, 4, dtype=torch.bool)),
     r"^tree_mask must be \[T, T\] = \[3, 3\]"),
    ("tree_attention", with_args(cache_lens=torch.tensor([1, 2, 3])), r"^cache_lens must be \[B\] = \[2\]"),
    ("tree_linear_attention", with_args(S=lambda t: t[..., :5]),
     r"^S must have shape \[B, H, Dk, Dv\] = \[2, 4, 8, 6\]"),
    ("tree_linear_attention", with_args(tree_mask=torch.ones(2, 2, dtype=torch.bool)), r"^tree_mask must be \[T, T\]"),
    ("verify_tree_greedy", with_args(tree_tokens=lambda t: t[:, :3]), r"^tree_tokens must be \[B, T\] = \[2, 4\]"),
    ("verify_tree_greedy", with_args(parents=torch.tensor([-1, 0, 0, 1, 1])), r"^parents must be \[T\] = \[4\]"),
    ("verify_tree_greedy", with_args(logits=torch.randn(2, 0, 10), tree_tokens=torch.zeros(2, 0, dtype=torch.long),
                                     parents=torch.zeros(0, dtype=torch.long)),
     "^logits must have at least one tree node"),
    ("verify_tree_greedy", with_args(logits=lambda t: t[..., :0]), "^logits must have a vocabulary of at least one"),
    ("verify_tree_sampling", with_args(uniforms=lambda t: t[:, :3]),
     r"^uniforms must be \[B, U\] with B = 2 and U >= T"),
    ("compact_kv_cache", with_args(accepted=lambda t: t[:1]), r"^accepted must be \[B, T\] with B = 2"),
    ("compact_kv_cache", with_args(v_cache=lambda t: t[:, :11]),
     r"^v_cache must be \[B, L_max, Hkv, Dv\] = \[2, 12, 2, \*\]"),
    ("compact_kv_cache", with_args(num_accepted=torch.tensor([1, 1, 1])), r"^num_accepted must be \[B\] = \[2\]"),
    ("sla_tree_commit", with_args(z=lambda ts: ts[:1]),
     "^sla_tree_commit: S, z, k and v must have one tensor per layer"),
    ("sla_tree_commit", with_args(conv_tail=lambda ts: ts[:1]), "^sla_tree_commit: conv_tail must be empty or hold 2"),
    ("sla_tree_commit", with_args(k=second(lambda t: t[:1])),
     r"^sla_tree_commit: k\[1\] must be float \[B, T, H, Dk\]"),
    ("sla_tree_commit", with_args(v=second(lambda t: t[:, :3])),
     r"^sla_tree_commit: v\[1\] must be float \[B, T, H, Dv\]"),
    ("sla_tree_commit", with_args(S=second(lambda t: t.transpose(2, 3).contiguous().transpose(2, 3))),
     r"^sla_tree_commit: S\[1\] must be .* with a contiguous last dim"),
    ("sla_tree_commit", with_args(conv_tail=second(lambda t: t[..., :1])), r"^sla_tree_commit: conv_tail\[1\] must be"),
    ("sla_tree_commit", with_args(path=lambda t: t[:1]), r"^sla_tree_commit: path must be int64 \[B, n\] with B = 2"),
    ("tree_dwconv", with_args(weight=lambda t: t[:5]), r"^tree_dwconv: weight must be \[D, kernel_size\] with D"),
    ("tree_dwconv", with_args(conv_tail=lambda t: t[..., :1]),
     r"^tree_dwconv: conv_tail must be \[B\*H, D, kernel_size"),
    ("tree_dwconv", with_args(parents=torch.tensor([-1, 0, 0])),
     r"^tree_dwconv: parents must be int64 \[T\] or \[B, T\]"),
    ("tree_dwconv", with_args(bias=lambda t: t[:5]), r"^tree_dwconv: bias must have shape \[D\] = \[6\]"),
    ("decode_attention", with_args(qkv=lambda t: t[:, :56]),
     r"^decode_attention: qkv must be \[B, \(H \+ 2 Hkv\) \* D\] = \[2, 64\]"),
    ("decode_attention", with_args(num_heads=3), "^decode_attention: num_heads = 3 must be a multiple of"),
    ("decode_attention", with_args(num_heads=0), "^decode_attention: num_heads must be >= 1"),
    ("decode_attention", with_args(k_cache=lambda t: t[..., :7].contiguous(),
                                   v_cache=lambda t: t[..., :7].contiguous(), qkv=lambda t: t[:, :56],
                                   cos=lambda t: t[:, :7], sin=lambda t: t[:, :7]),
     r"^decode_attention: the head dim D = 7 \(k_cache.shape\[3\]\) must be even"),
    ("decode_attention", with_args(v_cache=lambda t: t[:, :9]),
     r"^decode_attention: v_cache must be \[B, L, Hkv, D\] = \[2, 10, 2, 8\]"),
    ("decode_attention", with_args(k_cache=lambda t: t.transpose(1, 2).contiguous().transpose(1, 2)),
     "^decode_attention: k_cache must be contiguous"),
    ("decode_attention", with_args(lens=torch.tensor([1, 2, 3])),
     r"^decode_attention: lens must be int64 \[B\] = \[2\]"),
    ("decode_attention", with_args(sin=lambda t: t[:11]),
     r"^decode_attention: sin must be float32 \[P, D\] = \[12, 8\]"),
    ("decode_attention", with_args(cos=lambda t: t[:, :6]),
     r"^decode_attention: cos must be float32 \[P, D\] with D = 8"),
]


@pytest.mark.parametrize("op,change,match", SIZE_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(SIZE_CASES)])
def test_mismatched_sizes_and_scalars_are_named(op, change, match):
    s = BY_OP[op]
    assert_refused(s, change(s), s.kwargs, match)


def test_keyword_scalars_are_checked():
    """n and m of nm_sparse_linear, keyword arguments."""
    s = BY_OP["nm_sparse_linear"]
    for kwargs, match in ((dict(n=4, m=4), "^N:M pattern: n must satisfy 1 <= n < m = 4, got n = 4"),
                          (dict(n=1, m=3), "^N:M pattern: m must be one of 2, 4, 8, 16, got m = 3")):
        assert_refused(s, s.args, kwargs, match)


def test_packed_linear_takes_meta_tensors():
    """A CPU-only op, but its Meta kernel takes meta tensors, as torch.compile's fakes of CPU
    tensors are inside it, and a plain meta call behaves as any other op's."""
    s = BY_OP["packed_linear"]
    out = s.call(tree_map(to_meta, s.args))
    assert out.device.type == "meta" and out.shape == (3, 40)


# ---- the examples: fakes accepted what the kernels refuse, mixed devices gave garbage ----

def test_compile_refuses_what_eager_refuses():
    """torch.compile (fullgraph, aot_eager) traces through the Meta kernels, which now refuse at
    trace time what the kernels refuse (k > d_ff, out_features beyond the panels, int dtypes)."""
    for op, change, match in [("topk_activation", with_args(k=17), r"k must be in \[0, d_ff\] = \[0, 16\]"),
                              ("topk_mlp", with_args(k=17), r"k must be in \[0, d_ff\] = \[0, 16\]"),
                              ("packed_linear", with_args(out_features=65), "out_features = 65 does not fit"),
                              ("sla_step", with_args(q=lambda t: t.int()), "q must be float32")]:
        s = BY_OP[op]
        args = change(s)
        with pytest.raises(RuntimeError, match=match):
            s.call(args)
        torch._dynamo.reset()
        compiled = torch.compile(lambda *a: s.call(list(a)), fullgraph=True, backend="aot_eager")
        with pytest.raises(RuntimeError, match=match):
            compiled(*args)


def test_mixed_devices_raise_instead_of_returning_memory():
    """The issue's cases: one input on meta, the others on the CPU."""
    cases = [("sla_forward", "k"), ("sla_step", "S"), ("sparse_down_projection", "values"),
             ("predicted_sparse_mlp", "w_down_t"), ("tree_attention", "cache_lens"),
             ("packed_swiglu", "packed_gate_up")]
    for op, arg in cases:
        s = BY_OP[op]
        with pytest.raises(RuntimeError, match=f"{arg} is on meta"):
            s.call(with_args(**{arg: to_meta})(s))
    s = BY_OP["compact_kv_cache"]
    k_cache, v_cache, lens = s.args[0].clone(), s.args[1].clone(), s.args[2].clone()
    with pytest.raises(RuntimeError, match="v_cache is on meta but k_cache is on cpu"):
        ops.compact_kv_cache(k_cache, v_cache.to("meta"), lens, *s.args[3:])
    with pytest.raises(RuntimeError, match="v_cache is on cpu but k_cache is on meta"):
        ops.compact_kv_cache(k_cache.to("meta"), v_cache, lens, *s.args[3:])
    assert torch.equal(lens, s.args[2]), "a refused call leaves cache_lens alone"


# ---- value checks: the real kernels only ----

VALUE_CASES = [
    ("tree_dwconv", with_args(parents=torch.tensor([-1, 0, 3, 1])), r"parents\[0, 2\] = 3 is not a parent"),
    ("sla_tree_commit", with_args(path=torch.tensor([[0, 1, 4], [0, 2, -1]])), r"path\[0, 2\] = 4 is not a node"),
    ("verify_tree_greedy", with_args(tree_tokens=torch.tensor([[1, 2, 3, 10], [5, 6, -1, 7]])),
     r"tree_tokens\[0, 3\] = 10 is not in the vocabulary"),
    ("verify_tree_greedy", with_args(parents=torch.tensor([-1, 0, 2, 1])), r"parents\[.*2\] = 2"),
    ("tree_attention", with_args(cache_lens=torch.tensor([4, 11])), r"cache_lens\[1\] = 11 is beyond the cache"),
    ("sparse_down_projection", with_args(indices=lambda t: t + 16), r"indices must be in \[0, d_ff\) = \[0, 16\)"),
    ("compact_kv_cache", with_args(accepted=torch.tensor([[0, 1, -1, -1], [0, 3, 2, -1]])),
     r"accepted\[1, 2\] = 2 must be a node index"),
    ("decode_attention", with_args(lens=torch.tensor([3, 10])), r"lens\[1\] = 10 leaves no room for the new token"),
    ("decode_attention", with_args(cos=lambda t: t[:9], sin=lambda t: t[:9]), r"lens\[1\] = 9 has no row in cos"),
]


@pytest.mark.parametrize("op,change,match", VALUE_CASES, ids=[c[0] for c in VALUE_CASES])
def test_value_checks_run_in_the_real_kernels(op, change, match):
    """Eager refuses; meta and fake tensors have no values to check, so the Meta kernel passes;
    a compiled graph refuses when its real kernel runs."""
    s = BY_OP[op]
    args = change(s)
    copy = lambda: tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, args)
    with pytest.raises(RuntimeError, match=match):
        s.call(copy())
    s.call(tree_map(to_meta, args))
    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: s.call(list(a)), fullgraph=True, backend="aot_eager")
    with pytest.raises(RuntimeError, match=match):
        compiled(*copy())
