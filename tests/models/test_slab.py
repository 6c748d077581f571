"""SLABViT and SLABLM: shapes, incremental decoding, folding, save/load."""
import copy
import json

import pytest
import torch
from torch import nn

from leanformer import fold_batchnorm
from leanformer.models import LMConfig, SLABLM, SLABViT, ViTConfig, load_pretrained, save_pretrained
from leanformer.nn import PRepBN, RepBN

VIT = ViTConfig.tiny(image_size=16, patch_size=4, in_chans=1, num_classes=10, dim=48, depth=2,
                     dwc_kernel_size=3, prepbn_steps=3)
LM = LMConfig(dim=48, depth=2, num_heads=3, prepbn_steps=3)


def trained(model, make_batch, steps=5):
    """A few SGD steps, so the norms have running statistics and gamma has decayed."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    for _ in range(steps):
        out = model(make_batch())
        loss = out.float().pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def images(B=6):
    return torch.randn(B, 1, 16, 16)


def tokens(B=3, T=21):
    return torch.randint(0, 256, (B, T))


def norms_left(model):
    return [n for n, m in model.named_modules() if isinstance(m, (RepBN, PRepBN, nn.LayerNorm))]


@pytest.mark.parametrize("config", [VIT, VIT.twin()])
def test_vit_shapes_and_twin_sizes(config):
    model = SLABViT(config)
    assert model(images()).shape == (6, 10)
    with pytest.raises(ValueError, match=r"images must be \[B, 1, 16, 16\]"):
        model(torch.randn(2, 3, 16, 16))


def test_twins_have_the_same_sizes():
    for cfg, cls in ((VIT, SLABViT), (LM, SLABLM)):
        slab, twin = cls(cfg), cls(cfg.twin())
        shapes = lambda m: {n: tuple(p.shape) for n, p in m.named_parameters() if "attn" not in n and "norm" not in n}
        assert shapes(slab) == shapes(twin)
        # The only extra parameters of SLAB: the DWC and the norms' BN half.
        extra = sum(p.numel() for p in slab.parameters()) - sum(p.numel() for p in twin.parameters())
        assert 0 < extra < 0.05 * sum(p.numel() for p in twin.parameters())


def test_vit_fold_gives_equal_predictions():
    model = trained(SLABViT(VIT), images)
    assert model.blocks[0].norm1.gamma() == 0.0
    folded = fold_batchnorm(model)
    assert norms_left(folded) == []
    x = images(8)
    torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=1e-5)
    assert fold_batchnorm(SLABViT(VIT.twin()).eval()) is not None  # nothing to fold: no error


def test_lm_prefill_then_steps_equals_full_forward():
    model = trained(SLABLM(LM), tokens)
    ids = tokens(2, 19)
    full = model(ids)
    cache = model.new_cache()
    parts = [model(ids[:, :11], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(11, 19)]
    assert cache.length == 19
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-4, rtol=1e-4)


def test_lm_fold_unties_the_head_and_keeps_the_embedding():
    model = trained(SLABLM(LM), tokens)
    embed = model.embed.weight.detach().clone()
    folded = fold_batchnorm(model)
    assert norms_left(folded) == []
    assert folded.lm_head.weight is not folded.embed.weight
    torch.testing.assert_close(folded.embed.weight, embed, atol=0, rtol=0)
    ids = tokens()
    torch.testing.assert_close(folded(ids), model(ids), atol=1e-5, rtol=1e-5)


def test_lm_twin_forward_and_no_cache():
    twin = SLABLM(LM.twin())
    assert twin(tokens()).shape == (3, 21, 256)
    with pytest.raises(ValueError, match="needs attention='sla'"):
        twin.new_cache()


def test_lm_causal_and_mask_keeps_padding_out_of_the_statistics():
    model = SLABLM(LM).train()
    ids = tokens(2, 10)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 6:] = False
    padded = ids.clone()
    padded[1, 6:] = 0
    twin_state = copy.deepcopy(model)  # each training forward advances PRepBN's step
    a = model(ids, mask=mask)
    b = twin_state(padded, mask=mask)
    # Padding tokens change neither the statistics nor (causally) the real tokens' logits.
    torch.testing.assert_close(a[0], b[0])
    torch.testing.assert_close(a[1, :6], b[1, :6])


@pytest.mark.parametrize("cls,config,batch", [(SLABViT, VIT, images), (SLABLM, LM, tokens)])
def test_save_load_round_trip_keeps_the_gamma_schedule(tmp_path, cls, config, batch):
    model = trained(cls(config), batch, steps=2)
    save_pretrained(model, tmp_path)
    loaded = load_pretrained(tmp_path)
    x = batch()
    torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)
    assert loaded.blocks[0].norm1.step.item() == 2
    assert loaded.blocks[0].norm1.gamma() == model.blocks[0].norm1.gamma() == pytest.approx(1 / 3)
    if cls is SLABLM:
        assert loaded.lm_head.weight is loaded.embed.weight


def test_load_errors_name_the_key(tmp_path):
    from safetensors.torch import load_file, save_file

    model = SLABLM(LM)
    save_pretrained(model, tmp_path)
    weights = tmp_path / "model.safetensors"
    state = load_file(weights)
    del state["blocks.1.mlp.fc2.bias"]
    save_file(state, weights)
    with pytest.raises(ValueError, match="missing key 'blocks.1.mlp.fc2.bias'"):
        load_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    save_pretrained(model, tmp_path)
    cfg["config"]["dim"] = 24
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"'embed.weight' has shape \(256, 48\) in the checkpoint, \(256, 24\)"):
        load_pretrained(tmp_path)
    cfg["config"] = {"dims": 3}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"unknown config field\(s\) \['dims'\]"):
        load_pretrained(tmp_path)


def test_folded_vit_compiles_fullgraph():
    folded = fold_batchnorm(trained(SLABViT(VIT), images, steps=1))
    x = images(3)
    compiled = torch.compile(folded, fullgraph=True)
    torch.testing.assert_close(compiled(x), folded(x), atol=1e-5, rtol=1e-5)
