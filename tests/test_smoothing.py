"""Randomized smoothing (Cohen et al., ICML 2019): certify, predict, and the radius holds."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import load_npz_split

import medrobust as mr
from medrobust.attacks.gradient import PGD
from medrobust.data.base import ImageData
from medrobust.defenses import DefenseError
from medrobust.defenses.smoothing import (
    ABSTAIN,
    SmoothedClassifier,
    clopper_pearson_lower,
    gaussian_noise_generator,
)
from medrobust.nets import smallcnn
from medrobust.training import seeded, train

torch.set_num_threads(1)
SIGMA = 0.25


def test_clopper_pearson_closed_forms() -> None:
    # all successes: the one-sided lower bound solves p^n = alpha
    assert math.isclose(clopper_pearson_lower(100, 100, 0.001), 0.001 ** (1 / 100), rel_tol=1e-9)
    assert clopper_pearson_lower(0, 50, 0.05) == 0.0
    lows = [clopper_pearson_lower(k, 100, 0.01) for k in (50, 70, 90)]
    assert lows == sorted(lows)
    assert all(lo < k / 100 for lo, k in zip(lows, (50, 70, 90), strict=True))


@pytest.fixture(scope="module")
def smoothed(data_dir):  # type: ignore[no-untyped-def]
    x, y = load_npz_split(data_dir / "pneumoniamnist.npz", "train")
    data = ImageData(x[:1536], y[:1536], (0.0, 1.0), "intensity", "binary", ["normal", "pneu"])
    with seeded(0):
        net = smallcnn(1, 2, width=8)
    train(net, data, epochs=3, batch_size=64, lr=2e-3, schedule="none", seed=0,
          example_generator=gaussian_noise_generator(SIGMA, seed=0), progress=False)
    net.eval()
    xt, yt = load_npz_split(data_dir / "pneumoniamnist.npz", "test")
    g = torch.Generator().manual_seed(1)
    idx = torch.randperm(len(xt), generator=g)[:24]
    return SmoothedClassifier(mr.Classifier(net, num_classes=2), SIGMA, seed=0), xt[idx], yt[idx]


def test_certify_is_reproducible_and_curve_is_monotone(smoothed):  # type: ignore[no-untyped-def]
    sc, x, y = smoothed
    cert = sc.certify(x, n0=32, n=400, alpha=0.01)
    again = SmoothedClassifier(sc.model, SIGMA, seed=0).certify(x, n0=32, n=400, alpha=0.01)
    assert torch.equal(cert.prediction, again.prediction) and torch.equal(cert.radius, again.radius)
    abstain = cert.prediction == ABSTAIN
    assert torch.all(cert.radius[abstain] == 0) and torch.all(cert.radius[~abstain] > 0)
    # radius = sigma * Phi^-1(pA_lower), pA_lower > 1/2 for every certified sample
    from scipy.stats import norm

    ok = ~abstain
    assert torch.allclose(cert.radius[ok], SIGMA * torch.tensor(norm.ppf(cert.p_lower[ok])))
    curve = cert.certified_accuracy(y, [0.0, 0.1, 0.25, 0.5])
    assert curve == sorted(curve, reverse=True)
    assert curve[0] == float(((cert.prediction == y) & ok).float().mean())
    print(f"certified accuracy at 0/0.1/0.25/0.5: {curve}; abstentions {cert.abstentions}/24")
    assert curve[0] >= 0.5  # the noise-trained model classifies most inputs under noise
    with pytest.raises(DefenseError, match="alpha must be in"):
        sc.certify(x, alpha=0.0)


def test_certified_radius_holds_against_pgd_l2(smoothed):  # type: ignore[no-untyped-def]
    sc, x, y = smoothed
    cert = sc.certify(x, n0=32, n=400, alpha=0.01)
    ok = (cert.prediction != ABSTAIN).nonzero().flatten()
    assert ok.numel() >= 8
    xc, c = x[ok], cert.prediction[ok]
    eps = (0.9 * cert.radius[ok]).float()  # an attack inside every certified radius
    attack = PGD(eps, norm="l2", steps=10, eot=8, seed=0)
    res = attack(sc.as_model(votes=16), xc, c)
    assert torch.all(res.perturbation_norms["l2"] <= eps * (1 + 1e-4) + 1e-6)
    pred = SmoothedClassifier(sc.model, SIGMA, seed=1).predict(res.adversarial, n=400, alpha=0.01)
    broken = (pred != c) & (pred != ABSTAIN)
    print(f"{ok.numel()} certified; PGD-L2 inside the radius: {int(res.success.sum())} flip the "
          f"vote of 16 draws, {int(broken.sum())} change PREDICT, "
          f"{int((pred == ABSTAIN).sum())} abstain")
    assert not broken.any()
