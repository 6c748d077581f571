"""The tokenizers of pretrained checkpoints: :func:`load_tokenizer` reads ``tokenizer.json`` from a
Hugging Face folder or the byte-level BPE a GGUF file keeps in its ``tokenizer.ggml.*`` metadata,
and returns a :class:`PretrainedTokenizer` (the ``tokenizers`` library underneath) with the
checkpoint's chat template."""
from __future__ import annotations

import json
import os
from datetime import datetime
from typing import Dict, List, Optional, Sequence

from leanformer.models.gguf_file import read_gguf
from leanformer.models.pretrained import require

# How GPT-2-style vocabularies spell bytes (GPT-2's bytes_to_unicode): printable Latin-1 bytes as
# themselves, the others as the code points from 256 up, in byte order.
_PRINTABLE = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
              *range(ord("\xae"), ord("\xff") + 1)]
BYTE_SPELLING = {b: chr(b) if b in _PRINTABLE else None for b in range(256)}
_next = 256
for _b in range(256):
    if BYTE_SPELLING[_b] is None:
        BYTE_SPELLING[_b], _next = chr(_next), _next + 1

# The pre-tokenizer split of llama.cpp's `tokenizer.ggml.pre` names whose regex differs from
# GPT-2's (the byte-level default); as transformers maps them.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
GGUF_SPLITS = {"llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
               "smaug-bpe": _LLAMA3_SPLIT, "dbrx": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT,
               "deepseek-r1-qwen": _QWEN2_SPLIT}


class PretrainedTokenizer:
    """A checkpoint's tokenizer: ``encode(text) -> ids``, ``decode(ids) -> text``, the special
    token ids and, where the checkpoint has one, its chat template (rendered with jinja2 as
    transformers renders it). ``backend`` is the ``tokenizers.Tokenizer``.

    Example::

        >>> tok = load_tokenizer("SmolLM2-135M-Instruct.Q4_1.gguf")  # doctest: +SKIP
        >>> prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}])  # doctest: +SKIP
        >>> ids = tok.encode(prompt)  # doctest: +SKIP
    """

    def __init__(self, backend, *, bos_token: Optional[str] = None, eos_token: Optional[str] = None,
                 special_tokens: Optional[Dict[str, str]] = None, chat_template: Optional[str] = None):
        self.backend = backend
        self.bos_token, self.eos_token, self.chat_template = bos_token, eos_token, chat_template
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self.special_tokens.update({k: v for k, v in (("bos_token", bos_token), ("eos_token", eos_token)) if v})

    @property
    def bos_token_id(self) -> Optional[int]:
        return None if self.bos_token is None else self.backend.token_to_id(self.bos_token)

    @property
    def eos_token_id(self) -> Optional[int]:
        return None if self.eos_token is None else self.backend.token_to_id(self.eos_token)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_special_tokens: bool = True) -> List[int]:
        """Token ids of ``text`` (with the BOS the checkpoint asks for where
        ``add_special_tokens``). Special tokens written in the text (``<|im_start|>``) are
        matched whole."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """The prompt text of ``messages`` (``[{"role": "user", "content": ...}, ...]``) by the
        checkpoint's chat template; ``add_generation_prompt`` ends it with the assistant's turn
        opening. Extra keyword arguments reach the template. ValueError where the checkpoint
        has no template."""
        if not self.chat_template:
            raise ValueError("this tokenizer's checkpoint has no chat template")
        template = _compile(self.chat_template)
        return template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                               **{**self.special_tokens, **kwargs})

    def __repr__(self) -> str:
        return (f"PretrainedTokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, eos={self.eos_token!r}, "
                f"chat_template={self.chat_template is not None})")


_TEMPLATES: Dict[str, object] = {}


def _compile(source: str):
    """The jinja2 template, in the sandboxed environment transformers renders chat templates in
    (trim_blocks, lstrip_blocks, loop controls, ``raise_exception``, ``strftime_now``, a
    ``tojson`` that keeps non-ASCII characters)."""
    if source not in _TEMPLATES:
        require("jinja2", "a chat template")
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise ValueError(f"chat template: {message}")

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        _TEMPLATES[source] = env.from_string(source)
    return _TEMPLATES[source]


def _token_text(value) -> Optional[str]:
    """A special token of tokenizer_config.json: a string, or a dict with its ``content``."""
    return value.get("content") if isinstance(value, dict) else value


def _from_hf_folder(path: str) -> PretrainedTokenizer:
    tokenizers = require("tokenizers", "load_tokenizer")
    file = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{path}: no tokenizer.json (slow sentencepiece/vocab files are not read)")
    backend = tokenizers.Tokenizer.from_file(file)
    config = {}
    if os.path.isfile(os.path.join(path, "tokenizer_config.json")):
        with open(os.path.join(path, "tokenizer_config.json")) as f:
            config = json.load(f)
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    for name in ("chat_template.jinja",):
        if template is None and os.path.isfile(os.path.join(path, name)):
            with open(os.path.join(path, name)) as f:
                template = f.read()
    if template is None and os.path.isfile(os.path.join(path, "chat_template.json")):
        with open(os.path.join(path, "chat_template.json")) as f:
            template = json.load(f).get("chat_template")
    specials = {k: _token_text(config.get(k)) for k in ("unk_token", "pad_token", "sep_token", "cls_token",
                                                         "mask_token")}
    return PretrainedTokenizer(backend, bos_token=_token_text(config.get("bos_token")),
                               eos_token=_token_text(config.get("eos_token")), special_tokens=specials,
                               chat_template=template)


def _from_gguf(path: str) -> PretrainedTokenizer:
    tokenizers = require("tokenizers", "load_tokenizer")
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
    meta, _ = read_gguf(path)
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"{path}: tokenizer.ggml.model = {kind!r}: only byte-level BPE ('gpt2') GGUF tokenizers "
                         "are read")
    tokens, types = meta["tokenizer.ggml.tokens"], meta.get("tokenizer.ggml.token_type") or []
    merges = meta.get("tokenizer.ggml.merges")
    if merges is None:
        raise ValueError(f"{path}: no tokenizer.ggml.merges")
    alphabet = set(BYTE_SPELLING.values())
    # every token in the byte alphabet; one that is not (a mislabelled special token) is respelled
    vocab = {tok if set(tok) <= alphabet else "".join(BYTE_SPELLING[b] for b in tok.encode("utf-8")): i
             for i, tok in enumerate(tokens)}
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges],
                                              dropout=None, continuing_subword_prefix="", end_of_word_suffix="",
                                              fuse_unk=False))
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", False))
    split = GGUF_SPLITS.get(meta.get("tokenizer.ggml.pre"))
    backend.pre_tokenizer = (pre_tokenizers.ByteLevel(add_prefix_space=prefix) if split is None else
                             pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                      pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                               use_regex=False)]))
    backend.decoder = decoders.ByteLevel()
    # control tokens (type 3) match whole and are special; user-defined ones (4) match whole
    control = [AddedToken(t, normalized=False, special=True) for t, ty in zip(tokens, types)
               if ty == 3 and set(t) <= alphabet]
    backend.add_special_tokens(control)
    backend.add_tokens([AddedToken(t, normalized=False, special=False) for t, ty in zip(tokens, types)
                        if ty == 4 and t in vocab])

    def special(key):
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    bos, eos = special("bos"), special("eos")
    if meta.get("tokenizer.ggml.add_bos_token", False) and bos is not None:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, vocab[bos])])
    return PretrainedTokenizer(backend, bos_token=bos, eos_token=eos,
                               special_tokens={"unk_token": special("unknown"), "pad_token": special("padding")},
                               chat_template=meta.get("tokenizer.chat_template"))


def load_tokenizer(path: str) -> PretrainedTokenizer:
    """The tokenizer of a pretrained checkpoint: a Hugging Face folder (``tokenizer.json``, with
    ``tokenizer_config.json``'s special tokens and chat template) or a ``.gguf`` file (its
    byte-level BPE tokens and merges, special token ids, add-BOS flag and
    ``tokenizer.chat_template``). Needs ``pip install "leanformer[hf]"``.

    Example::

        tok = load_tokenizer("SmolLM2-135M-Instruct.Q4_1.gguf")
        ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "What is 2 + 2?"}]))
        text = tok.decode(ids)
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        return _from_hf_folder(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file or folder")
    with open(path, "rb") as f:
        if f.read(4) == b"GGUF":
            return _from_gguf(path)
    if os.path.basename(path) == "tokenizer.json":
        return _from_hf_folder(os.path.dirname(path) or ".")
    raise ValueError(f"{path}: neither a GGUF file, a tokenizer.json nor a Hugging Face folder")
