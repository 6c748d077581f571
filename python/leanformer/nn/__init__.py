"""Drop-in torch.nn modules built on leanformer's ops."""
from leanformer.nn.linear_attention import SimplifiedLinearAttention, SLACache
from leanformer.nn.rep_batchnorm import RepBN

__all__ = ["RepBN", "SimplifiedLinearAttention", "SLACache"]
