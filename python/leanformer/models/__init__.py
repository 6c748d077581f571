"""The architectures of the papers, composed from leanformer's modules. Each model implements
the layer-stack protocol itself (:class:`LayerStack`; :class:`CausalLM` for the ones that
decode), which ``leanformer.layers`` and ``leanformer.decoding`` drive."""
from leanformer.models.bert import (BertConfig, BertEncoder, SentenceEncoder, load_hf_bert, load_minilm,
                                    mean_pool, minilm_path)
from leanformer.models.checkpoint import load_pretrained, save_pretrained
from leanformer.models.llama import KVCache, LlamaConfig, LlamaLM
from leanformer.models.lm import LMCache, LMConfig, SLABLM
from leanformer.models.pretrained import smollm2_path
from leanformer.models.protocol import CausalLM, LayerStack
from leanformer.models.tokenizer import PretrainedTokenizer, load_tokenizer
from leanformer.models.vit import SLABViT, ViTConfig
from leanformer.models.wordpiece import WordPieceTokenizer

__all__ = ["BertConfig", "BertEncoder", "CausalLM", "KVCache", "LayerStack", "LlamaConfig", "LlamaLM", "LMCache",
           "LMConfig", "PretrainedTokenizer", "SLABLM", "SLABViT", "SentenceEncoder", "ViTConfig",
           "WordPieceTokenizer", "load_hf_bert", "load_minilm", "load_pretrained", "load_tokenizer", "mean_pool",
           "minilm_path", "save_pretrained", "smollm2_path"]
