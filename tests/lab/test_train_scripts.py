"""The training scripts run end to end on the real data (a few steps), write their results,
and the folded SLAB models predict what the unfolded ones do."""
import json
import os
import subprocess
import sys

import pytest

from leanformer.cli import main as cli
from leanformer.lab.results import stem


def only_json(folder, name):
    """The one result in ``folder``: ``name-<machine class>.json``."""
    files = list(folder.glob("*.json"))
    assert [f.name for f in files] == [os.path.basename(stem(str(folder), name)) + ".json"], files
    return json.loads(files[0].read_text())


def test_vit_digits(tmp_path):
    pytest.importorskip("sklearn", reason="the digits come from scikit-learn (a test dependency)")
    assert cli(["train", "vit-digits", "--steps", "6", "--batch", "32", "--out", str(tmp_path),
                "--save", str(tmp_path / "model")]) == 0
    report = only_json(tmp_path, "train-vit-digits")
    s = report["summary"]
    assert s["train_images"] + s["test_images"] == 1797
    assert s["fold"]["same_predictions"] == s["fold"]["of"] == s["test_images"]
    assert s["fold"]["max_abs_logit_diff"] < 1e-4
    assert set(report["curves"]) == {"SLAB (SLA + PRepBN)", "twin (softmax + LayerNorm)"}
    assert (tmp_path / "model" / "model.safetensors").exists()


def test_lm_text(tmp_path):
    assert cli(["train", "lm-text", "--steps", "3", "--batch", "4", "--length", "32", "--eval-windows", "4",
                "--out", str(tmp_path)]) == 0
    s = only_json(tmp_path, "train-lm-text")["summary"]
    assert s["train_bytes"] > 300_000 and s["val_bytes"] > 10_000
    assert s["fold"]["max_abs_logit_diff"] < 1e-4
    assert s["incremental_vs_full_max_abs_logit_diff"] < 1e-4
    for name, final in s["final"].items():
        assert 1 < final["val_ppl"] < 400, (name, final)


def test_unknown_trainer_is_refused(capsys):
    assert cli(["train", "nope"]) == 2
    assert "usage: leanformer train" in capsys.readouterr().err


@pytest.mark.parametrize("module", ["vit_digits", "predictor_lm"])
def test_each_script_runs_as_a_module_from_any_folder(tmp_path, module):
    """``python -m leanformer.lab.train.NAME`` works from outside the source checkout."""
    proc = subprocess.run([sys.executable, "-m", f"leanformer.lab.train.{module}", "--help"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--out" in proc.stdout
