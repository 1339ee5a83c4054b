"""Metrics of the evaluation engine against reference values and hand computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medrobust.evaluation import EvaluationError, parse_budgets
from medrobust.evaluation.metrics import (
    Proportion,
    auc_medmnist,
    bootstrap_auc_ci,
    psnr,
    ssim,
    wilson_interval,
)


@pytest.mark.parametrize(
    ("k", "n", "lo", "hi"),
    [
        (8, 10, 0.4902, 0.9433),  # Newcombe (1998), Table I style reference values
        (0, 10, 0.0, 0.2775),
        (10, 10, 0.7225, 1.0),
        (81, 263, 0.2553, 0.3662),
    ],
)
def test_wilson_interval_reference_values(k: int, n: int, lo: float, hi: float) -> None:
    a, b = wilson_interval(k, n)
    assert a == pytest.approx(lo, abs=1e-4)
    assert b == pytest.approx(hi, abs=1e-4)


def test_wilson_empty_and_proportion_dict() -> None:
    assert all(math.isnan(v) for v in wilson_interval(0, 0))
    d = Proportion(3, 4).to_dict()
    assert d["value"] == 0.75 and d["k"] == 3 and d["n"] == 4
    assert d["ci_low"] < 0.75 < d["ci_high"]
    assert Proportion(0, 0).to_dict()["value"] is None


def _pairwise_auc(y: np.ndarray, s: np.ndarray) -> float:
    pos, neg = s[y], s[~y]
    wins = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg)
    return wins / (len(pos) * len(neg))


def test_auc_binary_equals_pairwise_count_with_ties() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 60)
    p1 = np.round(rng.random(60), 1)  # many ties
    probs = np.stack([1 - p1, p1], 1)
    assert auc_medmnist(y, probs, "binary") == pytest.approx(_pairwise_auc(y == 1, p1))


def test_auc_multiclass_is_mean_one_vs_rest() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 50)
    logits = rng.normal(size=(50, 3)) + np.eye(3)[y]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    want = np.mean([_pairwise_auc(y == c, probs[:, c]) for c in range(3)])
    assert auc_medmnist(y, probs, "multi-class") == pytest.approx(want)
    assert auc_medmnist(y, probs, "ordinal") == pytest.approx(want)
    # a class with no sample is left out of the mean instead of failing
    y2 = np.where(y == 2, 0, y)
    want2 = np.mean([_pairwise_auc(y2 == c, probs[:, c]) for c in range(2)])
    assert auc_medmnist(y2, probs, "multi-class") == pytest.approx(want2)


def test_bootstrap_auc_ci_is_reproducible_and_brackets_the_auc() -> None:
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 80)
    p1 = np.clip(0.3 * y + 0.7 * rng.random(80), 0, 1)
    probs = np.stack([1 - p1, p1], 1)
    a = bootstrap_auc_ci(y, probs, "binary", resamples=200, seed=3)
    b = bootstrap_auc_ci(y, probs, "binary", resamples=200, seed=3)
    assert a == b
    assert a[0] < auc_medmnist(y, probs, "binary") < a[1]


def test_psnr_by_hand() -> None:
    x = torch.full((2, 1, 4, 4), 0.5)
    adv = x.clone()
    adv[0] += 0.01
    out = psnr(x, adv, 1.0)
    assert out[0].item() == pytest.approx(40.0, abs=1e-4)
    assert math.isinf(out[1].item())
    # HU: the range of the bounds, not 1
    assert psnr(x * 100, adv * 100, 100.0)[0].item() == pytest.approx(40.0, abs=1e-3)


@pytest.mark.parametrize("shape", [(3, 1, 20, 24), (2, 3, 16, 16), (2, 1, 12, 12, 12)])
def test_ssim_matches_scikit_image(shape: tuple[int, ...]) -> None:
    metrics = pytest.importorskip("skimage.metrics", reason="scikit-image (test extra) missing")
    g = torch.Generator().manual_seed(0)
    x = torch.rand(shape, generator=g)
    y = (x + 0.1 * torch.randn(shape, generator=g)).clamp(0, 1)
    ours = ssim(x, y, 1.0)
    for i in range(shape[0]):
        ref = np.mean([
            metrics.structural_similarity(
                x[i, c].numpy().astype(np.float64), y[i, c].numpy().astype(np.float64),
                data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
            )
            for c in range(shape[1])
        ])
        assert ours[i].item() == pytest.approx(ref, abs=1e-5)
    assert ssim(x, x, 1.0).allclose(torch.ones(shape[0]))


def test_parse_budgets_fractions_and_numbers() -> None:
    b = parse_budgets("0, 0.5/255,8/255,1e-3,10")
    assert [x.value for x in b] == [0.0, 0.001, 0.5 / 255, 8 / 255, 10.0]
    assert [x.label for x in b][:4] == ["0", "1e-3", "0.5/255", "8/255"]
    assert [x.value for x in parse_budgets([4, "2", 4.0])] == [2.0, 4.0]


@pytest.mark.parametrize(
    "text", ["abc", "1/0", "-1", "1,,2", "", "__import__('os').system('true')", "8/255/2",
             "nan", "inf", "1e999"],
)
def test_parse_budgets_rejects_malformed(text: str) -> None:
    with pytest.raises(EvaluationError, match="eps"):
        parse_budgets(text)
