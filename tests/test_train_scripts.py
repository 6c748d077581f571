"""The training scripts run end to end on the real data (a few steps), write their results,
and the folded SLAB models predict what the unfolded ones do."""
import json

import pytest

from leanformer.cli import main as cli


def only_json(tmp_path):
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1, files
    return json.loads(files[0].read_text())


def test_vit_digits(tmp_path):
    pytest.importorskip("sklearn", reason="the digits come from scikit-learn (a test dependency)")
    assert cli(["train", "vit-digits", "--steps", "6", "--batch", "32", "--out", str(tmp_path),
                "--save", str(tmp_path / "model")]) == 0
    report = only_json(tmp_path)
    s = report["summary"]
    assert s["train_images"] + s["test_images"] == 1797
    assert s["fold"]["same_predictions"] == s["fold"]["of"] == s["test_images"]
    assert s["fold"]["max_abs_logit_diff"] < 1e-4
    assert set(report["curves"]) == {"SLAB (SLA + PRepBN)", "twin (softmax + LayerNorm)"}
    assert (tmp_path / "model" / "model.safetensors").exists()


def test_lm_text(tmp_path):
    assert cli(["train", "lm-text", "--steps", "3", "--batch", "4", "--length", "32", "--eval-windows", "4",
                "--out", str(tmp_path)]) == 0
    s = only_json(tmp_path)["summary"]
    assert s["train_bytes"] > 300_000 and s["val_bytes"] > 10_000
    assert s["fold"]["max_abs_logit_diff"] < 1e-4
    assert s["incremental_vs_full_max_abs_logit_diff"] < 1e-4
    for name, final in s["final"].items():
        assert 1 < final["val_ppl"] < 400, (name, final)


def test_unknown_trainer_is_refused(capsys):
    assert cli(["train", "nope"]) == 2
    assert "usage: leanformer train" in capsys.readouterr().err


def test_results_name_their_commit_and_whether_the_checkout_was_dirty():
    import os
    import subprocess

    from leanformer.train.report import commit

    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    assert commit() == head + ("+dirty" if dirty else "")


def test_results_name_the_commit_the_run_started_on(tmp_path, monkeypatch):
    from leanformer.train import report

    monkeypatch.setattr(report, "STARTED_ON", "aaaaaaa")
    monkeypatch.setattr(report, "commit", lambda: "aaaaaaa")
    out = json.loads(open(report.write_json(str(tmp_path / "same"), {"x": 1})).read())
    assert out["commit"] == "aaaaaaa" and "commit_at_write" not in out and out["x"] == 1
    monkeypatch.setattr(report, "commit", lambda: "bbbbbbb+dirty")  # committed or edited while it ran
    out = json.loads(open(report.write_json(str(tmp_path / "moved"), {"x": 1})).read())
    assert out["commit"] == "aaaaaaa" and out["commit_at_write"] == "bbbbbbb+dirty"
