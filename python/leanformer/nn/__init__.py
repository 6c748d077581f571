"""Drop-in torch.nn modules built on leanformer's ops."""
from leanformer.nn.dense_sparse_linear import DenseSparseLinear
from leanformer.nn.linear_attention import SimplifiedLinearAttention, SLACache
from leanformer.nn.low_rank_linear import LowRankLinear
from leanformer.nn.mlp import MLP
from leanformer.nn.nm_sparse_linear import NMSparseLinear
from leanformer.nn.packed_linear_layers import packed_linears, release_packed
from leanformer.nn.neuron_predictor import NeuronPredictor, PredictedSparseMLP, fit_predictor, recall
from leanformer.nn.quantized_linear import QuantizedLinear
from leanformer.nn.rep_batchnorm import PRepBN, RepBN
from leanformer.nn.softmax_attention import SoftmaxAttention
from leanformer.nn.straight_through_factorizer import StraightThroughFactorizer
from leanformer.nn.topk_mlp import TopKMLP

__all__ = [
    "DenseSparseLinear", "LowRankLinear", "MLP", "NMSparseLinear", "NeuronPredictor", "PRepBN", "PredictedSparseMLP",
    "QuantizedLinear", "RepBN", "SLACache", "SimplifiedLinearAttention", "SoftmaxAttention", "StraightThroughFactorizer", "TopKMLP",
    "fit_predictor", "packed_linears", "recall", "release_packed",
]
