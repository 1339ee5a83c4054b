"""A vision transformer for small medical images: MONAI's :class:`monai.networks.nets.ViT`.

Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale",
ICLR 2021. MONAI's ViT returns ``(logits, hidden_states)`` and ends its classification head with a
``Tanh`` by default; :class:`ViTClassifier` returns the logits only and uses a plain linear head
(``post_activation=None``), so that it trains and is attacked like the other classifiers. The
defaults suit 28-px MedMNIST: 4 x 4 patches (49 tokens), 6 layers of width 192 with 6 heads (a
ViT-Tiny-like size: 2.7 M parameters).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets import ViT
from torch import nn

from medrobust.nets._common import check_args


class ViTClassifier(nn.Module):
    """MONAI's ViT returning logits ``(N, num_classes)``."""

    def __init__(self, vit: ViT) -> None:
        super().__init__()
        self.vit = vit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.vit(x)
        return out[0] if isinstance(out, tuple) else out


def vit(
    in_channels: int = 1,
    num_classes: int = 2,
    spatial_dims: int = 2,
    img_size: int | Sequence[int] = 28,
    patch_size: int | Sequence[int] = 4,
    hidden_size: int = 192,
    mlp_dim: int = 768,
    num_layers: int = 6,
    num_heads: int = 6,
    dropout_rate: float = 0.0,
) -> ViTClassifier:
    """A vision transformer classifier (MONAI ViT, linear head, logits only)."""
    check_args("vit", in_channels, num_classes, spatial_dims)
    sizes = [img_size] * spatial_dims if isinstance(img_size, int) else list(img_size)
    patches = [patch_size] * spatial_dims if isinstance(patch_size, int) else list(patch_size)
    if len(sizes) != spatial_dims or len(patches) != spatial_dims or any(
        s % p for s, p in zip(sizes, patches, strict=True)
    ):
        raise ValueError(f"vit: img_size {img_size!r} must be divisible by patch_size "
                         f"{patch_size!r} along each of the {spatial_dims} axes")
    if hidden_size % num_heads:
        raise ValueError(f"vit: hidden_size {hidden_size} must be divisible by num_heads "
                         f"{num_heads}")
    net = ViT(in_channels=in_channels, img_size=sizes, patch_size=patches,
              hidden_size=hidden_size, mlp_dim=mlp_dim, num_layers=num_layers,
              num_heads=num_heads, classification=True, num_classes=num_classes,
              dropout_rate=dropout_rate, spatial_dims=spatial_dims, post_activation=None)
    return ViTClassifier(net)
