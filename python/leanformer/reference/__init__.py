"""Plain-PyTorch references of every kernel's math, shared by the tests and the benchmarks."""
from leanformer.reference.linear_attention import (
    sla_causal_chunked_reference,
    sla_causal_quadratic_reference,
    sla_noncausal_reference,
    sla_step_reference,
)
from leanformer.reference.nm_sparse import nm_sparse_linear as nm_sparse_linear_reference
from leanformer.reference.rep_batchnorm import progressive_norm_reference, rep_batchnorm_reference
from leanformer.reference.topk_mlp import (
    dense_mlp_reference,
    predicted_sparse_mlp_reference,
    sparse_down_projection_reference,
    topk_activation_reference,
    topk_mask_dense,
    topk_mlp_reference,
)
from leanformer.reference.tree_decoding import (
    ancestor_mask,
    compact_kv_cache_reference,
    prefix_tree_additive_mask,
    sla_tree_commit_reference,
    tree_attention_reference,
    tree_dwconv_reference,
    tree_linear_attention_reference,
    verify_tree_greedy_reference,
    verify_tree_sampling_reference,
)

__all__ = [
    "ancestor_mask",
    "compact_kv_cache_reference",
    "sla_tree_commit_reference",
    "prefix_tree_additive_mask",
    "tree_attention_reference", "tree_dwconv_reference",
    "tree_linear_attention_reference",
    "verify_tree_greedy_reference",
    "verify_tree_sampling_reference",
    "dense_mlp_reference",
    "nm_sparse_linear_reference",
    "predicted_sparse_mlp_reference",
    "progressive_norm_reference",
    "rep_batchnorm_reference",
    "sla_causal_chunked_reference",
    "sla_causal_quadratic_reference",
    "sla_noncausal_reference",
    "sla_step_reference",
    "sparse_down_projection_reference",
    "topk_activation_reference",
    "topk_mask_dense",
    "topk_mlp_reference",
]
