"""Random token trees for the tree-decoding op tests."""
import torch

from leanformer.reference import ancestor_mask


def random_parents(T, batch=None, generator=None):
    """parents [T] (or [batch, T]) of a random tree: parents[0] = -1, parents[i] uniform in [0, i)."""
    shape = (T,) if batch is None else (batch, T)
    u = torch.rand(shape, generator=generator)
    parents = (u * torch.arange(T)).long()
    parents[..., 0] = -1
    return parents


def random_tree(T, batch=None, device="cpu", generator=None):
    """(parents, tree_mask) on device."""
    parents = random_parents(T, batch, generator)
    return parents.to(device), ancestor_mask(parents).to(device)
