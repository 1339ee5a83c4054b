"""Reference networks and their registry.

``build_network(name, in_channels=..., num_classes=..., spatial_dims=...)`` builds any network in
:data:`NETWORKS`. The module it returns remembers how it was built (``medrobust_architecture``), so
:func:`medrobust.modelstore.save_model` can record the architecture without being told.

Networks:

* ``smallcnn``: a small, fast CNN (2D or 3D), for tests, demos and quick experiments.
* ``resnet18`` / ``resnet50`` (and ``resnet18_3d`` / ``resnet50_3d``): He et al., "Deep Residual
  Learning for Image Recognition", CVPR 2016, adapted to 28-pixel inputs as in the MedMNIST v2
  benchmark (Yang et al., Scientific Data 2023): a 3x3 stem convolution with stride 1 and no max
  pooling. Built with MONAI's :class:`monai.networks.nets.ResNet`.
* ``unet`` / ``unet_3d``: MONAI's :class:`monai.networks.nets.UNet` (Ronneberger et al., MICCAI
  2015, with residual units after Kerfoot et al., 2018) for segmentation, ``num_classes`` output
  channels.
"""

from __future__ import annotations

from medrobust.nets.registry import NETWORKS, NetworkSpec, build_network, network_names
from medrobust.nets.resnet import resnet18, resnet18_3d, resnet34, resnet50, resnet50_3d
from medrobust.nets.smallcnn import SmallCNN, smallcnn
from medrobust.nets.unet import unet, unet_3d

__all__ = [
    "NETWORKS",
    "NetworkSpec",
    "SmallCNN",
    "build_network",
    "network_names",
    "resnet18",
    "resnet18_3d",
    "resnet34",
    "resnet50",
    "resnet50_3d",
    "smallcnn",
    "unet",
    "unet_3d",
]
