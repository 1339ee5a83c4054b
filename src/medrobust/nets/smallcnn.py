"""A small, fast convolutional classifier for 2D images and 3D volumes.

Four 3x3 convolutions with batch normalization in two stages (each followed by 2x max pooling), a
global average pool and a two-layer head. Global pooling makes it accept any input size. It is the
default network of tests and demos: it trains on PneumoniaMNIST in seconds on a CPU.
"""

from __future__ import annotations

import torch
from torch import nn

from medrobust.nets._common import check_args


class SmallCNN(nn.Module):
    """A small CNN: ``(N, C, *spatial) -> (N, num_classes)`` logits.

    Args:
        in_channels: input channels.
        num_classes: output logits.
        spatial_dims: 2 for images, 3 for volumes.
        width: channels of the first stage (the second has ``2 * width``).
        dropout: dropout before the last linear layer.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 2,
        spatial_dims: int = 2,
        width: int = 32,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        check_args("smallcnn", in_channels, num_classes, spatial_dims)
        if int(width) < 1:
            raise ValueError(f"smallcnn: width must be a positive integer; got {width!r}")
        conv: type[nn.Module] = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        norm: type[nn.Module] = nn.BatchNorm2d if spatial_dims == 2 else nn.BatchNorm3d
        pool: type[nn.Module] = nn.MaxPool2d if spatial_dims == 2 else nn.MaxPool3d
        gap: nn.Module = nn.AdaptiveAvgPool2d(1) if spatial_dims == 2 else nn.AdaptiveAvgPool3d(1)
        w = int(width)

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [conv(cin, cout, 3, padding=1, bias=False), norm(cout), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *block(in_channels, w),
            *block(w, w),
            pool(2, ceil_mode=True),
            *block(w, 2 * w),
            *block(2 * w, 2 * w),
            pool(2, ceil_mode=True),
            gap,
            nn.Flatten(),
        )
        self.head = nn.Sequential(
            nn.Linear(2 * w, 4 * w),
            nn.ReLU(inplace=True),
            nn.Dropout(float(dropout)),
            nn.Linear(4 * w, num_classes),
        )
        self.spatial_dims = spatial_dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def smallcnn(
    in_channels: int = 1,
    num_classes: int = 2,
    spatial_dims: int = 2,
    width: int = 32,
    dropout: float = 0.0,
) -> SmallCNN:
    """Build a :class:`SmallCNN`."""
    return SmallCNN(in_channels, num_classes, spatial_dims, width=width, dropout=dropout)
