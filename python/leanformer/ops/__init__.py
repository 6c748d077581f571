"""Typed wrappers over ``torch.ops.leanformer``, with autograd registered.

The ops' fake kernels (what ``torch.compile`` and ``torch.export`` trace through) are C++ Meta
kernels, ``csrc/<family>_meta.cpp``: they run the same argument checks as the CPU and CUDA
kernels (shapes, dtypes, one device for every tensor, scalar arguments), on symbolic sizes too,
so a compiled or exported program refuses what eager refuses. Checks that need the data (token
ids within the vocabulary, parents forming a tree, cache_lens within the cache, indices below
d_ff) run in the real kernels only: a compiled graph checks them when its kernel runs.

One module per op family, named as the family's C++ files (``csrc/<family>_*``), its reference
(:mod:`leanformer.reference`), tests (``tests/ops/test_<family>*.py``) and benchmark
(``bench/bench_<family>.py``)."""
from leanformer.ops.decode_attention import decode_attention, decode_attention_tree
from leanformer.ops.linear_attention import simplified_linear_attention, simplified_linear_attention_step
from leanformer.ops.nm_sparse_linear import dense_min_tokens, nm_sparse_linear
from leanformer.ops.packed_linear import (pack_linear_weight, pack_swiglu_weight, packed_linear, packed_swiglu,
                                          unpack_linear_weight)
from leanformer.ops.quantized_linear import quantized_linear
from leanformer.ops.rep_batchnorm import (progressive_norm, rep_batchnorm, sync_progressive_norm,
                                          sync_rep_batchnorm)
from leanformer.ops.rms_norm import rms_norm
from leanformer.ops.topk_mlp import predicted_sparse_mlp, sparse_down_projection, topk_activation, topk_mlp
from leanformer.ops.tree_attention import tree_attention, tree_linear_attention
from leanformer.ops.tree_state import sla_tree_commit, tree_dwconv
from leanformer.ops.tree_verify import compact_kv_cache, verify_tree_greedy, verify_tree_sampling

__all__ = [
    # linear_attention
    "simplified_linear_attention", "simplified_linear_attention_step",
    # rep_batchnorm
    "progressive_norm", "rep_batchnorm", "sync_progressive_norm", "sync_rep_batchnorm",
    # topk_mlp
    "predicted_sparse_mlp", "sparse_down_projection", "topk_activation", "topk_mlp",
    # nm_sparse_linear
    "dense_min_tokens", "nm_sparse_linear",
    # packed_linear
    "pack_linear_weight", "pack_swiglu_weight", "packed_linear", "packed_swiglu", "unpack_linear_weight",
    # tree_attention, tree_verify, tree_state
    "tree_attention", "tree_linear_attention",
    "compact_kv_cache", "verify_tree_greedy", "verify_tree_sampling",
    "sla_tree_commit", "tree_dwconv",
    # decode_attention
    "decode_attention", "decode_attention_tree",
    # quantized_linear
    "quantized_linear",
    # rms_norm
    "rms_norm",
]
