"""stAdv: the warp and the flow loss against closed forms, invariants, real MedMNIST models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import medrobust as mr
from medrobust.attacks import ATTACKS, StAdv
from medrobust.attacks.spatial import flow_loss, warp


def tiny_cnn(channels: int, classes: int, dims: int) -> nn.Module:
    torch.manual_seed(0)
    conv = nn.Conv2d if dims == 2 else nn.Conv3d
    pool = nn.AdaptiveAvgPool2d(2) if dims == 2 else nn.AdaptiveAvgPool3d(2)
    bn = nn.BatchNorm2d(4) if dims == 2 else nn.BatchNorm3d(4)
    return nn.Sequential(conv(channels, 4, 3, padding=1), bn, nn.ReLU(), pool, nn.Flatten(),
                         nn.Dropout(0.1), nn.Linear(4 * 2 ** dims, classes))


@pytest.mark.parametrize("dims", [2, 3])
def test_warp_integer_flow_is_a_shift(dims: int) -> None:
    spatial = (5, 6) if dims == 2 else (4, 5, 6)
    x = torch.rand((2, 3) + spatial)
    for axis in range(dims):
        flow = torch.zeros((2, dims) + spatial)
        flow[:, axis] = 1.0  # x_adv(p) = x(p + e_axis)
        out = warp(x, flow)
        n = spatial[axis]
        src = x.narrow(2 + axis, 1, n - 1)
        assert torch.allclose(out.narrow(2 + axis, 0, n - 1), src, atol=1e-6)
        # past the border: the border value
        assert torch.allclose(out.narrow(2 + axis, n - 1, 1), x.narrow(2 + axis, n - 1, 1),
                              atol=1e-6)
    half = torch.zeros((2, dims) + spatial)
    half[:, 0] = 0.5
    mid = 0.5 * (x.narrow(2, 0, spatial[0] - 1) + x.narrow(2, 1, spatial[0] - 1))
    assert torch.allclose(warp(x, half).narrow(2, 0, spatial[0] - 1), mid, atol=1e-6)


def test_flow_loss_closed_form() -> None:
    eps = 1e-8
    flow = torch.zeros(1, 2, 3, 4)
    base = float(flow_loss(flow, eps))
    assert base == pytest.approx(4 * 12 * eps ** 0.5, rel=1e-4)  # 12 pixels x 4 neighbours
    flow[0, :, 1, 2] = torch.tensor([3.0, 4.0])  # one displaced pixel, |f| = 5
    # its 4 neighbour pairs are counted from both sides: 8 * 5
    assert float(flow_loss(flow, eps)) == pytest.approx(8 * 5.0 + 40 * eps ** 0.5, rel=1e-6)
    const = torch.full((1, 3, 2, 3, 4), 0.7)  # a uniform flow costs nothing (3D, 6 neighbours)
    assert float(flow_loss(const, eps)) == pytest.approx(6 * 24 * eps ** 0.5, rel=1e-4)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("targeted", [False, True])
@pytest.mark.parametrize("optimizer", ["lbfgs", "adam"])
def test_stadv_invariants(dims: int, targeted: bool, optimizer: str) -> None:
    g = torch.Generator().manual_seed(dims)
    spatial = (6, 7) if dims == 2 else (4, 5, 3)
    net = tiny_cnn(2, 3, dims)
    net.train()
    net[0].weight.requires_grad_(False)
    model = mr.Classifier(net, bounds=(-1.0, 2.0))
    x = -1.0 + 3.0 * torch.rand((4, 2) + spatial, generator=g)
    x[0, 0].fill_(2.0)
    y = torch.tensor([0, 1, 2, 0])
    target = torch.tensor([1, 2, 0, 2]) if targeted else None
    mask = (torch.rand((4, 1) + spatial, generator=g) < 0.5).float()
    x0 = x.clone()
    attack = StAdv(steps=5, optimizer=optimizer, tau_retries=1)
    r1 = attack(model, x, y, target=target, mask=mask)
    r2 = attack(model, x, y, target=target, mask=mask)
    assert torch.equal(x, x0)
    assert net.training and not net[0].weight.requires_grad
    assert all(p.grad is None for p in net.parameters())
    assert torch.equal(r1.adversarial, r2.adversarial)
    adv = r1.adversarial
    assert float(adv.min()) >= -1.0 and float(adv.max()) <= 2.0
    assert not ((mask.expand_as(x) == 0) & (adv != x)).any()
    pred = model.predict(adv)
    assert torch.equal(pred, r1.predictions)
    goal = (pred == target) if targeted else (pred != y)
    assert torch.equal(goal, r1.success)
    assert r1.extra["flow"].shape == (4, dims) + spatial
    assert r1.extra["flow_max"].shape == (4,)
    # unsuccessful samples carry their best flow too; successful ones a consistent warp
    ok = r1.success & (mask.flatten(1).sum(1) > 0)
    for i in ok.nonzero().flatten().tolist():
        w = warp(x[i:i + 1], r1.extra["flow"][i:i + 1])
        re = x[i:i + 1] + mask[i:i + 1] * (w - x[i:i + 1])
        assert torch.allclose(re, adv[i:i + 1], atol=1e-5)


def test_stadv_registry_and_validation() -> None:
    assert ATTACKS["stadv"] is StAdv
    a = StAdv()
    assert a.tau == 0.05 and a.optimizer == "lbfgs"
    with pytest.raises(ValueError):
        StAdv(tau=-1.0)
    with pytest.raises(ValueError):
        StAdv(optimizer="sgd")


def test_stadv_pneumonia(pneumonia_model) -> None:
    tm = pneumonia_model
    assert tm.clean_accuracy >= tm.majority_rate + 0.10
    x, y = tm.x[:32], tm.y[:32]
    res = StAdv(steps=20)(tm.model, x, y)
    fm = res.extra["flow_max"][res.success]
    print(f"stAdv pneumonia success {res.success_rate:.2f}, median max flow "
          f"{float(fm.median()):.3f} px")
    assert res.success_rate >= 0.95
    assert float(fm.median()) < 3.0  # a small, smooth warp, not a wholesale shift


def test_stadv_retina_targeted(retina_model) -> None:
    tm = retina_model
    assert tm.clean_accuracy >= tm.majority_rate + 0.10
    x, y = tm.x[::5], tm.y[::5]
    t = (y + 1) % 5
    res = StAdv(steps=20)(tm.model, x, y, target=t)
    assert torch.equal(res.success, res.predictions == t)
    print(f"stAdv retina targeted success {res.success_rate:.2f}")
    assert res.success.any()
