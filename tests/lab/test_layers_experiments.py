"""`leanformer layers NAME` runs every analysis end to end on real pydoc text at tiny sizes and
writes its JSON and plot; SoFT's training also runs under torchrun on two gloo ranks."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

import leanformer
from leanformer.cli import main as cli
from leanformer.lab.results import stem

TINY = ["--windows", "3", "--length", "24"]


def only_json(folder, name):
    """The one result in ``folder``: ``layers-NAME-<machine class>.json``, with its plot."""
    files = list(folder.glob("*.json"))
    assert [f.name for f in files] == [os.path.basename(stem(str(folder), f"layers-{name}")) + ".json"], files
    assert files[0].with_suffix(".png").exists() or not _has_matplotlib()
    return json.loads(files[0].read_text())


def _has_matplotlib():
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        return False


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny SoFT run: both models saved, its report read back."""
    root = tmp_path_factory.mktemp("layers")
    assert cli(["layers", "soft", "--steps", "4", "--batch", "2", "--dim", "32", "--depth", "3", *TINY,
                "--save", str(root / "models"), "--out", str(root / "soft")]) == 0
    return root, only_json(root / "soft", "soft")


def test_soft_reports_every_sub_model_of_both_trainings(trained):
    root, r = trained
    assert r["ordinary"]["exits_trained"] == [3] and r["soft"]["exits_trained"] == [1, 2, 3]
    for name in ("ordinary", "soft"):
        assert set(r[name]["val_ppl_per_exit"]) == {"1", "2", "3"}
        assert all(1 < v < 400 for v in r[name]["val_ppl_per_exit"].values())
        assert (root / "models" / name / "model.safetensors").exists()


@pytest.mark.parametrize("name, extra", [
    ("early-exit", ["--prefill", "8", "--speed-tokens", "3"]),
    ("drop", ["--calibration", "2", "--speed-tokens", "3"]),
    ("logit-lens", []),
    ("tuned-lens", ["--steps", "2", "--batch", "2"]),
    ("residual", []),
    ("back-patching", []),
])
def test_each_analysis_runs_and_writes_its_table(trained, tmp_path, name, extra):
    root, _ = trained
    assert cli(["layers", name, "--model", str(root / "models" / "soft"), *TINY, *extra, "--out", str(tmp_path)]) == 0
    r = only_json(tmp_path, name)
    if name == "early-exit":
        rows = r["thresholds"]["cosine"]
        assert rows[-1]["avg_layers"] == 3  # threshold 2: never exits
        assert rows[-1]["val_ppl"] == pytest.approx(r["fixed_exit_val_ppl"]["3"], rel=1e-4)
        assert all(1 <= row["avg_layers"] <= 3 for rs in r["thresholds"].values() for row in rs)
    elif name == "drop":
        assert [row["cache_slots"] for row in r["drop"]["attention"]] == [3, 2, 1]
        assert len(r["importance"]["attention"]) == 3
    elif name in ("logit-lens", "tuned-lens"):
        for table in r["tables"].values():
            assert len(table) == 4 and table[-1]["kl_to_final"] == pytest.approx(0, abs=1e-6)
        assert ("tuned lens" in r["tables"]) == (name == "tuned-lens")
    elif name == "residual":
        assert len(r["contributions"]["attention"]) == 3
    else:
        assert [(row["i"], row["j"]) for row in r["rows"]] == [(0, 0), (1, 2), (1, 3), (2, 3)]


def _tree_kernels():
    return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"leanformer::{op}", "CPU")
               for op in ("tree_linear_attention", "verify_tree_greedy"))


@pytest.mark.skipif(not _tree_kernels(), reason="the tree-decoding ops have no CPU kernel in this build yet")
def test_self_speculative_decoding_is_exactly_greedy_decoding(trained, tmp_path):
    root, _ = trained
    assert cli(["layers", "self-speculative", "--model", str(root / "models" / "soft"), "--windows", "2",
                "--new-tokens", "6", "--out", str(tmp_path)]) == 0
    r = only_json(tmp_path, "self-speculative")
    assert [row["exit_layer"] for row in r["rows"]] == [1, 2]
    for row in r["rows"]:
        assert row["identical_to_plain"] == row["of"] == 2 and 1 <= row["mean_accepted_length"] <= 4


def test_unknown_analysis_is_refused(capsys):
    assert cli(["layers", "nope"]) == 2
    assert "usage: leanformer layers" in capsys.readouterr().err


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo")
@pytest.mark.parametrize("module", ["layers_soft", "layers_lens"])
def test_training_runs_under_torchrun_with_ddp(trained, tmp_path, module):
    env = dict(os.environ)
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(leanformer.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    env["OMP_NUM_THREADS"] = "1"
    args = (["--steps", "2", "--batch", "2", "--dim", "32", "--depth", "2"] if module == "layers_soft" else
            ["--tuned", "--steps", "2", "--batch", "2", "--model", str(trained[0] / "models" / "ordinary")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           "-m", f"leanformer.lab.experiments.{module}", *args, *TINY, "--out", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    if module == "layers_soft":
        r = only_json(tmp_path, "soft")
        assert r["world_size"] == 2 and set(r["soft"]["val_ppl_per_exit"]) == {"1", "2"}
    else:
        r = only_json(tmp_path, "tuned-lens")
        assert r["world_size"] == 2 and len(r["tables"]["tuned lens"]) == 4
