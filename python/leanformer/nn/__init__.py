"""Drop-in torch.nn modules built on leanformer's ops."""
from leanformer.nn.linear_attention import SimplifiedLinearAttention, SLACache
from leanformer.nn.rep_batchnorm import PRepBN, RepBN

__all__ = ["PRepBN", "RepBN", "SimplifiedLinearAttention", "SLACache"]
