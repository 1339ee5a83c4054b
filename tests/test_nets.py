"""Reference networks: output shapes in 2D and 3D, registry errors, recorded architecture."""

from __future__ import annotations

import pytest
import torch

from medrobust.nets import NETWORKS, build_network, network_names

CLASSIFIERS_2D = ["smallcnn", "resnet18", "resnet34", "resnet50"]
CLASSIFIERS_3D = ["smallcnn", "resnet18", "resnet50", "resnet18_3d", "resnet50_3d"]
# Big networks are built and run on the "meta" device: shapes are computed, no arithmetic is done,
# so the shape checks of 25-46 M parameter networks take milliseconds.
REAL = {"smallcnn", "resnet18"}


def _device(name: str, dims: int) -> str:
    return "cpu" if name in REAL and dims == 2 else "meta"


@pytest.mark.parametrize("name", CLASSIFIERS_2D)
def test_2d_classifier_shapes(name: str) -> None:
    dev = _device(name, 2)
    with torch.device(dev):
        net = build_network(name, in_channels=3, num_classes=5, spatial_dims=2).eval()
    with torch.no_grad():
        assert net(torch.rand(2, 3, 28, 28, device=dev)).shape == (2, 5)


@pytest.mark.parametrize("name", CLASSIFIERS_3D)
def test_3d_classifier_shapes(name: str) -> None:
    kw = {} if name.endswith("_3d") else {"spatial_dims": 3}
    dev = _device(name, 3)
    with torch.device(dev):
        net = build_network(name, in_channels=1, num_classes=2, **kw).eval()
    with torch.no_grad():
        assert net(torch.rand(2, 1, 28, 28, 28, device=dev)).shape == (2, 2)


def test_smallcnn_3d_runs_for_real() -> None:
    net = build_network("smallcnn", in_channels=1, num_classes=2, spatial_dims=3, width=8).eval()
    with torch.no_grad():
        out = net(torch.rand(2, 1, 12, 12, 12))
    assert out.shape == (2, 2) and torch.isfinite(out).all()


@pytest.mark.parametrize(("name", "dims"), [("unet", 2), ("unet", 3), ("unet_3d", 3)])
def test_unet_shapes(name: str, dims: int) -> None:
    kw = {"spatial_dims": dims} if name == "unet" else {}
    net = build_network(name, in_channels=1, num_classes=3, **kw).eval()
    x = torch.rand(2, 1, *([16] * dims))
    with torch.no_grad():
        assert net(x).shape == (2, 3, *([16] * dims))


@pytest.mark.parametrize("shape", [(1, 1, 17, 30), (1, 1, 11, 15, 9)])
def test_unet_takes_any_size_and_keeps_monai_weights(shape: tuple[int, ...]) -> None:
    """Sizes not divisible by the total stride (the hippocampus volumes, e.g. 43x59x47) give
    logits of the input's size; on divisible sizes the output is MONAI's UNet's, same weights."""
    from monai.networks.nets import UNet

    dims = len(shape) - 2
    net = build_network("unet", in_channels=1, num_classes=3, spatial_dims=dims).eval()
    x = torch.rand(*shape, requires_grad=True)
    out = net(x)
    assert out.shape == (1, 3, *shape[2:])
    out.sum().backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all()) and x.grad.abs().sum() > 0
    plain = UNet(dims, 1, 3, [16, 32, 64], [2, 2], num_res_units=2, norm="batch").eval()
    plain.load_state_dict(net.state_dict())
    even = torch.rand(1, 1, *([12] * dims))
    with torch.no_grad():
        assert torch.equal(net(even), plain(even))


def test_resnet18_is_the_medmnist_28px_variant() -> None:
    with torch.device("meta"):
        net = build_network("resnet18", in_channels=1, num_classes=2)
    conv1 = net.conv1
    assert conv1.kernel_size == (3, 3) and conv1.stride == (1, 1)
    assert net.no_max_pool  # MONAI skips the stem's max pooling in forward
    seen = []
    net.layer1.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    with torch.no_grad():
        net.eval()(torch.rand(1, 1, 28, 28, device="meta"))
    assert seen == [(1, 64, 28, 28)]  # the first residual stage sees the full 28x28 image
    # 11.2 M parameters, as a ResNet-18 with a 1-channel 3x3 stem and 2 outputs has
    assert 11_000_000 < sum(p.numel() for p in net.parameters()) < 11_300_000


def test_smallcnn_accepts_other_sizes_and_width() -> None:
    net = build_network("smallcnn", in_channels=1, num_classes=2, width=8).eval()
    with torch.no_grad():
        assert net(torch.rand(1, 1, 45, 37)).shape == (1, 2)


def test_architecture_is_recorded_with_defaults() -> None:
    net = build_network("smallcnn", in_channels=2, num_classes=4)
    arch = net.medrobust_architecture
    assert arch["name"] == "smallcnn"
    assert arch["args"] == {"in_channels": 2, "num_classes": 4, "spatial_dims": 2, "width": 32,
                            "dropout": 0.0}
    again = build_network(arch["name"], **arch["args"])
    assert [p.shape for p in again.parameters()] == [p.shape for p in net.parameters()]


def test_registry_errors() -> None:
    assert set(network_names()) == set(NETWORKS)
    with pytest.raises(KeyError, match="unknown network 'vgg'.*smallcnn"):
        build_network("vgg")
    with pytest.raises(ValueError, match="unknown argument.*depth"):
        build_network("resnet18", depth=3)
    with pytest.raises(ValueError, match="spatial_dims must be 3"):
        build_network("resnet18_3d", spatial_dims=2)
    with pytest.raises(ValueError, match="in_channels"):
        build_network("smallcnn", in_channels=0)
    with pytest.raises(ValueError, match="spatial_dims must be 2 or 3"):
        build_network("unet", spatial_dims=4)
