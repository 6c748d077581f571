"""Drop-in torch.nn modules built on leanformer's ops."""
from leanformer.nn.linear_attention import SimplifiedLinearAttention, SLACache

__all__ = ["SimplifiedLinearAttention", "SLACache"]
