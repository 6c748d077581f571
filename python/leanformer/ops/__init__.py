"""Typed wrappers over torch.ops.leanformer, with fake kernels and autograd registered."""
from leanformer.ops.rep_batchnorm import progressive_norm, rep_batchnorm
from leanformer.ops.sync_batchnorm import sync_progressive_norm, sync_rep_batchnorm
from leanformer.ops.linear_attention import (
    simplified_linear_attention,
    simplified_linear_attention_step,
)
from leanformer.ops.nm_sparse import dense_min_tokens, nm_sparse_linear
from leanformer.ops.packed_linear import (
    pack_linear_weight,
    pack_swiglu_weight,
    packed_linear,
    packed_swiglu,
    unpack_linear_weight,
)
from leanformer.ops.topk_mlp import predicted_sparse_mlp, sparse_down_projection, topk_activation, topk_mlp
from leanformer.ops.tree_decoding import (
    compact_kv_cache,
    sla_tree_commit,
    tree_attention,
    tree_dwconv,
    tree_linear_attention,
    verify_tree_greedy,
    verify_tree_sampling,
    warp_logits,
    warp_probs,
)

__all__ = ["progressive_norm", "rep_batchnorm", "simplified_linear_attention", "simplified_linear_attention_step",
           "sync_progressive_norm", "sync_rep_batchnorm",
           "dense_min_tokens", "nm_sparse_linear",
           "pack_linear_weight", "pack_swiglu_weight", "packed_linear", "packed_swiglu",
           "unpack_linear_weight",
           "predicted_sparse_mlp", "sparse_down_projection", "topk_activation", "topk_mlp",
           "compact_kv_cache", "sla_tree_commit", "tree_attention", "tree_dwconv", "tree_linear_attention",
           "verify_tree_greedy", "verify_tree_sampling", "warp_logits", "warp_probs"]
