"""The suite's pytest plugin: options, the (case, implementation, round) tests, and the ratio
of each baseline to leanformer beside its target, printed at the end of the run and stored in
the JSON.

A test function marked ``@pytest.mark.bench_cases(cases)`` becomes one pytest-benchmark test
per case, implementation and round, ordered so that within a round leanformer and the case's
baselines run one after another, and the rounds follow each other: a host whose speed drifts
(a third within seconds on a shared 2-core VM) then slows both sides of a ratio alike. All of a
case's tests share one pytest-benchmark group (op, shape and pass).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import time
from typing import Dict, List, Optional

import pytest
import torch

from bench.case import Case
from bench.ratios import format_table, ratio_rows

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_STORAGE = "file://./.benchmarks"


@dataclasses.dataclass(frozen=True)
class Settings:
    device: str
    dtype: torch.dtype
    quick: bool
    rounds: int
    run_time: float  # seconds per implementation of a case, all rounds together
    results_dir: Optional[str]
    load_at_start: float  # the host's 1-minute load average when the run began


SETTINGS = pytest.StashKey[Settings]()
CASES = pytest.StashKey[Dict[tuple, Case]]()
RECORDS = pytest.StashKey[List[dict]]()
WRITTEN = pytest.StashKey[List[str]]()


def pytest_addoption(parser):
    g = parser.getgroup("leanformer", "leanformer benchmark suite")
    g.addoption("--device", default=None, help="cpu or cuda (default: cuda when available)")
    g.addoption("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    g.addoption("--quick", action="store_true", help="tiny shapes and short timings (a smoke test)")
    g.addoption("--rounds", type=int, default=3,
                help="rounds in which each case's implementations take turns (default 3)")
    g.addoption("--run-time", type=float, default=None,
                help="seconds per implementation of a case, all rounds together (default 1.0, 0.05 with --quick)")
    g.addoption("--results-dir", default=None,
                help="write <family>-<machine class>.json and .png there for each family run")


def pytest_configure(config):
    if importlib.util.find_spec("pytest_benchmark") is None:
        raise pytest.UsageError('the benchmark suite needs pytest-benchmark: pip install "leanformer[bench]"')
    config.addinivalue_line("markers", "bench_cases(builder, devices=None): time every implementation of "
                                       "each case builder(device, dtype, quick) returns, in alternating rounds")
    # pytest-benchmark's --benchmark-save/--benchmark-autosave storage: the checkout's
    # .benchmarks/ (git-ignored) wherever pytest runs from, so --benchmark-compare finds it.
    if config.getoption("benchmark_storage") == DEFAULT_STORAGE:
        config.option.benchmark_storage = "file://" + os.path.join(REPO, ".benchmarks")
    device = config.getoption("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, config.getoption("dtype") or ("float32" if device == "cpu" else "bfloat16"))
    quick = config.getoption("quick")
    rounds = config.getoption("rounds")
    if rounds < 1:
        raise pytest.UsageError("--rounds must be at least 1")
    run_time = config.getoption("run_time") or (0.05 if quick else 1.0)
    config.stash[SETTINGS] = Settings(device, dtype, quick, rounds, run_time, config.getoption("results_dir"),
                                      _load())
    config.stash[CASES] = {}
    config.stash[RECORDS] = []


def _load() -> float:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:  # not on this platform
        return -1.0


def pytest_report_header(config):
    s = config.stash[SETTINGS]
    return (f"leanformer bench: device {s.device}, {str(s.dtype).removeprefix('torch.')}, {s.rounds} rounds, "
            f"{s.run_time:g} s per implementation{', quick' if s.quick else ''}, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads)")


def family_of(module_name: str) -> str:
    """``bench.bench_topk_mlp`` -> ``topk_mlp``."""
    return module_name.rsplit(".", 1)[-1].removeprefix("bench_")


def pytest_generate_tests(metafunc):
    marker = metafunc.definition.get_closest_marker("bench_cases")
    if marker is None:
        return
    s = metafunc.config.stash[SETTINGS]
    builder, devices = marker.args[0], marker.kwargs.get("devices")
    argnames = ("case", "impl", "bench_round")
    if devices and s.device not in devices:
        reason = f"{'/'.join(devices)}-only cases: run with --device {devices[0]} on a machine that has one"
        metafunc.parametrize(argnames, [pytest.param("-", "-", 0, id="skipped", marks=pytest.mark.skip(reason=reason))],
                             indirect=["case"])
        return
    cases = builder(s.device, s.dtype, quick=s.quick)
    if not cases:
        reason = f"no cases on {s.device} in {str(s.dtype).removeprefix('torch.')}"
        metafunc.parametrize(argnames, [pytest.param("-", "-", 0, id="skipped", marks=pytest.mark.skip(reason=reason))],
                             indirect=["case"])
        return
    ids = [case.id for case in cases]
    assert len(set(ids)) == len(ids), f"cases with the same id: {sorted(i for i in ids if ids.count(i) > 1)}"
    registry = metafunc.config.stash[CASES]
    params = []
    for case in cases:
        registry[(metafunc.module.__name__, metafunc.function.__name__, case.id)] = case
        # The order of the tests is the order they run in: round by round, and within a round
        # leanformer then each baseline.
        for r in range(s.rounds):
            params += [pytest.param(case.id, impl, r, id=f"{case.id}-{impl}-r{r}") for impl in case.impls]
    metafunc.parametrize(argnames, params, indirect=["case"])


@pytest.fixture
def case(request) -> Case:
    """The Case a test's ``case`` id names (the test ids and the JSON hold the id)."""
    return request.config.stash[CASES][(request.module.__name__, request.function.__name__, request.param)]


def _cuda_timer() -> float:
    """pytest-benchmark's clock on a GPU: a block of calls is timed once its kernels finished."""
    torch.cuda.synchronize()
    return time.perf_counter()


def pytest_collection_modifyitems(config, items):
    """Each test's time budget: the case's run time split over the rounds, in blocks of at
    least a tenth of it (about ten blocks per round), the clock synchronized on a GPU."""
    s = config.stash[SETTINGS]
    for item in items:
        callspec = getattr(item, "callspec", None)
        if item.get_closest_marker("bench_cases") is None or callspec is None or callspec.params["case"] == "-":
            continue
        case = config.stash[CASES][(item.module.__name__, item.originalname, callspec.params["case"])]
        per_round = max(s.run_time, case.min_run_time or 0.0) / s.rounds
        options = {"max_time": per_round, "min_time": per_round / 10, "min_rounds": 1}
        if s.device.startswith("cuda"):
            options["timer"] = _cuda_timer
        item.add_marker(pytest.mark.benchmark(**options))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when != "call" or item.get_closest_marker("bench_cases") is None:
        return
    case: Case = item.funcargs["case"]
    fixture = item.funcargs.get("benchmark")
    meta = getattr(fixture, "stats", None)
    ran = meta is not None and bool(meta) and not fixture.has_error and report.passed
    error = None
    if report.skipped:
        error = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        error = error.removeprefix("Skipped: ")
    elif report.failed:
        error = f"{call.excinfo.typename}: {call.excinfo.value}"[:300] if call.excinfo else "failed"
    item.config.stash[RECORDS].append({
        "family": family_of(item.module.__name__), "op": case.op, "shape": case.shape, "mode": case.mode,
        "impl": item.callspec.params["impl"], "round": item.callspec.params["bench_round"],
        "median_s": meta.stats.median if ran else None, "error": error, "targets": dict(case.targets),
        "meta": meta if ran else None,
    })


def run_info(config) -> dict:
    """What the JSON records beside the numbers: the machine (CPU, cores, torch threads, vector
    ISA, GPU), its class, torch, the commit, the suite's settings and the host's load average
    at the start and end of the run (other work on the cores slows multi-threaded calls)."""
    from leanformer.lab.results import commit, machine, machine_class

    s = config.stash[SETTINGS]
    info = machine(s.device)
    return {"machine": info, "machine_class": machine_class(info), "torch": torch.__version__,
            "cuda": torch.version.cuda, "commit": commit(), "device": s.device,
            "dtype": str(s.dtype).removeprefix("torch."), "quick": s.quick, "rounds": s.rounds,
            "run_time_s": s.run_time, "load_average": [s.load_at_start, _load()]}


def _rows(config, family: Optional[str] = None) -> List[dict]:
    records = [r for r in config.stash[RECORDS] if family is None or r["family"] == family]
    return ratio_rows(records)


def pytest_benchmark_update_machine_info(config, machine_info):
    from leanformer.lab.results import machine, machine_class

    info = machine(config.stash[SETTINGS].device)
    machine_info["leanformer"] = {"machine_class": machine_class(info), "cpu_vector_isa": info["cpu_vector_isa"],
                                  "gpu": info.get("gpu"), "torch": torch.__version__,
                                  "torch_threads": info["torch_threads"]}


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """--benchmark-json (and --benchmark-save) files: the machine, torch, commit and ratios."""
    output_json["leanformer"] = {**run_info(config), "ratios": _rows(config)}


# The committed files keep pytest-benchmark's format with the statistics a reader compares.
STATS = ("min", "max", "mean", "stddev", "median", "iqr", "ops", "rounds", "iterations")


def _slim(bench: dict) -> dict:
    return {"group": bench["group"], "name": bench["name"], "params": bench["params"],
            "stats": {k: bench["stats"][k] for k in STATS}}


def pytest_sessionfinish(session):
    """--results-dir: one ``<family>-<machine class>.json`` (pytest-benchmark's format plus the
    ``leanformer`` section) and ``.png`` (the ratios) per family that ran."""
    config = session.config
    out = config.stash[SETTINGS].results_dir if SETTINGS in config.stash else None
    if not out:
        return
    from leanformer.lab import results

    records = config.stash[RECORDS]
    info = run_info(config)
    machine_info = config.hook.pytest_benchmark_generate_machine_info(config=config)
    config.hook.pytest_benchmark_update_machine_info(config=config, machine_info=machine_info)
    commit_info = config.hook.pytest_benchmark_generate_commit_info(config=config)
    written = config.stash.setdefault(WRITTEN, [])
    for family in dict.fromkeys(r["family"] for r in records):
        metas = [r["meta"] for r in records if r["family"] == family and r["meta"] is not None]
        rows = _rows(config, family)
        if not metas:
            continue
        data = config.hook.pytest_benchmark_generate_json(config=config, benchmarks=metas, include_data=False,
                                                          machine_info=machine_info, commit_info=commit_info)
        data["benchmarks"] = [_slim(b) for b in data["benchmarks"]]
        data["leanformer"] = {**info, "family": family, "ratios": rows}
        stem = os.path.join(out, f"{family}{'-quick' if info['quick'] else ''}-{info['machine_class']}")
        written.append(results.write_json(stem, data, device=info["device"]))
        m = info["machine"]
        png = results.ratios(stem, rows, title=f"{family} · {m.get('gpu') or m['cpu']} ({m['cpu_vector_isa']}, "
                                               f"{m['cpu_count']} cores) · torch {info['torch']} · {info['commit']}")
        if png:
            written.append(png)


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, config):
    """The ratio table, after pytest-benchmark's own tables."""
    if SETTINGS not in config.stash or not config.stash[RECORDS]:
        return
    info = run_info(config)
    m = info["machine"]
    tr = terminalreporter
    tr.section("leanformer: speed-up over each baseline (median of the rounds, their range)")
    tr.write_line(f"{m.get('gpu') or m['cpu']} · {m['cpu_count']} cores, {m['torch_threads']} torch threads "
                  f"({m['cpu_vector_isa']}) · torch {info['torch']} · commit {info['commit']} · {info['dtype']}"
                  f" · {info['rounds']} rounds · load {info['load_average'][0]:g} -> {info['load_average'][1]:g}")
    # The load at the end counts the suite's own threads; only the load before it started tells of
    # other work on the host.
    if info["load_average"][0] > 0.5 * m["cpu_count"]:
        tr.write_line("the host was busy when the run started (1-minute load average above): multi-threaded "
                      "calls may wait for a core, so their times and ratios measure that too", yellow=True)
    for line in format_table(_rows(config)).splitlines():
        tr.write_line(line)
    for path in config.stash.get(WRITTEN, []):
        tr.write_line(f"wrote {path}")
