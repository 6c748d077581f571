"""Plain-PyTorch references of every kernel's math, shared by the tests and the benchmarks:
one module per op family, named as :mod:`leanformer.ops`' modules."""
from leanformer.reference.decode_attention import decode_attention_reference
from leanformer.reference.linear_attention import (sla_causal_chunked_reference, sla_causal_quadratic_reference,
                                                   sla_noncausal_reference, sla_step_reference)
from leanformer.reference.nm_sparse_linear import nm_sparse_linear as nm_sparse_linear_reference
from leanformer.reference.packed_linear import packed_linear_reference, packed_swiglu_reference
from leanformer.reference.quantized_linear import dequantize_reference, quantized_linear_reference
from leanformer.reference.rep_batchnorm import progressive_norm_reference, rep_batchnorm_reference
from leanformer.reference.rms_norm import rms_norm_reference
from leanformer.reference.topk_mlp import (dense_mlp_reference, predicted_sparse_mlp_reference,
                                           sparse_down_projection_reference, topk_activation_reference,
                                           topk_mask_dense, topk_mlp_reference)
from leanformer.reference.tree_attention import (ancestor_mask, prefix_tree_additive_mask, tree_attention_reference,
                                                 tree_linear_attention_reference)
from leanformer.reference.tree_state import sla_tree_commit_reference, tree_dwconv_reference
from leanformer.reference.tree_verify import (compact_kv_cache_reference, verify_tree_greedy_reference,
                                              verify_tree_sampling_reference)

__all__ = [
    # linear_attention
    "sla_causal_chunked_reference", "sla_causal_quadratic_reference", "sla_noncausal_reference", "sla_step_reference",
    # rep_batchnorm
    "progressive_norm_reference", "rep_batchnorm_reference",
    # topk_mlp
    "dense_mlp_reference", "predicted_sparse_mlp_reference", "sparse_down_projection_reference",
    "topk_activation_reference", "topk_mask_dense", "topk_mlp_reference",
    # nm_sparse_linear
    "nm_sparse_linear_reference",
    # packed_linear
    "packed_linear_reference", "packed_swiglu_reference",
    # tree_attention, tree_verify, tree_state
    "ancestor_mask", "prefix_tree_additive_mask", "tree_attention_reference", "tree_linear_attention_reference",
    "compact_kv_cache_reference", "verify_tree_greedy_reference", "verify_tree_sampling_reference",
    "sla_tree_commit_reference", "tree_dwconv_reference",
    # decode_attention
    "decode_attention_reference",
    # rms_norm
    "rms_norm_reference",
]
