"""The package's structure: what ``import leanformer`` loads, and the imports between its modules,
read from the source with ``ast`` (nothing but the root package is imported to check them).

- No import cycle, counting imports inside functions and the package ``__init__`` that importing a
  submodule runs first.
- Imports go down the layers: the bottom (the compiled kernels, ``ops``, ``reference``,
  ``sparse``, ``training``) -> ``nn`` -> ``models`` (beside them the transforms of a built model:
  ``fold``, ``convert``, ``analysis``) -> ``decoding``, ``layers``, ``compress`` -> the
  applications (``lab``, ``cli``). A layer may import its own and lower layers, never a higher one.
- Imports inside functions only where :data:`ALLOWED_IN_FUNCTIONS` says why.

Every check collects all its findings before it fails, so one run lists everything to fix.
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

import pytest

import leanformer

PACKAGE = Path(leanformer.__file__).resolve().parent
ROOT = "leanformer"

# Bottom to top. A module's layer is that of its first name under leanformer (``leanformer.ops.x``
# is in ``ops``'s). The root package is the facade over all of them and has no layer.
LAYERS: List[Tuple[str, Set[str]]] = [
    ("bottom (kernels, ops, references, N:M and block-quantized formats, training loop)",
     {"_C", "_extension", "ops", "reference", "sparse", "quant", "training"}),
    ("nn", {"nn"}),
    ("models (and the transforms of a built model)", {"models", "fold", "convert", "analysis"}),
    ("drivers of a model (decoding, layers, compress)", {"decoding", "layers", "compress"}),
    ("applications (lab, cli) and the CUDA emulation (a test device)", {"lab", "cli", "emu"}),
]

# Imports allowed inside functions, as (importing module, imported module or a package of it):
# why the import cannot be at the top of the module. Everything else goes at the top.
ALLOWED_IN_FUNCTIONS: Dict[Tuple[str, str], str] = {
    ("leanformer.lab.data", "sklearn"):
        "scikit-learn is optional (the lab and test extras); only the digits data needs it",
    ("leanformer.lab.results", "matplotlib"):
        "matplotlib is optional (the lab and bench extras); without it results are written without plots",
    ("leanformer._extension", "leanformer._C"):
        "the loader imports the compiled extension inside a try, to say why it failed and how to rebuild it",
    ("leanformer.models.tokenizer", "tokenizers"):
        "tokenizers is optional (the hf extra); load_tokenizer says which extra to install when it is missing",
    ("leanformer.models.tokenizer", "jinja2"):
        "jinja2 is optional (the hf extra); only chat templates need it",
    ("leanformer.emu", "torch.utils"):
        "torch.utils.cpp_extension (slow to import) only when the emulation is built",
    ("leanformer.lab.experiments.real_llm", "transformers"):
        "transformers is optional (the llamacpp and test extras): one engine of the experiment; skipped without it",
    ("leanformer.lab.experiments.real_llm", "gguf"):
        "gguf is optional (the llamacpp and test extras): transformers reads GGUF files with it, and the F32 copy "
        "of the model is written with it",
    ("leanformer.lab.experiments.real_llm", "llama_cpp"):
        "llama-cpp-python is optional (the llamacpp extra, built from source): the llama.cpp engines, skipped "
        "without it",
    ("leanformer.cli", "pytest"):
        "pytest is optional (the bench and test extras): `leanformer bench` runs the suite through it, the "
        "other commands do not need it",
}


@dataclass(frozen=True)
class Import:
    importer: str  # the importing module
    target: str  # the imported module: a leanformer module, or a third-party one as written
    line: int
    in_function: bool
    path: str  # the importing file, relative to the package's parent folder

    def where(self) -> str:
        return f"{self.path}:{self.line}"


def _module_names() -> Dict[str, Path]:
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


MODULES = _module_names()
COMPILED = {"leanformer._C"}  # the extension module: no source to read, imports nothing of the package


def _is_package(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


def _resolve(name: str) -> Optional[str]:
    """The leanformer module ``name`` denotes (its longest prefix that is one), or None."""
    parts = name.split(".")
    while parts:
        if ".".join(parts) in MODULES or ".".join(parts) in COMPILED:
            return ".".join(parts)
        parts.pop()
    return None


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports_of(module: str) -> List[Import]:
    path = MODULES[module]
    rel = str(path.relative_to(PACKAGE.parent))
    found: List[Import] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                continue  # never runs: names for type checkers only
            if isinstance(child, ast.Import):
                for alias in child.names:
                    found.append(Import(module, _resolve(alias.name) or alias.name, child.lineno, in_function, rel))
            elif isinstance(child, ast.ImportFrom):
                if child.level:  # relative: from the module's package, up level - 1 more
                    package = module.split(".") if _is_package(module) else module.split(".")[:-1]
                    base = ".".join(package[:len(package) - child.level + 1] + ([child.module] if child.module else []))
                else:
                    base = child.module or ""
                if _resolve(base) is None:
                    found.append(Import(module, base, child.lineno, in_function, rel))
                    continue
                for alias in child.names:  # `from pkg import submodule` imports the submodule
                    sub = f"{base}.{alias.name}"
                    target = sub if sub in MODULES or sub in COMPILED else _resolve(base)
                    found.append(Import(module, target, child.lineno, in_function, rel))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse(path.read_text(), filename=str(path)), False)
    return found


IMPORTS = [imp for module in MODULES for imp in _imports_of(module)]


def _ancestors(module: str) -> List[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _graph() -> Dict[str, Dict[str, Import]]:
    """importer -> {imported leanformer module: the import statement}. Importing ``a.b.c`` runs
    ``a.b``'s ``__init__`` first, so it counts as importing ``a.b`` too (the importer's own
    packages aside: they are running already)."""
    graph: Dict[str, Dict[str, Import]] = {m: {} for m in [*MODULES, *COMPILED]}
    for imp in IMPORTS:
        if imp.target not in graph:
            continue
        for target in _ancestors(imp.target) + [imp.target]:
            if target != imp.importer and target not in _ancestors(imp.importer):
                graph[imp.importer].setdefault(target, imp)
    return graph


def _cycles(graph: Dict[str, Dict[str, Import]]) -> List[List[str]]:
    """One cycle through each strongly connected component of more than one module."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    components: List[List[str]] = []

    def connect(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph)))
    for v in sorted(graph):
        if v not in index:
            connect(v)
    cycles = []
    for component in components:  # the shortest cycle from the component's first module back to it
        members, start = set(component), component[0]
        paths = {start: [start]}
        queue = [start]
        cycle = None
        while queue and cycle is None:
            v = queue.pop(0)
            for w in sorted(graph[v]):
                if w == start:
                    cycle = paths[v] + [start]
                    break
                if w in members and w not in paths:
                    paths[w] = paths[v] + [w]
                    queue.append(w)
        cycles.append(cycle)
    return cycles


def _layer(module: str) -> Optional[int]:
    parts = module.split(".")
    if len(parts) < 2:
        return None
    for rank, (_, names) in enumerate(LAYERS):
        if parts[1] in names:
            return rank
    raise AssertionError(f"{module} is in no layer: add {parts[1]!r} to LAYERS in {__file__}")


# ---- what `import leanformer` loads ----

def _fresh_python(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=str(PACKAGE.parent)).stdout


def test_import_leanformer_loads_ops_and_nn_only():
    loaded = json.loads(_fresh_python(
        "import json, sys, leanformer\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('leanformer'))))"))
    assert {"leanformer._extension", "leanformer.ops", "leanformer.nn"} <= set(loaded)
    unwanted = ("lab", "models", "decoding", "layers", "compress", "fold", "convert", "analysis", "training", "cli")
    extra = [m for m in loaded if m.split(".")[1:2] and m.split(".")[1] in unwanted]
    assert not extra, f"`import leanformer` loaded {extra}: they must load on first use"


def test_the_rest_of_the_library_loads_on_first_use():
    out = json.loads(_fresh_python(
        "import json, sys, leanformer\n"
        "before = 'leanformer.models' in sys.modules\n"
        "models = leanformer.models\n"
        "from leanformer import fold_batchnorm, generate\n"
        "print(json.dumps({'before': before, 'after': 'leanformer.models' in sys.modules,\n"
        "                  'models': models.__name__, 'fold_batchnorm': fold_batchnorm.__module__,\n"
        "                  'generate': generate.__module__, 'dir': dir(leanformer), 'all': leanformer.__all__,\n"
        "                  'lab': 'leanformer.lab' in sys.modules}))"))
    assert not out["before"] and out["after"] and out["models"] == "leanformer.models"
    assert out["fold_batchnorm"] == "leanformer.fold" and out["generate"].startswith("leanformer.decoding")
    assert not out["lab"]
    for name in ("models", "decoding", "layers", "compress", "sparse", "reference", "convert", "analysis",
                 "fold_batchnorm", "generate", "nn", "ops", "__version__"):
        assert name in out["all"] and name in out["dir"], name


def test_every_public_name_resolves():
    for name in leanformer.__all__:
        assert getattr(leanformer, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        leanformer.nope  # noqa: B018


# ---- the import graph ----

def test_the_import_graph_was_read():
    """The walk sees the package (a check that reads nothing passes by accident)."""
    graph = _graph()
    assert "leanformer.ops" in MODULES and "leanformer.nn.mlp" in MODULES
    assert "leanformer.ops.linear_attention" in graph["leanformer.nn.linear_attention"]
    assert "leanformer.ops" in graph["leanformer.nn.linear_attention"]  # the package's __init__ runs first


def test_no_import_cycles():
    graph = _graph()
    cycles = _cycles(graph)
    report = []
    for cycle in cycles:
        steps = [f"    {a} -> {b}  ({graph[a][b].where()}{', in a function' if graph[a][b].in_function else ''})"
                 for a, b in zip(cycle, cycle[1:])]
        report.append(f"  {' -> '.join(cycle)}\n" + "\n".join(steps))
    assert not cycles, f"{len(cycles)} import cycle(s):\n" + "\n".join(report)


def test_imports_go_down_the_layers():
    violations = []
    for imp in IMPORTS:
        if imp.target not in MODULES and imp.target not in COMPILED:
            continue
        own, theirs = _layer(imp.importer), _layer(imp.target)
        if own is not None and theirs is not None and theirs > own:
            violations.append(f"  {imp.where()}: {imp.importer} ({LAYERS[own][0]}) imports {imp.target} "
                              f"({LAYERS[theirs][0]})")
    assert not violations, f"{len(violations)} import(s) of a higher layer:\n" + "\n".join(violations)


def test_the_library_never_imports_the_applications():
    """Stated on its own because it is the rule the layers exist for: nothing outside lab/ and
    the CLI imports leanformer.lab."""
    offenders = [f"  {imp.where()}: {imp.importer} imports {imp.target}" for imp in IMPORTS
                 if imp.target.startswith("leanformer.lab")
                 and not imp.importer.startswith(("leanformer.lab", "leanformer.cli"))]
    assert not offenders, "the library imports leanformer.lab:\n" + "\n".join(offenders)


def _allowed(imp: Import) -> Optional[Tuple[str, str]]:
    for module, imported in ALLOWED_IN_FUNCTIONS:
        if imp.importer == module and (imp.target == imported or imp.target.startswith(imported + ".")):
            return module, imported
    return None


def test_imports_inside_functions_are_allow_listed():
    found = [f"  {imp.where()}: {imp.importer} imports {imp.target}" for imp in IMPORTS
             if imp.in_function and _allowed(imp) is None]
    assert not found, (f"{len(found)} import(s) inside functions: move them to the top of the module, or add "
                       f"them to ALLOWED_IN_FUNCTIONS with the reason (an optional dependency):\n" + "\n".join(found))


def test_the_allow_list_has_no_stale_entries():
    used = {_allowed(imp) for imp in IMPORTS if imp.in_function}
    stale = [f"  {key}: {why}" for key, why in ALLOWED_IN_FUNCTIONS.items() if key not in used]
    assert not stale, "ALLOWED_IN_FUNCTIONS entries that match no import any more:\n" + "\n".join(stale)
