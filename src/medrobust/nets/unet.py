"""UNet for 2D and 3D segmentation, from MONAI.

Ronneberger, Fischer, Brox, "U-Net: Convolutional Networks for Biomedical Image Segmentation",
MICCAI 2015; MONAI's :class:`monai.networks.nets.UNet` with residual units (Kerfoot et al., "Left-
Ventricle Quantification Using Residual U-Net", STACOM 2018). The output has ``num_classes``
channels of per-pixel logits, the same spatial size as the input. Each spatial size must be
divisible by ``2 ** (len(channels) - 1)`` (by 4 with the default channels).
"""

from __future__ import annotations

from collections.abc import Sequence

from monai.networks.nets import UNet

from medrobust.nets._common import check_args


def unet(
    in_channels: int = 1,
    num_classes: int = 2,
    spatial_dims: int = 2,
    channels: Sequence[int] = (16, 32, 64),
    num_res_units: int = 2,
) -> UNet:
    """A MONAI UNet with ``num_classes`` output channels (per-pixel logits)."""
    check_args("unet", in_channels, num_classes, spatial_dims)
    chans = [int(c) for c in channels]
    if len(chans) < 2 or any(c < 1 for c in chans):
        raise ValueError(f"unet: channels must be >= 2 positive integers; got {channels!r}")
    return UNet(
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
) -> UNet:
    """The 3D UNet (``spatial_dims=3``)."""
    if spatial_dims != 3:
        raise ValueError(f"unet_3d is a 3D network; spatial_dims must be 3, got {spatial_dims!r}")
    return unet(in_channels, num_classes, 3, channels=channels, num_res_units=num_res_units)
