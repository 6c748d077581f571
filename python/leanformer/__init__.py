"""leanformer: fused C++/CUDA kernels for efficient transformers, as drop-in torch ops."""
from leanformer import _extension

_extension.load()

from leanformer import analysis, compress, convert, models, nn, ops, reference, sparse  # noqa: E402
from leanformer.fold import fold_batchnorm  # noqa: E402
from leanformer.decoding import generate  # noqa: E402
from leanformer import layers  # noqa: E402

__version__ = "0.1.0"
__all__ = ["analysis", "compress", "convert", "fold_batchnorm", "generate", "layers", "models", "nn", "ops", "reference", "sparse", "__version__"]
