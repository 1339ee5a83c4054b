"""Closed-form oracles for the gradient attacks on a binary affine classifier.

For f(x) = w.x + b (one logit, a sigmoid model) the minimal perturbation that reaches the decision
boundary has L-inf norm |f(x)| / ||w||_1 and L2 norm |f(x)| / ||w||_2. Inputs lie far inside the
bounds, so clipping never acts, and a budget 2% above the distance must flip every sample while 2%
below must flip none.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import medrobust as mr
from medrobust.attacks import BIM, FGSM, MIFGSM, PGD


def affine_problem(n: int = 64, shape: tuple[int, ...] = (1, 6, 6), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    d = int(torch.tensor(shape).prod())
    lin = nn.Linear(d, 1)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(1, d, generator=g))
        lin.bias.copy_(torch.randn(1, generator=g) * 0.1)
    module = nn.Sequential(nn.Flatten(), lin)
    model = mr.Classifier(module, bounds=(-100.0, 100.0))
    x = torch.rand((n, *shape), generator=g) * 2 - 1
    with torch.no_grad():
        f = module(x).squeeze(1)
    y = (f > 0).long()  # the model's own decision: every sample starts correctly classified
    w = lin.weight.detach().flatten()
    return model, x, y, f.abs(), w


@pytest.mark.parametrize("shape", [(1, 6, 6), (2, 10), (1, 3, 4, 4)])
def test_fgsm_linf_flips_exactly_at_the_minimal_distance(shape):
    model, x, y, margin, w = affine_problem(shape=shape)
    dist = margin / w.abs().sum()
    above = FGSM(eps=dist * 1.02)(model, x, y)
    below = FGSM(eps=dist * 0.98)(model, x, y)
    assert above.success.all()
    assert not below.success.any()
    # 1e-6: float32 rounding of x + delta
    assert torch.all(above.perturbation_norms["linf"] <= dist * 1.02 + 1e-6)


@pytest.mark.parametrize("random_start", [False, True])
def test_pgd_l2_flips_exactly_at_the_minimal_distance(random_start):
    model, x, y, margin, w = affine_problem()
    dist = margin / w.norm()
    kw = dict(norm="l2", steps=40, rel_step_size=0.25, random_start=random_start, seed=0)
    above = PGD(eps=dist * 1.02, **kw)(model, x, y)
    below = PGD(eps=dist * 0.98, **kw)(model, x, y)
    assert above.success.all()
    assert not below.success.any()
    assert torch.all(above.perturbation_norms["l2"] <= dist * 1.02 + 1e-5)


@pytest.mark.parametrize("attack_cls", [BIM, PGD, MIFGSM])
def test_iterative_linf_attacks_meet_the_oracle(attack_cls):
    model, x, y, margin, w = affine_problem(seed=3)
    dist = margin / w.abs().sum()
    assert attack_cls(eps=dist * 1.02, seed=1)(model, x, y).success.all()
    assert not attack_cls(eps=dist * 0.98, seed=1)(model, x, y).success.any()


def test_pgd_l1_reaches_the_oracle():
    # Minimal L1 distance to an affine boundary: |f| / ||w||_inf (all mass on the largest weight).
    model, x, y, margin, w = affine_problem(n=32, seed=5)
    dist = margin / w.abs().max()
    above = PGD(eps=dist * 1.02, norm="l1", steps=60, l1_sparsity=0.01, seed=0)(model, x, y)
    below = PGD(eps=dist * 0.98, norm="l1", steps=60, l1_sparsity=0.01, seed=0)(model, x, y)
    assert above.success.all()
    assert not below.success.any()


def test_targeted_fgsm_on_affine_binary_model_is_the_untargeted_flip():
    model, x, y, margin, w = affine_problem(seed=7)
    dist = margin / w.abs().sum()
    res = FGSM(eps=dist * 1.02)(model, x, y, target=1 - y)
    assert res.success.all()
    assert torch.equal(res.predictions, 1 - y)
