"""leanformer.lab.results, the one writer of result files: what a result names (commit, machine)
and where it goes (one file per result and machine class, replaced by the next run)."""
import json
import os
import subprocess

import pytest
import torch

from leanformer import _C
from leanformer.lab import results


def test_commit_names_the_checkout_and_whether_it_was_dirty():
    here = os.path.dirname(os.path.abspath(results.__file__))
    try:
        head = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    assert results.commit() == head + ("+dirty" if dirty else "")


def test_a_result_names_the_commit_the_run_started_on(tmp_path, monkeypatch):
    monkeypatch.setattr(results, "STARTED_ON", "aaaaaaa")
    monkeypatch.setattr(results, "commit", lambda: "aaaaaaa")
    out = json.loads(open(results.write_json(str(tmp_path / "same"), {"x": 1})).read())
    assert out["commit"] == "aaaaaaa" and "commit_at_write" not in out and out["x"] == 1
    assert out["torch"] == torch.__version__
    monkeypatch.setattr(results, "commit", lambda: "bbbbbbb+dirty")  # committed or edited while it ran
    out = json.loads(open(results.write_json(str(tmp_path / "moved"), {"x": 1})).read())
    assert out["commit"] == "aaaaaaa" and out["commit_at_write"] == "bbbbbbb+dirty"


def test_machine_describes_the_host():
    info = results.machine()
    assert set(info) == {"platform", "cpu", "cpu_count", "torch_threads", "python", "device", "cpu_vector_isa"}
    assert info["device"] == "cpu" and info["cpu_count"] == os.cpu_count() and info["cpu"]
    assert info["torch_threads"] == torch.get_num_threads() and info["cpu_vector_isa"] == _C.cpu_vector_isa()
    if torch.cuda.is_available():
        gpu = results.machine("cuda")
        assert gpu["gpu"] == torch.cuda.get_device_name() and gpu["device"] == "cuda"


@pytest.mark.parametrize("info, expected", [
    ({"cpu_vector_isa": "avx512"}, "cpu-avx512"),
    ({"cpu_vector_isa": "avx2"}, "cpu-avx2"),
    ({"cpu_vector_isa": "portable"}, "cpu-portable"),
    ({"cpu_vector_isa": "avx2", "gpu": "NVIDIA H100 80GB HBM3"}, "cuda-nvidia-h100-80gb-hbm3"),
])
def test_machine_class(info, expected):
    assert results.machine_class(info) == expected


def test_a_result_is_named_by_its_kind_and_machine_class_and_replaced_by_the_next_run(tmp_path):
    klass = results.machine_class(results.machine())
    stem = results.stem(str(tmp_path), "train-x")
    assert stem == str(tmp_path / f"train-x-{klass}")
    for run in (1, 2):
        results.write(stem, {"run": run}, {"a": [{"step": 1, "time_s": 0.1, "loss": 2.0},
                                                 {"step": 2, "time_s": 0.2, "loss": 1.0}]}, "loss", "loss")
    assert [p.name for p in tmp_path.glob("*.json")] == [f"train-x-{klass}.json"]
    report = json.loads((tmp_path / f"train-x-{klass}.json").read_text())
    assert report["summary"] == {"run": 2} and report["machine"]["cpu_vector_isa"] == _C.cpu_vector_isa()


def test_the_plots(tmp_path):
    pytest.importorskip("matplotlib")
    stem = str(tmp_path / "r")
    assert results.lines(stem + "-lines", {"a": ([1, 2], [3, 4])}, "x", "y") == stem + "-lines.png"
    table = {1: {32: {"m": 0.5}, 64: {"m": 0.9}}, 2: {32: {"m": 0.7}, 64: {"m": 1.0}}}
    heat = results.heatmaps(stem + "-heat", {"before": table, "after": table}, [("m", "metric")])
    assert heat == stem + "-heat.png"
    rows = [{"op": "op", "mode": "fwd", "shape": "s", "baseline": "eager", "speedup": 2.0, "target": 1.5, "met": True},
            {"op": "op", "mode": "bwd", "shape": "s", "baseline": "eager", "speedup": None, "target": None,
             "met": None}]
    assert results.ratios(stem + "-ratios", rows, title="t") == stem + "-ratios.png"
    for suffix in ("lines", "heat", "ratios"):
        assert os.path.getsize(f"{stem}-{suffix}.png") > 0
