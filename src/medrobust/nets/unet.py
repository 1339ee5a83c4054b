"""UNet for 2D and 3D segmentation, from MONAI.

Ronneberger, Fischer, Brox, "U-Net: Convolutional Networks for Biomedical Image Segmentation",
MICCAI 2015; MONAI's :class:`monai.networks.nets.UNet` with residual units (Kerfoot et al., "Left-
Ventricle Quantification Using Residual U-Net", STACOM 2018). The output has ``num_classes``
channels of per-pixel logits, the same spatial size as the input, whatever that size: inputs whose
sizes are not divisible by ``2 ** (len(channels) - 1)`` are padded (edge values repeated) up to the
next multiple and the logits cropped back (MONAI's UNet alone fails on such sizes, e.g. the
hippocampus volumes of the Medical Segmentation Decathlon).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.nets import UNet

from medrobust.nets._common import check_args


class PaddedUNet(UNet):  # type: ignore[misc]
    """MONAI's UNet that accepts any spatial size (pad to a multiple of the total stride, crop the
    logits back). Its parameters are named as MONAI's, so saved weights load unchanged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        multiple = 1
        for s in self.strides:
            multiple *= int(s)
        spatial = x.shape[2:]
        extra = [(-int(n)) % multiple for n in spatial]
        if not any(extra):
            return super().forward(x)  # type: ignore[no-any-return]
        pad: list[int] = []
        for e in reversed(extra):  # F.pad lists the last dimension first
            pad += [e // 2, e - e // 2]
        y = super().forward(F.pad(x, pad, mode="replicate"))
        index = [slice(None), slice(None)] + [slice(e // 2, e // 2 + int(n))
                                              for e, n in zip(extra, spatial, strict=True)]
        return y[tuple(index)]  # type: ignore[no-any-return]


def unet(
    in_channels: int = 1,
    num_classes: int = 2,
    spatial_dims: int = 2,
    channels: Sequence[int] = (16, 32, 64),
    num_res_units: int = 2,
) -> PaddedUNet:
    """A MONAI UNet with ``num_classes`` output channels (per-pixel logits)."""
    check_args("unet", in_channels, num_classes, spatial_dims)
    chans = [int(c) for c in channels]
    if len(chans) < 2 or any(c < 1 for c in chans):
        raise ValueError(f"unet: channels must be >= 2 positive integers; got {channels!r}")
    return PaddedUNet(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=num_classes,
        channels=chans,
        strides=[2] * (len(chans) - 1),
        num_res_units=int(num_res_units),
        norm="batch",
    )


def unet_3d(
    in_channels: int = 1,
    num_classes: int = 2,
    spatial_dims: int = 3,
    channels: Sequence[int] = (16, 32, 64),
    num_res_units: int = 2,
) -> PaddedUNet:
    """The 3D UNet (``spatial_dims=3``)."""
    if spatial_dims != 3:
        raise ValueError(f"unet_3d is a 3D network; spatial_dims must be 3, got {spatial_dims!r}")
    return unet(in_channels, num_classes, 3, channels=channels, num_res_units=num_res_units)
