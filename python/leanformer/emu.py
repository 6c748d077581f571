"""The CUDA kernels run on the CPU: an emulation build for tests, from a source checkout.

``python -m leanformer.emu build`` compiles the CUDA launchers and kernels of ``csrc/cuda``
(all but the CUTLASS tensor-core GEMMs) as C++ against the HIP CPU Runtime (header-only, found
in ``$LEANFORMER_HIP_CPU``, ``../shared/vendor/hip-cpu`` or ``third_party/hip-cpu``; it needs
Debian's ``libtbb-dev``) into ``build/emu/leanformer_emu.so``. Loaded, it registers every
leanformer op with a CUDA kernel under ``torch.ops.leanformer_emu``, on CPU tensors.

:class:`EmuTensor` routes to them: a CPU tensor whose leanformer ops run the emulated CUDA
kernels (every other op runs on the CPU as usual). Inside :func:`emulation` the device string
``"emu"`` makes them (``torch.randn(3, device="emu")``, ``x.to("emu")``); that is the test
device "emu" of ``tests/helpers.py``, which runs the CUDA test cases on it.

What it checks and what it cannot: docs/development.md ("CUDA kernels on the CPU"). Never part
of a normal install: nothing imports this module but the tests.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

ROOT = Path(__file__).resolve().parents[2]
BUILD_DIR = ROOT / "build" / "emu"
NAME = "leanformer_emu"
# -O1: -O0 runs the tests ~3x slower, -O2 compiles ~1.5x longer for little run time.
CFLAGS = ["-O1", "-DLEANFORMER_EMU", "-fvisibility=hidden", "-Wno-unknown-pragmas"]


def hip_cpu_root() -> tuple[Path | None, str]:
    """(HIP-CPU's root, where it came from) or (None, why not found)."""
    candidates = []
    if os.environ.get("LEANFORMER_HIP_CPU"):
        candidates.append((Path(os.environ["LEANFORMER_HIP_CPU"]), "LEANFORMER_HIP_CPU"))
    candidates += [(ROOT.parent / "shared" / "vendor" / "hip-cpu", "../shared/vendor/hip-cpu"),
                   (ROOT / "third_party" / "hip-cpu", "third_party/hip-cpu")]
    tried = []
    for path, label in candidates:
        if (path / "include" / "hip" / "hip_runtime.h").is_file() and \
                (path / "src" / "include" / "hip" / "detail" / "grid_launch.hpp").is_file():
            return path, label
        tried.append(f"{label} ({path})")
    return None, "HIP-CPU not found (set LEANFORMER_HIP_CPU to its root); tried " + ", ".join(tried)


def sources() -> list[Path]:
    return sorted((ROOT / "csrc" / "cuda" / "emu").glob("*.cpp"))


def library_path() -> Path:
    return BUILD_DIR / f"{NAME}.so"


def unavailable_reason() -> str | None:
    """Why the emulation cannot run here, or None when it can (built, or buildable)."""
    if not (ROOT / "csrc" / "cuda" / "emu").is_dir():
        return "the CUDA emulation needs a source checkout (csrc/cuda/emu)"
    root, why = hip_cpu_root()
    if root is None:
        return why
    if not (Path("/usr/include/tbb/tbb.h").is_file() or Path("/usr/include/oneapi/tbb.h").is_file()):
        return "libtbb-dev is not installed (apt-get install libtbb-dev)"
    if not library_path().is_file():
        return "the CUDA emulation is not built: python -m leanformer.emu build"
    return None


_loaded = False


def build(verbose: bool = False) -> float:
    """Compiles (ninja: only what changed) and loads the emulation library; returns seconds."""
    global _loaded
    from torch.utils import cpp_extension

    root, why = hip_cpu_root()
    if root is None:
        raise RuntimeError(why)
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    start = time.time()
    cpp_extension.load(
        name=NAME,
        sources=[str(s) for s in sources()],
        extra_include_paths=[str(ROOT / "csrc"), str(ROOT / "csrc" / "cuda"), str(root / "include")],
        extra_cflags=CFLAGS,
        extra_ldflags=["-ltbb"],
        build_directory=str(BUILD_DIR),
        is_python_module=False,
        verbose=verbose,
    )
    _loaded = True
    return time.time() - start


def load() -> None:
    """Loads the built library (rebuilding what changed since); raises when unavailable."""
    if _loaded:
        return
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(reason)
    build()


# ---- EmuTensor: leanformer ops on it run the emulated CUDA kernels ----

def _unwrap(x):
    return x.elem if isinstance(x, EmuTensor) else x


def _wrap(x):
    return EmuTensor(x) if isinstance(x, torch.Tensor) and not isinstance(x, EmuTensor) else x


class EmuTensor(torch.Tensor):
    """A CPU tensor (``elem``) whose leanformer ops run the CUDA kernels, emulated. Its device
    is the CPU's; every other op runs on ``elem`` and returns EmuTensors, views included."""

    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem: torch.Tensor, requires_grad: bool = False):
        assert not isinstance(elem, EmuTensor)
        r = torch.Tensor._make_wrapper_subclass(
            cls, elem.size(), strides=elem.stride(), storage_offset=elem.storage_offset(), dtype=elem.dtype,
            layout=elem.layout, device=elem.device, requires_grad=requires_grad)
        r.elem = elem.detach() if elem.requires_grad else elem
        return r

    def __repr__(self, *, tensor_contents=None):
        return f"EmuTensor({self.elem!r})"

    def data_ptr(self):
        return self.elem.data_ptr()

    def tolist(self):
        return self.elem.tolist()

    def numpy(self, *args, **kwargs):
        return self.elem.numpy(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        uargs, ukwargs = tree_map(_unwrap, args), tree_map(_unwrap, kwargs)
        if func.namespace == "leanformer":
            load()
            packet = getattr(torch.ops.leanformer_emu, func._schema.name.split("::", 1)[1])
            out = getattr(packet, func._overloadname)(*uargs, **ukwargs)
        else:
            out = func(*uargs, **ukwargs)
        written = _written_argument(func, args, kwargs)
        if written is not None:  # in place or out=: the result is that argument itself
            return written
        return tree_map(_wrap, out)


def _written_argument(func, args, kwargs):
    """The argument an in-place or out= op returns, or None."""
    returns = func._schema.returns
    if len(returns) != 1 or returns[0].alias_info is None or not returns[0].alias_info.is_write:
        return None
    for i, a in enumerate(func._schema.arguments):
        if a.alias_info is not None and a.alias_info.is_write:
            return args[i] if i < len(args) else kwargs.get(a.name)
    return None


class _ToEmu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return EmuTensor(x.detach().clone())

    @staticmethod
    def backward(ctx, grad):
        return grad.elem.clone() if isinstance(grad, EmuTensor) else grad


class _FromEmu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.elem.clone()

    @staticmethod
    def backward(ctx, grad):
        return EmuTensor(grad.clone())


def to_emu(t: torch.Tensor) -> EmuTensor:
    """A copy of t as an EmuTensor (differentiable, like ``.to("cuda")``)."""
    if isinstance(t, EmuTensor):
        return t
    if t.device.type != "cpu":
        t = t.cpu()
    return _ToEmu.apply(t) if t.requires_grad else EmuTensor(t.clone())


def from_emu(t: torch.Tensor) -> torch.Tensor:
    """A plain CPU copy of an EmuTensor (like ``.cpu()`` of a CUDA tensor); other tensors as they are."""
    if not isinstance(t, EmuTensor):
        return t
    return _FromEmu.apply(t) if t.requires_grad else t.elem.clone()


def _is_emu(device) -> bool:
    return isinstance(device, str) and device.split(":")[0] == "emu"


class _EmuDeviceMode(TorchFunctionMode):
    """The device string "emu": factories make EmuTensors, .to("emu") copies into one, .cpu()
    and .to("cpu") copy out of one."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in (torch.Tensor.to, torch.Tensor.cuda, torch.Tensor.cpu) and args:
            t, rest = args[0], list(args[1:])
            if func is torch.Tensor.cuda:
                return to_emu(t)
            if func is torch.Tensor.cpu:
                return from_emu(t)
            device = kwargs.pop("device", None)
            if device is None and rest and isinstance(rest[0], (str, torch.device)):
                device = rest.pop(0)
            if _is_emu(device):
                return to_emu(t.to(*rest, **kwargs))
            if device is not None and torch.device(device).type == "cpu":
                return from_emu(t).to(*rest, **kwargs)
            if device is not None:
                kwargs["device"] = device
            return func(t, *rest, **kwargs)
        if _is_emu(kwargs.get("device")):  # a factory
            kwargs["device"] = "cpu"
            requires_grad = kwargs.pop("requires_grad", False)
            out = tree_map(_wrap, func(*args, **kwargs))
            if requires_grad:
                out.requires_grad_(True)
            return out
        return func(*args, **kwargs)


@contextlib.contextmanager
def emulation():
    """Inside, the device "emu" exists: tensors on it run leanformer ops as the CUDA kernels do."""
    load()
    with _EmuDeviceMode():
        yield


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] != ["build"]:
        print("usage: python -m leanformer.emu build [-v]", file=sys.stderr)
        return 2
    root, why = hip_cpu_root()
    if root is None:
        print(why, file=sys.stderr)
        return 1
    if shutil.which("ninja") is None:
        print("ninja is needed (pip install ninja)", file=sys.stderr)
        return 1
    print(f"CUDA emulation: HIP-CPU from {why} ({root}), {len(sources())} sources -> {library_path()}")
    seconds = build(verbose="-v" in argv)
    print(f"CUDA emulation built and loaded in {seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
