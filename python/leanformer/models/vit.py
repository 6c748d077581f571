"""SLAB's vision transformer (SLAB-DeiT): simplified linear attention with a 2-D DWC on V and
PRepBN in every block, average pooling, no class token; and its softmax + LayerNorm twin."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from leanformer.models.block import Block, apply_norm, make_norm, norm_fold_pairs


@dataclass
class ViTConfig:
    """Sizes and variant of :class:`SLABViT`.

    ``attention="sla", norm="prepbn"`` is SLAB; :meth:`twin` gives the softmax + LayerNorm
    baseline of the same sizes (DeiT without a class token). ``prepbn_steps`` and
    ``prepbn_warmup`` are PRepBN's decay length and warm-up, in training steps.
    """

    image_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    dim: int = 192
    depth: int = 12
    num_heads: int = 3
    mlp_ratio: float = 4.0
    dwc_kernel_size: int = 5
    attention: str = "sla"
    norm: str = "prepbn"
    prepbn_steps: int = 60000
    prepbn_warmup: int = 0

    @classmethod
    def tiny(cls, **overrides) -> "ViTConfig":
        """DeiT-T sizes: dim 192, 12 layers, 3 heads."""
        return cls(**{"dim": 192, "depth": 12, "num_heads": 3, **overrides})

    @classmethod
    def small(cls, **overrides) -> "ViTConfig":
        """DeiT-S sizes: dim 384, 12 layers, 6 heads."""
        return cls(**{"dim": 384, "depth": 12, "num_heads": 6, **overrides})

    def twin(self) -> "ViTConfig":
        return dataclasses.replace(self, attention="softmax", norm="layernorm")

    @property
    def grid(self) -> int:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})")
        return self.image_size // self.patch_size


class SLABViT(nn.Module):
    """``images [B, in_chans, image_size, image_size]`` -> logits ``[B, num_classes]``.

    Example::

        >>> model = SLABViT(ViTConfig.tiny(image_size=32, patch_size=8, num_classes=10))
        >>> model(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    model_type = "slab_vit"

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = c = config
        g = c.grid
        self.patch_embed = nn.Conv2d(c.in_chans, c.dim, c.patch_size, stride=c.patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, g * g, c.dim))
        norm_kwargs = {"total_steps": c.prepbn_steps, "warmup_steps": c.prepbn_warmup} if c.norm == "prepbn" else {}
        self.blocks = nn.ModuleList(
            Block(c.dim, c.num_heads, int(c.dim * c.mlp_ratio), attention=c.attention, norm=c.norm,
                  causal=False, dwc_kernel_size=c.dwc_kernel_size, norm_kwargs=norm_kwargs)
            for _ in range(c.depth))
        self.norm = make_norm(c.norm, c.dim, **norm_kwargs)
        self.head = nn.Linear(c.dim, c.num_classes)
        self.apply(_init_weights)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, images: Tensor) -> Tensor:
        c = self.config
        if images.dim() != 4 or tuple(images.shape[1:]) != (c.in_chans, c.image_size, c.image_size):
            raise ValueError(f"images must be [B, {c.in_chans}, {c.image_size}, {c.image_size}], "
                             f"got {tuple(images.shape)}")
        # Contiguous tokens: a transposed residual stream would reach every Linear (after folding
        # nothing copies it) and turn each into a strided matmul.
        x = self.patch_embed(images).flatten(2).transpose(1, 2).contiguous() + self.pos_embed
        hw = (c.grid, c.grid)
        for block in self.blocks:
            x = block(x, hw=hw)
        # Average pooling commutes with the final norm's per-channel affine, so it still folds into head.
        return self.head(apply_norm(self.norm, x, None).mean(1))

    def fold_pairs(self):
        return norm_fold_pairs(self, [("norm", ["head"], "forward")])


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
