"""The registry of reference networks: ``build_network(name, **kwargs)``."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from medrobust.nets.resnet import resnet18, resnet18_3d, resnet34, resnet50, resnet50_3d
from medrobust.nets.smallcnn import smallcnn
from medrobust.nets.unet import unet, unet_3d
from medrobust.nets.vit import vit


@dataclass(frozen=True)
class NetworkSpec:
    """A registered network: its builder, task and default spatial dimensionality."""

    name: str
    builder: Callable[..., nn.Module]
    task: str  # "classification" or "segmentation"
    spatial_dims: int | None  # None: 2 or 3 via the ``spatial_dims`` argument
    description: str

    def __call__(self, **kwargs: Any) -> nn.Module:
        return self.builder(**kwargs)

    def parameters(self) -> list[str]:
        """The keyword arguments the builder accepts."""
        return list(inspect.signature(self.builder).parameters)


NETWORKS: dict[str, NetworkSpec] = {
    spec.name: spec
    for spec in (
        NetworkSpec("smallcnn", smallcnn, "classification", None, "small fast CNN, 2D or 3D"),
        NetworkSpec("resnet18", resnet18, "classification", None, "ResNet-18, MedMNIST 28-px stem"),
        NetworkSpec("resnet34", resnet34, "classification", None, "ResNet-34, MedMNIST 28-px stem"),
        NetworkSpec("resnet50", resnet50, "classification", None, "ResNet-50, MedMNIST 28-px stem"),
        NetworkSpec("resnet18_3d", resnet18_3d, "classification", 3, "3D ResNet-18 for volumes"),
        NetworkSpec("resnet50_3d", resnet50_3d, "classification", 3, "3D ResNet-50 for volumes"),
        NetworkSpec("vit", vit, "classification", None,
                    "MONAI vision transformer (4-px patches, 6 layers), 2D or 3D"),
        NetworkSpec("unet", unet, "segmentation", None, "MONAI UNet, 2D or 3D"),
        NetworkSpec("unet_3d", unet_3d, "segmentation", 3, "MONAI UNet, 3D"),
    )
}


def network_names() -> list[str]:
    """The names :func:`build_network` accepts."""
    return sorted(NETWORKS)


def build_network(name: str, **kwargs: Any) -> nn.Module:
    """Build the registered network ``name``.

    Common arguments: ``in_channels``, ``num_classes``, ``spatial_dims`` (2 or 3); some networks
    take more (``width`` for ``smallcnn``, ``channels`` for ``unet``). The returned module carries
    ``medrobust_architecture = {"name": ..., "args": {...}}`` so that it can be saved and rebuilt.

    Raises:
        KeyError: ``name`` is not registered (the message lists the known names).
        ValueError: an argument is invalid or unknown to this network.
    """
    key = str(name).lower()
    if key not in NETWORKS:
        raise KeyError(f"unknown network {name!r}; known networks: {', '.join(network_names())}")
    spec = NETWORKS[key]
    allowed = spec.parameters()
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(
            f"{key}: unknown argument(s) {', '.join(unknown)}; it accepts {', '.join(allowed)}"
        )
    module = spec(**kwargs)
    # Record every argument (defaults included) so the saved model does not depend on defaults.
    bound = inspect.signature(spec.builder).bind(**kwargs)
    bound.apply_defaults()
    args = {k: (list(v) if isinstance(v, tuple) else v) for k, v in bound.arguments.items()}
    setattr(module, "medrobust_architecture", {"name": key, "args": args})  # noqa: B010
    return module
