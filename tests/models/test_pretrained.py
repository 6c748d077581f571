"""LlamaLM.from_pretrained on tiny Llama-family checkpoints the tests write themselves (random
weights): Hugging Face folders (safetensors + config.json; tied and untied heads, Qwen2's q/k/v
biases, a separate head_dim, sharded) and GGUF files (F32/F16/Q8_0/Q4_0/Q4_1 tensors, written
with the gguf package), each against transformers' forward on the same files; the GGUF
dequantization against the gguf package's; and the configs and tensors it refuses."""
import json
import os

import numpy as np
import pytest
import torch

from leanformer.models import LlamaConfig, LlamaLM, load_pretrained, save_pretrained
from leanformer.models.gguf_file import dequantize, read_gguf

transformers = pytest.importorskip("transformers", reason="the reference forward is transformers'")
safetensors_torch = pytest.importorskip("safetensors.torch")

SIZES = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=128)


def hf_model(model_type="llama", tie=False, **kw):
    """A random transformers model (biases random too, not zero)."""
    torch.manual_seed(0)
    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[model_type]
    config = cls[0](**{**SIZES, "tie_word_embeddings": tie, "rope_theta": 5e4, **kw})
    model = cls[1](config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0 if "norm" not in name else 1.0, 0.3 if "norm" in name else 0.08)
    return model


def hf_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def ours_logits(model, ids):
    with torch.no_grad():
        return model(ids)


IDS = torch.randint(0, SIZES["vocab_size"], (2, 21), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("model_type,tie,extra", [("llama", False, {}), ("llama", True, {}),
                                                  ("llama", False, {"head_dim": 32}), ("qwen2", False, {}),
                                                  ("qwen2", True, {})])
def test_hf_folder_matches_transformers(tmp_path, model_type, tie, extra):
    ref = hf_model(model_type, tie, **extra)
    ref.save_pretrained(tmp_path)
    model = LlamaLM.from_pretrained(tmp_path)
    c = model.config
    assert (c.tie_embeddings, c.qkv_bias, c.head_dim, c.rope_base) == (tie, model_type == "qwen2",
                                                                       extra.get("head_dim", 16), 5e4)
    assert (model.lm_head.weight is model.embed.weight) == tie
    assert not any(p.is_meta for p in model.parameters()) and not model.training
    torch.testing.assert_close(ours_logits(model, IDS), hf_logits(ref, IDS), atol=1e-4, rtol=1e-4)


def test_built_on_the_meta_device(tmp_path, monkeypatch):
    """No parameter is randomly initialized and then overwritten: the init runs on meta tensors."""
    hf_model().save_pretrained(tmp_path)
    real_init, on_meta = torch.nn.init.normal_, []

    def normal_(tensor, *args, **kwargs):
        on_meta.append(tensor.is_meta)
        return real_init(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.nn.init, "normal_", normal_)
    LlamaLM.from_pretrained(tmp_path)
    assert on_meta and all(on_meta)


def test_sharded_folder_and_dtype(tmp_path):
    ref = hf_model()
    ref.save_pretrained(tmp_path, max_shard_size="100KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    model = LlamaLM.from_pretrained(tmp_path)
    torch.testing.assert_close(ours_logits(model, IDS), hf_logits(ref, IDS), atol=1e-4, rtol=1e-4)
    half = LlamaLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())


def test_loaded_model_saves_and_reloads(tmp_path):
    """head_size and qkv_bias pass through leanformer's own save_pretrained/load_pretrained."""
    hf_model("qwen2", head_dim=32).save_pretrained(tmp_path / "hf")
    model = LlamaLM.from_pretrained(tmp_path / "hf")
    save_pretrained(model, tmp_path / "ours")
    again = load_pretrained(tmp_path / "ours")
    assert again.config == model.config
    torch.testing.assert_close(ours_logits(again, IDS), ours_logits(model, IDS))


def test_new_config_fields_default_to_the_old_model():
    """A config without the new fields builds the same parameters as before (no biases)."""
    m = LlamaLM(LlamaConfig(dim=48, depth=1, num_heads=4, num_kv_heads=2))
    assert m.layers[0].attn.q_proj.bias is None and m.config.head_dim == 12
    m = LlamaLM(LlamaConfig(dim=48, depth=1, num_heads=4, num_kv_heads=2, head_size=16, qkv_bias=True))
    assert m.layers[0].attn.q_proj.weight.shape == (64, 48) and m.layers[0].attn.o_proj.weight.shape == (48, 64)
    assert m.layers[0].attn.k_proj.bias.shape == (32,) and m.new_cache(1, 4).k[0].shape == (1, 4, 2, 16)


# ---- refusals ----


def write_config(path, **changes):
    with open(path / "config.json") as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(path / "config.json", "w") as f:
        json.dump(cfg, f)


@pytest.mark.parametrize("field,value", [("rope_scaling", {"rope_type": "linear", "factor": 2.0}),
                                         ("rope_parameters", {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}),
                                         ("model_type", "gpt2"), ("mlp_bias", True), ("attention_bias", True),
                                         ("hidden_act", "gelu"), ("num_local_experts", 8),
                                         ("sliding_window", 4096), ("layer_types", ["sliding_attention"] * 2)])
def test_refuses_configs_it_cannot_represent(tmp_path, field, value):
    hf_model().save_pretrained(tmp_path)
    write_config(tmp_path, **{field: value})
    with pytest.raises(ValueError, match=field):
        LlamaLM.from_pretrained(tmp_path)


def test_accepts_what_changes_nothing(tmp_path):
    """A default-type rope_scaling, and Qwen2's sliding_window when use_sliding_window is off."""
    ref = hf_model("qwen2")
    ref.save_pretrained(tmp_path)
    write_config(tmp_path, rope_scaling={"rope_type": "default"}, use_sliding_window=False, sliding_window=4096)
    torch.testing.assert_close(ours_logits(LlamaLM.from_pretrained(tmp_path), IDS), hf_logits(ref, IDS),
                               atol=1e-4, rtol=1e-4)


def test_refuses_qwen2_sliding_window(tmp_path):
    hf_model("qwen2").save_pretrained(tmp_path)
    write_config(tmp_path, use_sliding_window=True, sliding_window=64)
    with pytest.raises(ValueError, match="use_sliding_window"):
        LlamaLM.from_pretrained(tmp_path)


def _rewrite_weights(path, edit):
    file = path / "model.safetensors"
    state = safetensors_torch.load_file(file)
    edit(state)
    safetensors_torch.save_file(state, file, metadata={"format": "pt"})


def test_refuses_missing_misshaped_and_extra_tensors(tmp_path):
    hf_model().save_pretrained(tmp_path)
    _rewrite_weights(tmp_path, lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensor 'model.layers.1.mlp.up_proj.weight'"):
        LlamaLM.from_pretrained(tmp_path)
    hf_model().save_pretrained(tmp_path)
    _rewrite_weights(tmp_path, lambda s: s.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(16, 64)}))
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.k_proj.weight' has shape \(16, 64\)"):
        LlamaLM.from_pretrained(tmp_path)
    hf_model().save_pretrained(tmp_path)
    _rewrite_weights(tmp_path, lambda s: s.update({"model.layers.0.self_attn.o_proj.bias": torch.zeros(64)}))
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.o_proj.bias' has no place"):
        LlamaLM.from_pretrained(tmp_path)


def test_refuses_paths_that_are_not_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError):
        LlamaLM.from_pretrained(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="config.json"):
        LlamaLM.from_pretrained(tmp_path)
    (tmp_path / "x.bin").write_bytes(b"not a gguf")
    with pytest.raises(ValueError, match="not a GGUF"):
        LlamaLM.from_pretrained(tmp_path / "x.bin")


# ---- GGUF ----

gguf = pytest.importorskip("gguf", reason="GGUF files are written with the gguf package")
QTYPES = ["F32", "F16", "Q8_0", "Q4_0", "Q4_1"]


@pytest.mark.parametrize("qtype", QTYPES + ["BF16"])
def test_dequantize_matches_the_gguf_package(qtype):
    t = gguf.GGMLQuantizationType[qtype]
    x = np.random.default_rng(0).standard_normal((6, 96)).astype(np.float32)
    x[0] = 0.0  # an all-zero block
    raw = gguf.quants.quantize(x, t)
    ref = gguf.quants.dequantize(raw, t)
    ours = dequantize(torch.from_numpy(np.ascontiguousarray(raw).view(np.uint8)), qtype, (6, 96))
    assert ours.dtype == torch.float32 and ours.shape == (6, 96)
    assert torch.equal(ours, torch.from_numpy(ref.astype(np.float32)))


def permute(w, heads):
    """llama.cpp's q/k row permutation (convert_hf_to_gguf.py's LlamaModel.permute)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, ref, types, arch="llama", edit=None):
    """``ref`` (a transformers model) as a GGUF the way llama.cpp's converter writes it: its
    names, q/k rows permuted (llama), 2-D weights as ``types[i % len(types)]``, norms F32."""
    c = ref.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    layer = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    state = {k: v for k, v in ref.state_dict().items() if not (c.tie_word_embeddings and k == "lm_head.weight")}
    if edit is not None:
        edit(state)
    for i, (name, t) in enumerate(state.items()):
        if name.startswith("model.layers."):
            _, _, n, rest = name.split(".", 3)
            module, param = rest.rsplit(".", 1)
            gname = f"blk.{n}.{layer[module]}.{param}"
        else:
            gname = names[name]
        t = t.detach().float()
        if arch == "llama" and gname.endswith(("attn_q.weight", "attn_q.bias", "attn_k.weight", "attn_k.bias")):
            t = permute(t, c.num_attention_heads if "attn_q" in gname else c.num_key_value_heads)
        qtype = gguf.GGMLQuantizationType[types[i % len(types)] if t.dim() == 2 else "F32"]
        w.add_tensor(gname, gguf.quants.quantize(t.numpy(), qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def hf_from_gguf(path):
    return transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                             dtype=torch.float32).eval()


@pytest.mark.parametrize("tie", [False, True])
def test_f32_gguf_equals_the_float_model(tmp_path, tie):
    """The permutation undone: an F32 GGUF loads to the transformers model it was written from."""
    ref = hf_model(tie=tie)
    write_gguf(tmp_path / "m.gguf", ref, ["F32"])
    model = LlamaLM.from_pretrained(tmp_path / "m.gguf")
    assert (model.lm_head.weight is model.embed.weight) == tie and model.config.rope_base == 5e4
    torch.testing.assert_close(ours_logits(model, IDS), hf_logits(ref, IDS), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("tie", [False, True])
def test_quantized_gguf_matches_transformers(tmp_path, tie):
    """Every weight type in one file (mixed as llama.cpp's quantizer mixes them); transformers
    dequantizes the same file."""
    ref = hf_model(tie=tie)
    write_gguf(tmp_path / "m.gguf", ref, QTYPES)
    _, tensors = read_gguf(tmp_path / "m.gguf")
    assert {t.type_name for t in tensors.values()} == set(QTYPES)
    model = LlamaLM.from_pretrained(tmp_path / "m.gguf")
    torch.testing.assert_close(ours_logits(model, IDS), hf_logits(hf_from_gguf(tmp_path / "m.gguf"), IDS),
                               atol=1e-4, rtol=1e-4)
    # quantization moved the logits, but not far
    cos = torch.nn.functional.cosine_similarity(ours_logits(model, IDS).flatten(), hf_logits(ref, IDS).flatten(), 0)
    assert cos > 0.95


@pytest.mark.parametrize("tie", [False, True])
def test_gguf_kept_quantized(tmp_path, tie, caplog):
    """quantized=True: each Q8_0 / Q4_0 / Q4_1 Linear weight becomes a QuantizedLinear holding the
    file's blocks (dequantized, bit for bit the dense load's weight, q/k rows unpermuted), F32 /
    F16 ones stay dense with a warning; a tied head reads token_embd's blocks."""
    import logging
    from leanformer.nn import QuantizedLinear
    ref = hf_model(tie=tie)
    write_gguf(tmp_path / "m.gguf", ref, QTYPES)
    dense = LlamaLM.from_pretrained(tmp_path / "m.gguf")
    with caplog.at_level(logging.WARNING, logger="leanformer.models.pretrained"):
        model = LlamaLM.from_pretrained(tmp_path / "m.gguf", quantized=True)
    _, tensors = read_gguf(tmp_path / "m.gguf")
    kept = 0
    for name, mod in model.named_modules():
        if isinstance(mod, (QuantizedLinear, torch.nn.Linear)):
            gname = {"lm_head": "token_embd" if tie else "output"}.get(name)
            want = dict(dense.named_modules())[name].weight
            if isinstance(mod, QuantizedLinear):
                kept += 1
                assert torch.equal(mod.dequantized_weight(), want), name
            else:
                assert torch.equal(mod.weight, want), name
    assert kept and "stays dense" in caplog.text
    assert isinstance(model.lm_head, QuantizedLinear) == (tensors["token_embd.weight" if tie else "output.weight"]
                                                          .type_name in ("Q8_0", "Q4_0", "Q4_1"))
    ids = IDS[:, :9]
    cos = torch.nn.functional.cosine_similarity(ours_logits(model, ids).flatten(), ours_logits(dense, ids).flatten(), 0)
    assert cos > 0.99  # the int8 rounding of activations apart, the same model
    with pytest.raises(ValueError, match="quantized=True keeps a GGUF file's blocks"):
        LlamaLM.from_pretrained(tmp_path, quantized=True)


def test_qwen2_gguf_with_biases(tmp_path):
    ref = hf_model("qwen2")
    write_gguf(tmp_path / "m.gguf", ref, ["F32"], arch="qwen2")
    model = LlamaLM.from_pretrained(tmp_path / "m.gguf")
    assert model.config.qkv_bias
    torch.testing.assert_close(ours_logits(model, IDS), hf_logits(ref, IDS), atol=1e-4, rtol=1e-4)


def test_gguf_refusals(tmp_path):
    ref = hf_model()
    write_gguf(tmp_path / "m.gguf", ref, ["F32"])
    meta, tensors = read_gguf(tmp_path / "m.gguf")
    assert meta["general.architecture"] == "llama" and meta["llama.block_count"] == 2
    from leanformer.models.pretrained import config_from_gguf
    shapes = {n: t.shape for n, t in tensors.items()}
    for key, value in (("llama.rope.scaling.type", "linear"), ("general.architecture", "gpt2"),
                       ("llama.expert_count", 8), ("llama.attention.sliding_window", 4096),
                       ("llama.rope.dimension_count", 8)):
        with pytest.raises(ValueError, match=key):
            config_from_gguf({**meta, key: value}, shapes, "m.gguf")
    write_gguf(tmp_path / "a.gguf", ref, ["Q8_0"], edit=lambda s: s.pop("model.layers.1.mlp.down_proj.weight"))
    with pytest.raises(ValueError, match="missing tensor 'blk.1.ffn_down.weight'"):
        LlamaLM.from_pretrained(tmp_path / "a.gguf")
    write_gguf(tmp_path / "b.gguf", ref, ["F16"],
               edit=lambda s: s.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(96, 64)}))
    with pytest.raises(ValueError, match=r"tensor 'blk.0.ffn_up.weight' has shape \(96, 64\)"):
        LlamaLM.from_pretrained(tmp_path / "b.gguf")
