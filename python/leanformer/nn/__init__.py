"""Drop-in torch.nn modules built on leanformer's ops."""
from leanformer.nn.linear_attention import SimplifiedLinearAttention, SLACache
from leanformer.nn.mlp import MLP
from leanformer.nn.rep_batchnorm import PRepBN, RepBN
from leanformer.nn.softmax_attention import SoftmaxAttention
from leanformer.nn.topk_mlp import TopKMLP

__all__ = ["MLP", "PRepBN", "RepBN", "SimplifiedLinearAttention", "SLACache", "SoftmaxAttention", "TopKMLP"]
