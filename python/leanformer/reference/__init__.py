"""Plain-PyTorch references of every kernel's math, shared by the tests and the benchmarks."""
from leanformer.reference.linear_attention import (
    sla_causal_chunked_reference,
    sla_causal_quadratic_reference,
    sla_noncausal_reference,
    sla_step_reference,
)
from leanformer.reference.rep_batchnorm import progressive_norm_reference, rep_batchnorm_reference

__all__ = [
    "progressive_norm_reference",
    "rep_batchnorm_reference",
    "sla_causal_chunked_reference",
    "sla_causal_quadratic_reference",
    "sla_noncausal_reference",
    "sla_step_reference",
]
