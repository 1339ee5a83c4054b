"""ResNets for small medical images, as in the MedMNIST v2 benchmark.

He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition", CVPR 2016. MedMNIST v2
(Yang et al., Scientific Data 10, 41, 2023) trains ResNet-18/50 on 28-pixel inputs with the 7x7,
stride-2 stem replaced by a 3x3, stride-1 convolution and without the stem's max pooling, so that
the 28x28 image is not reduced to 7x7 before the first residual stage. The 3D variants use the same
adaptation with 3D convolutions. Built with MONAI's :class:`monai.networks.nets.ResNet`
(``conv1_t_size=3, conv1_t_stride=1, no_max_pool=True``).
"""

from __future__ import annotations

from monai.networks.nets import ResNet

from medrobust.nets._common import check_args

_PLANES = [64, 128, 256, 512]


def _resnet(
    name: str,
    block: str,
    layers: list[int],
    in_channels: int,
    num_classes: int,
    spatial_dims: int,
) -> ResNet:
    check_args(name, in_channels, num_classes, spatial_dims)
    return ResNet(
        block=block,
        layers=layers,
        block_inplanes=list(_PLANES),
        spatial_dims=spatial_dims,
        n_input_channels=in_channels,
        conv1_t_size=3,
        conv1_t_stride=1,
        no_max_pool=True,
        num_classes=num_classes,
    )


def resnet18(in_channels: int = 1, num_classes: int = 2, spatial_dims: int = 2) -> ResNet:
    """ResNet-18 (He et al. 2016) with the MedMNIST v2 28-px stem (3x3, stride 1, no max-pool)."""
    return _resnet("resnet18", "basic", [2, 2, 2, 2], in_channels, num_classes, spatial_dims)


def resnet34(in_channels: int = 1, num_classes: int = 2, spatial_dims: int = 2) -> ResNet:
    """ResNet-34 (He et al. 2016) with the MedMNIST v2 28-px stem."""
    return _resnet("resnet34", "basic", [3, 4, 6, 3], in_channels, num_classes, spatial_dims)


def resnet50(in_channels: int = 1, num_classes: int = 2, spatial_dims: int = 2) -> ResNet:
    """ResNet-50 (He et al. 2016, bottleneck blocks) with the MedMNIST v2 28-px stem."""
    return _resnet("resnet50", "bottleneck", [3, 4, 6, 3], in_channels, num_classes, spatial_dims)


def _only_3d(name: str, spatial_dims: int) -> None:
    if spatial_dims != 3:
        raise ValueError(f"{name} is a 3D network; spatial_dims must be 3, got {spatial_dims!r}")


def resnet18_3d(in_channels: int = 1, num_classes: int = 2, spatial_dims: int = 3) -> ResNet:
    """3D ResNet-18 for volumes (MedMNIST v2 3D benchmark), 3x3x3 stride-1 stem, no max-pool."""
    _only_3d("resnet18_3d", spatial_dims)
    return _resnet("resnet18_3d", "basic", [2, 2, 2, 2], in_channels, num_classes, 3)


def resnet50_3d(in_channels: int = 1, num_classes: int = 2, spatial_dims: int = 3) -> ResNet:
    """3D ResNet-50 for volumes (MedMNIST v2 3D benchmark), 3x3x3 stride-1 stem, no max-pool."""
    _only_3d("resnet50_3d", spatial_dims)
    return _resnet("resnet50_3d", "bottleneck", [3, 4, 6, 3], in_channels, num_classes, 3)
