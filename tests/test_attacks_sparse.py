"""JSMA and One-Pixel: hand-made oracles, invariants, and real MedMNIST models.

Iterations and populations are cut for speed; the budgets (features, pixels) are asserted exactly.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

import medrobust as mr
from medrobust.attacks import ATTACKS, JSMA, OnePixel
from medrobust.attacks.sparse import best_pairs

# ----------------------------------------------------------------------------- helpers


class Linear(nn.Module):
    def __init__(self, w: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w)
        self.b = nn.Parameter(b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.w.T + self.b


class OnePixelSwitch(nn.Module):
    """Class 1 exactly when the pixel at ``pos`` (all channels) exceeds 0.8."""

    def __init__(self, pos: tuple[int, ...]) -> None:
        super().__init__()
        self.pos = pos
        self.scale = nn.Parameter(torch.tensor(20.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = x[(slice(None), slice(None), *self.pos)].mean(1)
        z = self.scale * (v - 0.8)
        return torch.stack([torch.zeros_like(z), z], 1)


def tiny_cnn(channels: int, classes: int, dims: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    conv = nn.Conv2d if dims == 2 else nn.Conv3d
    pool = nn.AdaptiveAvgPool2d(2) if dims == 2 else nn.AdaptiveAvgPool3d(2)
    bn = nn.BatchNorm2d(4) if dims == 2 else nn.BatchNorm3d(4)
    return nn.Sequential(conv(channels, 4, 3, padding=1), bn, nn.ReLU(), pool, nn.Flatten(),
                         nn.Dropout(0.1), nn.Linear(4 * 2 ** dims, classes))


def check_invariants(attack_factory, dims: int, bounds=(-1.0, 2.0), targeted=False) -> None:
    """Bounds, mask, inputs untouched, model mode / flags / no .grad, seed reproducibility,
    success agreeing with the predictions."""
    g = torch.Generator().manual_seed(dims)
    spatial = (6, 7) if dims == 2 else (4, 5, 3)
    net = tiny_cnn(2, 3, dims)
    net.train()
    net[0].weight.requires_grad_(False)
    model = mr.Classifier(net, bounds=bounds)
    lo, hi = bounds
    x = lo + (hi - lo) * torch.rand((4, 2) + spatial, generator=g)
    x[0, 0].fill_(hi)  # some elements on the bounds
    x[1, 1].fill_(lo)
    y = torch.tensor([0, 1, 2, 0])
    target = torch.tensor([1, 2, 0, 2]) if targeted else None
    mask = (torch.rand((4, 1) + spatial, generator=g) < 0.5).float()
    x0 = x.clone()
    r1 = attack_factory()(model, x, y, target=target, mask=mask)
    r2 = attack_factory()(model, x, y, target=target, mask=mask)
    assert torch.equal(x, x0)
    assert net.training and net[2].training  # mode restored
    assert not net[0].weight.requires_grad and net[0].bias.requires_grad
    assert all(p.grad is None for p in net.parameters())
    assert torch.equal(r1.adversarial, r2.adversarial)  # same seed, bit-identical
    adv = r1.adversarial
    assert adv.shape == x.shape and adv.dtype == x.dtype
    assert float(adv.min()) >= lo and float(adv.max()) <= hi
    outside = (mask.expand_as(x) == 0) & (adv != x)
    assert not outside.any()
    with torch.no_grad():
        pred = model.predict(adv)
    assert torch.equal(pred, r1.predictions)
    goal = (pred == target) if targeted else (pred != y)
    assert torch.equal(goal, r1.success)


# -------------------------------------------------------------------------------- JSMA
def test_best_pairs_matches_brute_force() -> None:
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        m, d = 3, 3 + trial % 9
        a, b = torch.randn(m, d, generator=g), torch.randn(m, d, generator=g)
        dom = torch.rand(m, d, generator=g) < 0.8
        for increase in (True, False):
            p, q, found = best_pairs(a, b, dom, increase, max_elements=7)  # many blocks
            for i in range(m):
                best, pair = 0.0, None
                for u, v in itertools.combinations(range(d), 2):
                    if not (dom[i, u] and dom[i, v]):
                        continue
                    big_a, big_b = float(a[i, u] + a[i, v]), float(b[i, u] + b[i, v])
                    ok = big_a > 0 > big_b if increase else big_a < 0 < big_b
                    if ok and -big_a * big_b > best:
                        best, pair = -big_a * big_b, {u, v}
                assert bool(found[i]) == (pair is not None)
                if pair is not None:
                    assert {int(p[i]), int(q[i])} == pair


def test_jsma_linear_oracle_picks_most_salient_pair() -> None:
    """On an affine model the forward derivative is the weight matrix: one iteration of JSMA
    (gamma = 2 / d) must set exactly the pair with the largest saliency to the upper bound."""
    torch.manual_seed(1)
    d, k = 12, 3
    w = torch.randn(k, d)
    model = mr.Classifier(Linear(w, torch.tensor([50.0, 0.0, 0.0])), bounds=(0.0, 1.0))
    x = torch.full((1, 1, 3, 4), 0.5)
    y = torch.tensor([0])
    t = torch.tensor([2])
    res = JSMA(theta=1.0, gamma=2 / d, fallback=False)(model, x, y, target=t)
    alpha, beta = w[2], w[0] + w[1]
    best, pair = 0.0, None
    for u, v in itertools.combinations(range(d), 2):
        big_a, big_b = float(alpha[u] + alpha[v]), float(beta[u] + beta[v])
        if big_a > 0 > big_b and -big_a * big_b > best:
            best, pair = -big_a * big_b, {u, v}
    assert pair is not None
    changed = (res.adversarial != x).flatten().nonzero().flatten().tolist()
    assert set(changed) == pair
    assert torch.all(res.adversarial.flatten()[changed] == 1.0)
    # the decreasing variant sets its pair to the lower bound
    res = JSMA(theta=-1.0, gamma=2 / d, fallback=False)(model, x, y, target=t)
    changed = (res.adversarial != x).flatten().nonzero().flatten()
    assert changed.numel() in (0, 2) and torch.all(res.adversarial.flatten()[changed] == 0.0)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("targeted", [False, True])
def test_jsma_invariants(dims: int, targeted: bool) -> None:
    check_invariants(lambda: JSMA(gamma=0.3), dims, targeted=targeted)


def test_jsma_registry_and_validation() -> None:
    assert ATTACKS["jsma"] is JSMA and ATTACKS["onepixel"] is OnePixel
    JSMA()
    OnePixel()
    with pytest.raises(ValueError):
        JSMA(theta=0.0)
    with pytest.raises(ValueError):
        JSMA(gamma=0.0)
    with pytest.raises(ValueError):
        OnePixel(pixels=0)
    with pytest.raises(ValueError):
        OnePixel(crossover=1.5)


def test_jsma_pneumonia_budget(pneumonia_model) -> None:
    tm = pneumonia_model
    assert tm.clean_accuracy >= tm.majority_rate + 0.10
    x, y = tm.x[:24], tm.y[:24]
    gamma = 0.05
    res = JSMA(theta=1.0, gamma=gamma)(tm.model, x, y)
    d = x[0].numel()
    budget = 2 * math.floor(d * gamma / 2)
    assert int(res.perturbation_norms["l0"].max()) <= budget <= gamma * d
    assert torch.all(res.perturbation_norms["pixels"] <= res.perturbation_norms["l0"])
    print(f"JSMA pneumonia success {res.success_rate:.2f}, median l0 "
          f"{float(res.perturbation_norms['l0'][res.success].float().median()):.0f}")
    assert res.success_rate > 0


def test_jsma_retina_targeted(retina_model) -> None:
    tm = retina_model
    assert tm.clean_accuracy >= tm.majority_rate + 0.10
    idx = torch.arange(0, 100, 5)  # 4 per grade
    x, y = tm.x[idx], tm.y[idx]
    t = (y + 1) % 5
    gamma = 0.1
    res = JSMA(theta=1.0, gamma=gamma)(tm.model, x, y, target=t)
    assert int(res.perturbation_norms["l0"].max()) <= gamma * x[0].numel()
    print(f"JSMA retina targeted success {res.success_rate:.2f}")
    assert torch.equal(res.success, res.predictions == t)
    assert res.success_rate >= 0.5


# ----------------------------------------------------------------------------- One-Pixel
@pytest.mark.parametrize("dims", [2, 3])
def test_onepixel_oracle_finds_the_pixel(dims: int) -> None:
    pos = (3, 5) if dims == 2 else (1, 3, 2)
    spatial = (8, 8) if dims == 2 else (4, 6, 4)
    model = mr.Classifier(OnePixelSwitch(pos), bounds=(0.0, 1.0))
    x = torch.zeros((3, 2) + spatial)
    y = torch.zeros(3, dtype=torch.long)
    res = OnePixel(pixels=1, population=60, generations=30, seed=0)(model, x, y)
    assert res.success.all()
    assert torch.all(res.perturbation_norms["pixels"] == 1)
    changed = (res.adversarial != x).any(1)
    assert torch.all(changed[(slice(None), *pos)])


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("targeted", [False, True])
def test_onepixel_invariants(dims: int, targeted: bool) -> None:
    check_invariants(lambda: OnePixel(pixels=2, population=12, generations=3, seed=5), dims,
                     targeted=targeted)


def test_onepixel_crossover_runs() -> None:
    model = mr.Classifier(OnePixelSwitch((2, 2)), bounds=(0.0, 1.0))
    x = torch.zeros(2, 1, 5, 5)
    res = OnePixel(population=20, generations=20, crossover=0.7, seed=1)(
        model, x, torch.zeros(2, dtype=torch.long))
    assert res.success.all() and torch.all(res.perturbation_norms["pixels"] <= 1)


def test_onepixel_pneumonia(pneumonia_model) -> None:
    tm = pneumonia_model
    assert tm.clean_accuracy >= tm.majority_rate + 0.10
    x, y = tm.x[:32], tm.y[:32]
    k = 3
    res = OnePixel(pixels=k, population=60, generations=10, seed=0)(tm.model, x, y)
    assert torch.all(res.perturbation_norms["pixels"] <= k)
    print(f"One-Pixel (k={k}) pneumonia success {res.success_rate:.2f}")
    assert res.success_rate > 0


def test_onepixel_retina_targeted(retina_model) -> None:
    tm = retina_model
    assert tm.clean_accuracy >= tm.majority_rate + 0.10
    x, y = tm.x[::5], tm.y[::5]
    # the target: the runner-up class of the clean prediction (a reachable one)
    with torch.no_grad():
        logits = tm.model.logits(x)
    t = logits.scatter(1, y[:, None], float("-inf")).argmax(1)
    k = 5
    res = OnePixel(pixels=k, population=60, generations=10, seed=0)(tm.model, x, y, target=t)
    assert torch.all(res.perturbation_norms["pixels"] <= k)
    assert torch.equal(res.success, res.predictions == t)
    print(f"One-Pixel (k={k}) retina targeted success {res.success_rate:.2f}")
    assert res.success.any()
