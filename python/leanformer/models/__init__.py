"""The architectures of the papers, composed from leanformer's modules."""
from leanformer.models.checkpoint import load_pretrained, save_pretrained
from leanformer.models.lm import LMCache, LMConfig, SLABLM
from leanformer.models.vit import SLABViT, ViTConfig

__all__ = ["LMCache", "LMConfig", "SLABLM", "SLABViT", "ViTConfig", "load_pretrained", "save_pretrained"]
