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


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "leanformer.cli", "info"], capture_output=True,
                         text=True, check=True).stdout
    assert "leanformer::sla_forward" in out


def test_bench_quick_writes_table_json_and_plot(tmp_path, capsys):
    assert main(["bench", "--quick", "--device", "cpu", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "speed-up" in out and "sla_causal" in out
    (report_path,) = tmp_path.glob("*.json")
    report = json.loads(report_path.read_text())
    assert report["torch"] == torch.__version__
    assert report["commit"] and report["machine"]["cpu_count"] == os.cpu_count()
    impls = {t["impl"] for t in report["timings"]}
    assert {"leanformer", "eager", "sdpa", "sdpa_causal", "eager_chunked"} <= impls
    assert all(t["median_ms"] and t["median_ms"] > 0 for t in report["timings"]), report["timings"]
    for row in report["speedups"]:
        assert row["speedup"] == pytest.approx(row["baseline_ms"] / row["leanformer_ms"])
    assert list(tmp_path.glob("*.png"))


def test_bench_case_alternates_implementations_and_reports_failures():
    """Ours and the baselines take turns round by round (a drifting host then slows both sides
    of a ratio alike); a baseline that raises is reported, not fatal."""
    sys.path.insert(0, REPO)
    from bench.harness import ROUNDS, Case, run_case

    calls = []

    def impl(name):
        return lambda: calls.append(name)

    def broken():
        raise RuntimeError("no kernel for this")

    case = Case("op", "shape", "fwd", impl("ours"), {"base": impl("base"), "broken": broken})
    timings = {t.impl: t for t in run_case(case, min_run_time=0.03)}
    assert timings["leanformer"].median_ms > 0 and timings["base"].median_ms > 0
    assert timings["leanformer"].runs >= ROUNDS and timings["base"].runs >= ROUNDS
    assert timings["broken"].median_ms is None and "RuntimeError: no kernel for this" in timings["broken"].error
    runs = [name for i, name in enumerate(calls) if i == 0 or calls[i - 1] != name]  # one entry per run of calls
    assert runs[:2] == ["ours", "base"]  # the warm-up calls
    assert runs[2:] == ["ours", "base"] * ROUNDS


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
