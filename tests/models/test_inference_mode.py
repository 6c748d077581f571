"""Every model runs under ``torch.inference_mode()`` (what serving code wraps decoding in, and
what ``leanformer.generate`` uses) and gives what it gives under ``torch.no_grad()``: full
forwards, incremental decoding with a cache, and the folded (inference) form of SLAB's norms."""
import pytest
import torch

from leanformer.models import (BertConfig, BertEncoder, LlamaConfig, LlamaLM, LMConfig, SLABLM, SLABViT,
                               ViTConfig)


def _both_modes(fn):
    with torch.no_grad():
        ref = fn()
    with torch.inference_mode():
        got = fn()
    return ref, got


def _with_statistics(model, *inputs):
    """One training-mode forward, so RepBN has running statistics to normalize with in eval."""
    model.train()
    with torch.no_grad():
        model(*inputs)
    return model.eval()


def _decode(model, ids, cache):
    steps = [model(ids[:, :5], cache=cache)]
    steps += [model(ids[:, t:t + 1], cache=cache) for t in range(5, ids.shape[1])]
    return torch.cat(steps, 1)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_llama_prefill_and_steps(kv_heads):
    torch.manual_seed(0)
    model = LlamaLM(LlamaConfig(dim=64, depth=2, num_heads=4, num_kv_heads=kv_heads)).eval()
    ids = torch.randint(0, 256, (2, 9))
    ref, got = _both_modes(lambda: _decode(model, ids, model.new_cache(2, 16)))
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(got, model(ids).detach(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("fold", [False, True])
def test_slab_lm_prefill_and_steps(fold):
    torch.manual_seed(0)
    ids = torch.randint(0, 256, (1, 9))
    model = _with_statistics(SLABLM(LMConfig(dim=64, depth=2, num_heads=2, prepbn_steps=0)), ids)
    if fold:
        from leanformer.fold import fold_batchnorm

        model = fold_batchnorm(model)
    ref, got = _both_modes(lambda: _decode(model, ids, model.new_cache()))
    torch.testing.assert_close(got, ref)


def test_vit_and_bert_forward():
    torch.manual_seed(0)
    images = torch.randn(2, 3, 32, 32)
    vit = _with_statistics(SLABViT(ViTConfig(image_size=32, patch_size=8, num_classes=10, dim=64, depth=2,
                                             num_heads=2, prepbn_steps=0)), images)
    ref, got = _both_modes(lambda: vit(images))
    torch.testing.assert_close(got, ref)
    bert = BertEncoder(BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128)).eval()
    ids, mask = torch.randint(0, 100, (2, 7)), torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    ref, got = _both_modes(lambda: bert(ids, mask))
    torch.testing.assert_close(got, ref)
