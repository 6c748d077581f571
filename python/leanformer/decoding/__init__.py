"""Tree-verified parallel decoding: token trees, drafters and generate()."""
from leanformer.decoding.token_tree import TokenTree, TreeShape

__all__ = ["TokenTree", "TreeShape"]
