"""Tree-verified parallel decoding: token trees, drafters (Medusa heads, Hidden Transfer, lookup),
the sampling warp and generate()."""
from leanformer.decoding.generate import Generation, generate
from leanformer.decoding.hidden_transfer import HiddenTransfer
from leanformer.decoding.lookup import LookupDrafter, NgramTable
from leanformer.decoding.medusa import MedusaHeads
from leanformer.decoding.sampling import warp_logits, warp_probs
from leanformer.decoding.token_tree import DynamicTree, TokenTree, TreeShape
from leanformer.decoding.tree_size import fastest_tree

__all__ = ["DynamicTree", "Generation", "HiddenTransfer", "LookupDrafter", "MedusaHeads", "NgramTable", "TokenTree",
           "TreeShape", "fastest_tree", "generate", "warp_logits", "warp_probs"]
