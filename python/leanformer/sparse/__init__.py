"""N:M semi-structured sparse matrices: the packed format and NMSparseMatrix."""
from leanformer.sparse.nm_format import (
    SUPPORTED_M,
    meta_bits,
    pack_meta,
    unpack_dense,
    unpack_meta,
)
from leanformer.sparse.nm_matrix import NMSparseMatrix, nm_mask

__all__ = ["NMSparseMatrix", "SUPPORTED_M", "meta_bits", "nm_mask", "pack_meta", "unpack_dense", "unpack_meta"]
