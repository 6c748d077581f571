"""The fuzz suite's machinery: seeded random cases for every public op, each input in a random
memory layout, compared with the fp64 reference through tests.helpers.

A test is one op; ``@fuzz("op")`` runs it on ``LEANFORMER_FUZZ_CASES`` cases (default
:data:`DEFAULT_CASES`, times the test's ``weight``), each a :class:`Case` seeded from the op's
name, ``LEANFORMER_FUZZ_SEED`` (default 0) and the case's number, so a case is the same on every
run and machine. The case draws its shapes, dtype and options through its own generators and
records each draw; a failing case raises with that record (seed, shapes, dtypes, layouts) and
the command that replays it alone.

Layouts (:meth:`Case.layout`): every tensor argument is handed over contiguous, as a strided
view (every other element along one dim), a permuted view (another dim order in memory), an
offset view (a few elements into a larger storage: misaligned for vector loads), a strided
offset view, or expanded (stride 0 along one dim: the slices along it repeat the first one).
The reference is computed from the values the op was given, so an expanded input only changes
what both sides compute. A tensor the op writes in place cannot be expanded: the test expects it
refused, and left untouched.
"""
from __future__ import annotations

import inspect
import os
import random
import zlib
from typing import Dict, Iterable, List, Optional, Sequence

import pytest
import torch

from tests.helpers import assert_close

DEFAULT_CASES = 40
# fp32, bf16, fp16 and fp64: what the CPU kernels take (fp16 too: they dispatch on it).
ALL_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
LAYOUTS = ["contiguous", "strided", "permuted", "offset", "strided+offset", "expanded"]
LAYOUT_WEIGHTS = [4, 2, 2, 2, 1, 2]
GRAD_FRACTION = 0.5  # of the cases of a differentiable op, those that also compare gradients

_SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64",
          torch.int64: "i64", torch.int32: "i32", torch.bool: "bool"}


def cases_per_op() -> int:
    return int(os.environ.get("LEANFORMER_FUZZ_CASES", DEFAULT_CASES))


def base_seed() -> int:
    return int(os.environ.get("LEANFORMER_FUZZ_SEED", 0))


def case_seed(op: str, case_id: int) -> int:
    return zlib.crc32(f"{op}:{base_seed()}:{case_id}".encode())


class Case:
    """One seeded case: its draws (``pick``, ``size``, ``randn``, ``layout``, ...) come from its
    own generators and are recorded for the failure message."""

    def __init__(self, op: str, case_id: int, test_id: str = ""):
        self.op, self.case_id, self.test_id = op, case_id, test_id
        self.seed = case_seed(op, case_id)
        self.rng = random.Random(self.seed)
        self.gen = torch.Generator().manual_seed(self.seed)
        self.info: Dict[str, str] = {}

    # ---- recorded draws ----

    def note(self, name: str, value) -> None:
        self.info[name] = value if isinstance(value, str) else repr(value)

    def pick(self, name: str, options: Sequence):
        value = self.rng.choice(list(options))
        self.note(name, _short(value))
        return value

    def coin(self, name: str, p: float = 0.5) -> bool:
        value = self.rng.random() < p
        self.note(name, value)
        return value

    def size(self, name: str, hi: int, lo: int = 0, special: Iterable[int] = ()) -> int:
        """A size in [lo, hi]: the edges 0 and 1 (where in range), the given special values
        (chunk and tile boundaries) and odd sizes more often than uniform."""
        r = self.rng.random()
        edges = [v for v in (0, 1) if lo <= v <= hi]
        specials = [v for v in special if lo <= v <= hi]
        if r < 0.15 and edges:
            value = self.rng.choice(edges)
        elif r < 0.35 and specials:
            value = self.rng.choice(specials)
        elif r < 0.65:
            odd = [v for v in range(max(lo, 1), hi + 1) if v % 2]
            value = self.rng.choice(odd) if odd else self.rng.randint(lo, hi)
        else:
            value = self.rng.randint(lo, hi)
        self.note(name, value)
        return value

    def randn(self, *shape, dtype=torch.float32, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
        """Normal values (fp32 draws, so every dtype sees the same numbers), rounded to dtype."""
        return ((torch.randn(shape, generator=self.gen) * scale + shift)).to(dtype)

    def rand(self, *shape, dtype=torch.float32) -> torch.Tensor:
        return torch.rand(shape, generator=self.gen).to(dtype)

    def randint(self, lo: int, hi: int, shape) -> torch.Tensor:
        return torch.randint(lo, hi, tuple(shape), generator=self.gen)

    def grads(self) -> bool:
        """Whether this case also compares gradients (GRAD_FRACTION of the cases)."""
        return self.coin("grads", GRAD_FRACTION)

    # ---- layouts ----

    def layout(self, name: str, t: torch.Tensor, *, expand_dims: Optional[Sequence[int]] = None,
               kinds: Sequence[str] = LAYOUTS, keep_last_dim: bool = False) -> torch.Tensor:
        """t's values in a random memory layout (recorded with the shape and dtype). expand_dims:
        the dims along which the values may repeat (default: any), [] for none. keep_last_dim:
        the last dim stays contiguous (an op that requires it)."""
        dims = list(range(t.dim() - 1 if keep_last_dim else t.dim()))
        allowed_expand = dims if expand_dims is None else [d % t.dim() for d in expand_dims]
        weights = [w for k, w in zip(LAYOUTS, LAYOUT_WEIGHTS) if k in kinds]
        kind = self.rng.choices([k for k in LAYOUTS if k in kinds], weights=weights)[0]
        out, detail = _apply_layout(t, kind, self.rng, allowed_expand, keep_last_dim)
        self.note(name, f"{_short(t.dtype)}{list(t.shape)} {detail}")
        return out

    def describe(self) -> str:
        fields = ", ".join(f"{k}={v}" for k, v in self.info.items())
        replay = (f"LEANFORMER_FUZZ_CASES={max(cases_per_op(), self.case_id + 1)} "
                  f"LEANFORMER_FUZZ_SEED={base_seed()} python -m pytest '{self.test_id}'")
        return f"fuzz case {self.op}[{self.case_id}] (seed {self.seed}): {fields}\n  replay: {replay}"

    # ---- comparisons ----

    def close(self, actual, expected, dtype, what, *, scale=1.0, absolute=False):
        assert_close(actual, expected, dtype, what, scale=scale, absolute=absolute)


def _short(value):
    if isinstance(value, torch.dtype):
        return _SHORT.get(value, str(value))
    return value


def _apply_layout(t: torch.Tensor, kind: str, rng: random.Random, expand_dims: List[int], keep_last_dim: bool):
    shape = list(t.shape)
    nd = t.dim()
    movable = list(range(nd - 1)) if keep_last_dim else list(range(nd))
    if kind == "expanded":
        cands = [d for d in expand_dims if shape[d] > 1] or [d for d in expand_dims if shape[d] == 1]
        if not cands:
            kind = "offset"
        else:
            d = rng.choice(cands)
            return t.narrow(d, 0, 1).expand(shape), f"expanded(dim {d})"
    if kind in ("strided", "strided+offset") and not movable:
        kind = "offset"
    if kind == "permuted" and len(movable) < 2:
        kind = "strided" if movable else "offset"
    if kind == "contiguous":
        return t.clone(), "contiguous"
    if kind == "permuted":
        order = list(range(nd))
        sub = movable[:]
        while sub == movable:
            rng.shuffle(sub)
        for d, s in zip(movable, sub):
            order[d] = s
        buf = torch.empty([shape[o] for o in order], dtype=t.dtype)
        inverse = [order.index(d) for d in range(nd)]
        view = buf.permute(inverse)
        view.copy_(t)
        return view, f"permuted(memory order {order})"
    offset = rng.randint(1, 7) if kind in ("offset", "strided+offset") else 0
    step, d = 1, None
    if kind in ("strided", "strided+offset"):
        d, step = rng.choice(movable), rng.choice([2, 3])
    big = list(shape)
    if d is not None:
        big[d] = shape[d] * step
    n = 1
    for s in big:
        n *= s
    storage = torch.empty(n + offset, dtype=t.dtype)
    view = storage[offset:].view(big)
    if d is not None:
        view = view[(slice(None),) * d + (slice(None, None, step),)]
    view.copy_(t)
    detail = []
    if d is not None:
        detail.append(f"strided(dim {d}, step {step})")
    if offset:
        detail.append(f"offset {offset}")
    return view, "+".join(detail)


FUZZED = set()  # the public names the fuzz tests exercise (test_fuzz_coverage checks __all__)


def fuzz(op: str, weight: float = 1.0, covers: Sequence[str] = ()):
    """Runs the decorated test(case) on the op's seeded cases, one pytest item each (case ids
    in the item name); a failure reports the case's draws and how to replay it. weight scales
    the number of cases; covers names the other public functions the test exercises."""
    n = max(1, round(cases_per_op() * weight))
    FUZZED.update((op, *covers))

    def decorate(body):
        fixtures = list(inspect.signature(body).parameters)[1:]  # after `case`: pytest fixtures

        def test(case_id, request, **kwargs):
            case = Case(op, case_id, request.node.nodeid)
            try:
                body(case, **kwargs)
            except Exception as e:  # noqa: BLE001 - every failure gets the case's record
                raise AssertionError(f"{case.describe()}\n{type(e).__name__}: {e}") from e

        test.__name__, test.__doc__, test.__module__ = body.__name__, body.__doc__, body.__module__
        test.body = body  # body(Case(op, i)) replays case i in a script or a debugger
        arg = lambda name: inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        test.__signature__ = inspect.Signature([arg(a) for a in ("case_id", "request", *fixtures)])
        return pytest.mark.parametrize("case_id", range(n))(test)

    return decorate


def double(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A contiguous fp64 copy of a floating tensor (the reference's input); others as they are."""
    if t is None:
        return None
    return t.detach().double() if t.is_floating_point() else t


def leaf(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """t as a leaf requiring grad, keeping its strides (None stays None)."""
    return None if t is None else t.detach().requires_grad_(True)


def grads_of(out: torch.Tensor, leaves: Sequence[Optional[torch.Tensor]], grad_out: torch.Tensor):
    """d<out, grad_out>/d leaves (None for None leaves or leaves that out does not depend on)."""
    wanted = [x for x in leaves if x is not None and x.requires_grad]
    got = iter(torch.autograd.grad(out, wanted, grad_out, allow_unused=True))
    return [next(got) if x is not None and x.requires_grad else None for x in leaves]


def assert_same_nonfinite(actual, expected, dtype, what, *, scale=1.0):
    """NaN and +-inf exactly where the reference has them; the finite values within tolerance."""
    assert torch.equal(actual.isnan(), expected.isnan()), f"{what}: NaN positions differ"
    assert torch.equal(actual.isinf(), expected.isinf()), f"{what}: inf positions differ"
    inf = expected.isinf()
    assert torch.equal(actual[inf].double(), expected[inf].double()), f"{what}: inf signs differ"
    finite = expected.isfinite()
    assert_close(actual.double().where(finite, 0), expected.double().where(finite, 0), dtype, what,
                 scale=scale)

