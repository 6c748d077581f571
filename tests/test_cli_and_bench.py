"""The `leanformer` command and the benchmark suite's machinery (on tiny shapes)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from leanformer import _extension
from leanformer.cli import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_info_lists_ops_and_backends(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"torch {torch.__version__}" in out
    for op in ("sla_forward", "sla_backward", "sla_step"):
        assert f"leanformer::{op}" in out
    assert "CPU" in out
    config = _extension.build_config()
    assert config["torch"] == torch.__version__
    if config["cuda_kernels"]:
        assert "CUDA kernels: yes" in out
        assert torch._C._dispatch_has_kernel_for_dispatch_key("leanformer::sla_forward", "CUDA")


def test_console_script_is_installed(tmp_path):
    """`leanformer` is the installed package's entry point, and the CLI runs from any folder (here
    one outside the source checkout)."""
    from importlib.metadata import entry_points

    scripts = {e.name: e.value for e in entry_points(group="console_scripts")}
    assert scripts.get("leanformer") == "leanformer.cli:main"
    out = subprocess.run([sys.executable, "-m", "leanformer.cli", "info"], capture_output=True,
                         text=True, check=True, cwd=tmp_path).stdout
    assert "leanformer::sla_forward" in out


def test_info_loads_the_library_but_no_application():
    """`leanformer info` imports no training script or experiment (each command imports its own)."""
    code = ("import sys, contextlib, io\n"
            "from leanformer.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    assert main(['info']) == 0\n"
            "print(sorted(m for m in sys.modules if m.startswith('leanformer.lab')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --- the benchmark suite (bench/): pytest-benchmark tests, their plugin, results and report ---

def _run(args, **kwargs):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO, **kwargs)


def test_bench_quick_one_family_through_the_cli(tmp_path):
    """`leanformer bench` runs pytest on the checkout's bench/: the ratio table, then
    <family>-quick-<machine class>.json (pytest-benchmark's JSON plus the machine, torch, ISA,
    commit and ratios) and .png."""
    from leanformer.lab.results import machine, machine_class

    proc = _run(["-m", "leanformer.cli", "bench", "--quick", "--device", "cpu", "--suite", "rep_batchnorm",
                 "--rounds", "2", "--out", str(tmp_path)], timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "speed-up over each baseline" in proc.stdout and "progressive_norm" in proc.stdout
    stem = tmp_path / f"rep_batchnorm-quick-{machine_class(machine('cpu'))}"
    report = json.loads(stem.with_suffix(".json").read_text())
    assert stem.with_suffix(".png").is_file()
    section = report["leanformer"]
    assert section["family"] == "rep_batchnorm" and section["quick"] and section["rounds"] == 2
    assert section["torch"] == torch.__version__ and section["commit"]
    assert section["machine"]["cpu_count"] == os.cpu_count() and section["machine"]["cpu_vector_isa"]
    assert {(r["op"], r["mode"]) for r in section["ratios"]} == {
        (op, mode) for op in ("rep_batchnorm", "progressive_norm") for mode in ("fwd", "fwd+bwd")}
    for row in section["ratios"]:
        assert len(row["round_speedups"]) == 2
        assert row["speedup_min"] <= row["speedup"] <= row["speedup_max"]
    benchmarks = report["benchmarks"]
    assert len(benchmarks) == 4 * 2 * 2  # cases x implementations x rounds
    assert all(b["stats"]["median"] > 0 for b in benchmarks)


TOY = '''
import time

import pytest

from bench.case import Case, bench_cases, time_case


def broken():
    raise RuntimeError("no kernel for this")


def cases(device, dtype, quick=False):
    return [Case("toy", "n=1", "fwd", lambda: time.sleep(0.0002),
                 {"slower": lambda: time.sleep(0.002), "broken": broken}, {"slower": 2.0, "broken": 1.0})]


@bench_cases(cases)
def test_toy(benchmark, case, impl, bench_round):
    time_case(benchmark, case, impl, bench_round)


@bench_cases(cases, devices=("cuda",))
def test_toy_cuda(benchmark, case, impl, bench_round):
    time_case(benchmark, case, impl, bench_round)
'''


def test_bench_plugin_alternates_rounds_and_reports_ratios(tmp_path):
    """Through pytest with the suite's plugin: leanformer and its baselines take turns round by
    round in one pytest-benchmark group; the ratio table gives each baseline's median ratio, the
    range over the rounds and the target; a baseline that raises is skipped and reported; a
    CUDA-only test skips with its reason on the CPU."""
    (tmp_path / "bench_toy.py").write_text(TOY)
    out = tmp_path / "toy.json"
    proc = _run(["-m", "pytest", str(tmp_path / "bench_toy.py"), "-c", os.path.join("bench", "pytest.ini"),
                 "-p", "bench.conftest", "--benchmark-only", "--device", "cpu", "--rounds", "3",
                 "--run-time", "0.06", f"--benchmark-json={out}", "-rs", "-p", "no:cacheprovider"], timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    order = [(b["params"]["impl"], b["params"]["bench_round"]) for b in report["benchmarks"]]
    assert order == [(impl, r) for r in range(3) for impl in ("leanformer", "slower")]
    assert {b["group"] for b in report["benchmarks"]} == {"toy n=1 fwd"}
    (slower, broken) = report["leanformer"]["ratios"]
    assert slower["baseline"] == "slower" and len(slower["round_speedups"]) == 3
    assert 2.0 < slower["speedup_min"] <= slower["speedup"] <= slower["speedup_max"]
    assert slower["target"] == 2.0 and slower["met"] is True
    assert broken["speedup"] is None and "RuntimeError: no kernel for this" in broken["error"]
    assert report["leanformer"]["machine"]["cpu_vector_isa"] and report["leanformer"]["commit"]
    assert report["machine_info"]["leanformer"]["machine_class"] == report["leanformer"]["machine_class"]
    table = proc.stdout[proc.stdout.index("speed-up over each baseline"):]
    assert "slower" in table and ">= 2x met" in table and "errors:" in table
    assert "cuda-only cases: run with --device cuda" in proc.stdout


def test_ratio_rows_take_the_median_of_per_round_ratios():
    from bench.ratios import format_table, ratio_rows

    def record(impl, r, seconds, error=None):
        return {"family": "f", "op": "op", "shape": "s", "mode": "fwd", "impl": impl, "round": r,
                "median_s": seconds, "error": error, "targets": {"base": 3.0}}

    # The host slows down in round 1: per-round ratios 2, 2.5 and 4 (median 2.5), not the
    # ratio of the medians (2 / 0.5 = 4).
    records = [record("leanformer", 0, 1.0), record("base", 0, 2.0), record("leanformer", 1, 4.0),
               record("base", 1, 10.0), record("leanformer", 2, 0.5), record("base", 2, 2.0)]
    (row,) = ratio_rows(records)
    assert row["speedup"] == pytest.approx(2.5) and row["round_speedups"] == pytest.approx([2.0, 2.5, 4.0])
    assert (row["speedup_min"], row["speedup_max"]) == pytest.approx((2.0, 4.0))
    assert row["met"] is False and row["leanformer_ms"] == pytest.approx(1000.0)
    assert "2.50x" in format_table([row]) and ">= 3x BELOW" in format_table([row])


def test_results_keep_the_latest_per_kind_and_machine_class():
    """bench/results/ holds <kind>-<machine class>.json/.png/.txt, no time-stamped runs; a
    suite's file is named by its family and the machine class it records."""
    import re

    folder = os.path.join(REPO, "bench", "results")
    pattern = re.compile(r"^[a-z0-9_-]+?-(cpu-(avx512|avx2|portable)|cuda-[a-z0-9-]+)\.(json|png|txt)$")
    names = sorted(n for n in os.listdir(folder) if "-quick-" not in n)  # smoke runs, git-ignored
    assert names and all(pattern.match(n) for n in names), [n for n in names if not pattern.match(n)]
    suites = 0
    for name in names:
        if name.endswith(".json"):
            with open(os.path.join(folder, name)) as f:
                section = json.load(f).get("leanformer")
            if isinstance(section, dict) and "ratios" in section:
                suites += 1
                assert name == f"{section['family']}-{section['machine_class']}.json"
                assert not section["quick"] and section["ratios"]
    assert suites > 0


def test_results_page_matches_the_committed_results():
    """docs/results.md is what `python -m bench.report` writes from bench/results/ now."""
    from bench import report

    with open(report.PAGE) as f:
        assert f.read() == report.render(), "docs/results.md is out of date: run `python -m bench.report`"


def test_bench_from_an_installed_package_says_what_it_needs(monkeypatch, tmp_path, capsys):
    import leanformer

    site = tmp_path / "site-packages" / "leanformer"
    monkeypatch.setattr(leanformer, "__file__", str(site / "__init__.py"))
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "--quick"]) == 2
    err = capsys.readouterr().err
    assert "bench/ folder" in err and 'pip install "leanformer[bench]"' in err


def test_loader_names_torch_version_on_mismatch(monkeypatch):
    monkeypatch.setattr(_extension, "build_config", lambda: {"torch": "0.0.1"})
    with pytest.raises(ImportError, match="built against torch 0.0.1, but torch .* is installed"):
        _extension.load()


def test_loader_explains_a_missing_extension(monkeypatch):
    import leanformer

    monkeypatch.setitem(sys.modules, "leanformer._C", None)  # makes `from leanformer import _C` fail
    monkeypatch.delattr(leanformer, "_C")
    with pytest.raises(ImportError, match="could not be loaded .*pip install --no-build-isolation"):
        _extension.load()
