"""Build of leanformer's one extension, leanformer._C.

Build variables (also documented in README.md):

| variable                | default          | effect                                                      |
|-------------------------|------------------|-------------------------------------------------------------|
| LEANFORMER_CUDA         | auto             | 1 forces the CUDA kernels on, 0 off; auto = torch is a CUDA  |
|                         |                  | build and a CUDA toolkit (nvcc + cuda_runtime.h) is found    |
| LEANFORMER_CUDA_ARCHS   | 8.0;9.0a         | ';'-separated compute capabilities; '9.0a' for sm_90a (needed|
|                         |                  | by the Hopper 2:4 sparse GEMM), '+PTX' to embed PTX as well  |
| LEANFORMER_CUTLASS      | 1 (with CUDA)    | 0 builds without the CUTLASS 2:4 sparse tensor-core GEMM     |
|                         |                  | (nm_sparse_linear then falls back to cuBLAS, with a warning) |
| CUTLASS_PATH            | found            | CUTLASS source root (include/, tools/util/include/);         |
|                         |                  | otherwise the headers of the nvidia-cutlass pip package      |
| CUDA_HOME / CUDA_PATH   | found            | the CUDA toolkit; otherwise /usr/local/cuda, then nvcc's home |
| MAX_JOBS                | min(cores, GiB/5)| parallel compile jobs (nvcc takes 3-5 GB each)              |
| LEANFORMER_NVCC_THREADS | 1                | nvcc --threads (parallel archs inside one job)              |
| DEBUG                   | 0                | 1 builds with -O0 -g (and -G for device code)                |
"""
import glob
import json
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _is_cuda_toolkit(path):
    return bool(path) and os.path.isfile(os.path.join(path, "include", "cuda_runtime.h")) and (
        os.path.isfile(os.path.join(path, "bin", "nvcc"))
    )


def find_cuda_home():
    """The toolkit root. An nvcc wrapper script on PATH (as in /usr/local/bin) makes torch guess
    a root without the runtime, so look for cuda_runtime.h rather than trusting nvcc's dir."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        candidates.append(os.path.dirname(os.path.dirname(nvcc)))
    for path in candidates:
        if _is_cuda_toolkit(path):
            return path
    return None


CUDA_HOME = find_cuda_home()
if CUDA_HOME:
    # Must be set before torch.utils.cpp_extension is imported: it reads CUDA_HOME once.
    os.environ["CUDA_HOME"] = CUDA_HOME

if "MAX_JOBS" not in os.environ:
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gib = 8
    os.environ["MAX_JOBS"] = str(max(1, min(os.cpu_count() or 1, int(mem_gib // 5))))

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def want_cuda():
    flag = os.environ.get("LEANFORMER_CUDA", "auto").strip().lower()
    available = torch.version.cuda is not None and CUDA_HOME is not None
    if flag in ("0", "off", "false", "no"):
        return False
    if flag in ("1", "on", "true", "yes"):
        if not available:
            sys.exit(
                f"LEANFORMER_CUDA=1 but torch {torch.__version__} is "
                + ("not a CUDA build" if torch.version.cuda is None else "a CUDA build")
                + ("" if CUDA_HOME else " and no CUDA toolkit was found (set CUDA_HOME)")
            )
        return True
    return available


def arch_flags(archs):
    flags = []
    for arch in archs:
        ptx = arch.endswith("+PTX")
        arch = arch.removesuffix("+PTX")
        num = arch.replace(".", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return flags


def cutlass_includes():
    """CUTLASS header dirs: $CUTLASS_PATH, else the ones the `nvidia-cutlass` wheel ships under
    cutlass_library/source. None when LEANFORMER_CUTLASS=0; a missing CUTLASS stops the build."""
    if os.environ.get("LEANFORMER_CUTLASS", "1").strip().lower() in ("0", "off", "false", "no"):
        return None
    roots = []
    if os.environ.get("CUTLASS_PATH"):
        roots.append(os.environ["CUTLASS_PATH"])
    try:
        import cutlass_library

        roots.append(os.path.join(os.path.dirname(cutlass_library.__file__), "source"))
    except ImportError:
        pass
    for root in roots:
        dirs = [os.path.join(root, "include"), os.path.join(root, "tools", "util", "include")]
        if os.path.isfile(os.path.join(dirs[0], "cutlass", "gemm", "device", "gemm_sparse.h")):
            return dirs
    sys.exit("CUDA kernels are being built but the CUTLASS headers were not found"
             + (f" (CUTLASS_PATH={os.environ['CUTLASS_PATH']} has no include/cutlass)" if os.environ.get("CUTLASS_PATH") else "")
             + ": `pip install nvidia-cutlass` (or set CUTLASS_PATH to a CUTLASS checkout), or build "
             "without the 2:4 sparse tensor-core GEMM with LEANFORMER_CUTLASS=0")


def cuda_library_includes():
    """Header dirs of CUDA libraries (cuSPARSE, cuBLAS, ...) that torch's CUDA headers include.
    A pip-installed torch brings them as nvidia-* wheels rather than inside the toolkit."""
    if os.path.isfile(os.path.join(CUDA_HOME, "include", "cusparse.h")):
        return []
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations) if spec and spec.submodule_search_locations else []
    found = sorted({os.path.dirname(h) for root in roots
                    for h in glob.glob(os.path.join(root, "**", "include", "cusparse.h"), recursive=True)})
    if not found:
        sys.exit(f"cusparse.h (needed by torch's CUDA headers) is neither in {CUDA_HOME}/include nor "
                 "in an nvidia-* pip package; install the CUDA toolkit's libraries or set LEANFORMER_CUDA=0")
    return found


def extension():
    debug = os.environ.get("DEBUG", "0") == "1"
    use_cuda = want_cuda()
    archs = [a for a in os.environ.get("LEANFORMER_CUDA_ARCHS", "8.0;9.0a").split(";") if a]
    opt = ["-O0", "-g"] if debug else ["-O3"]
    cxx = [*opt, "-fopenmp"]  # torch picks the C++ standard its headers need
    sources = sorted(glob.glob("csrc/*.cpp"))
    include_dirs = [os.path.join(ROOT, "csrc")]
    macros = []
    kwargs = {}
    if use_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        include_dirs += cuda_library_includes()
        nvcc = [*opt, "--expt-relaxed-constexpr", *arch_flags(archs),
                "--threads", os.environ.get("LEANFORMER_NVCC_THREADS", "1")]
        if debug:
            nvcc.append("-G")
        macros.append(("LEANFORMER_WITH_CUDA", None))
        cutlass = cutlass_includes()
        if cutlass:
            include_dirs += cutlass
            macros.append(("LEANFORMER_WITH_CUTLASS", None))
            # The Hopper sparse GEMM needs the sm_90a features (wgmma.sp); without them only the
            # sm80 CUTLASS kernel is built.
            if any(a.removesuffix("+PTX") == "9.0a" for a in archs):
                macros.append(("LEANFORMER_CUTLASS_SM90", None))
        kwargs["extra_compile_args"] = {"cxx": cxx, "nvcc": nvcc}
        ext_cls = CUDAExtension
    else:
        kwargs["extra_compile_args"] = {"cxx": cxx}
        ext_cls = CppExtension
    write_build_config(use_cuda, archs if use_cuda else [],
                       use_cuda and any(name == "LEANFORMER_WITH_CUTLASS" for name, _ in macros))
    return ext_cls(
        "leanformer._C",
        sources,
        include_dirs=include_dirs,
        define_macros=macros,
        extra_link_args=["-fopenmp"],
        py_limited_api=False,
        **kwargs,
    )


def write_build_config(use_cuda, archs, cutlass):
    """What the binary was built with; the loader compares it with the running torch."""
    config = {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_kernels": use_cuda,
        "cuda_archs": archs,
        "cutlass": cutlass,
        "cuda_home": CUDA_HOME if use_cuda else None,
        "python": sys.version.split()[0],
    }
    with open(os.path.join(ROOT, "python", "leanformer", "_build_config.json"), "w") as f:
        json.dump(config, f, indent=1)


setup(
    packages=find_packages("python"),
    package_dir={"": "python"},
    package_data={"leanformer": ["_build_config.json"]},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
