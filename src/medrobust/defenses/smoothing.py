"""Certified robustness by randomized smoothing (Cohen, Rosenfeld & Kolter, "Certified Adversarial
Robustness via Randomized Smoothing", ICML 2019).

The smoothed classifier ``g(x) = argmax_c P(f(x + e) = c)``, ``e ~ N(0, sigma^2 I)``, is robust
within the L2 radius ``sigma * Phi^-1(pA)`` around ``x`` when the top class has probability ``pA``
(> 1/2) under noise. :meth:`SmoothedClassifier.certify` is the paper's CERTIFY: guess the top class
from ``n0`` noise draws, bound ``pA`` from below with a one-sided Clopper-Pearson interval from
``n`` further draws at level ``alpha``, and abstain when the bound is not above 1/2.
:meth:`SmoothedClassifier.predict` is PREDICT (two-sided binomial test, abstain when not
significant). Noise is added in the model's units (``sigma`` in the units of the bounds) and not
clipped, as the certificate requires. Train the base classifier with the same noise
(:func:`gaussian_noise_generator` plugged into :func:`medrobust.training.train`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from medrobust.defenses.base import DefenseError
from medrobust.defenses.transforms import GaussianNoise
from medrobust.models import Classifier

ABSTAIN = -1


@dataclass
class Certificate:
    """CERTIFY's answer per input: the class (``-1`` = abstain) and the certified L2 radius
    (0 when abstaining), with the lower confidence bound on ``pA``."""

    prediction: torch.Tensor
    radius: torch.Tensor
    p_lower: torch.Tensor

    def certified_accuracy(self, labels: torch.Tensor, radii: Sequence[float]) -> list[float]:
        """The fraction of inputs classified correctly with a certified radius ``>= r`` (Cohen et
        al.'s curve; abstentions count as errors)."""
        ok = self.prediction == labels.cpu()
        return [float((ok & (self.radius >= r)).float().mean()) for r in radii]

    @property
    def abstentions(self) -> int:
        return int((self.prediction == ABSTAIN).sum())


def clopper_pearson_lower(k: int, n: int, alpha: float) -> float:
    """One-sided ``1 - alpha`` lower confidence bound on a binomial proportion (``k`` of ``n``)."""
    from scipy.stats import beta

    return 0.0 if k == 0 else float(beta.ppf(alpha, k, n - k + 1))


class SmoothedClassifier:
    """A Gaussian-smoothed classifier around a base :class:`~medrobust.Classifier`.

    Args:
        model: the base classifier (its preprocessing and normalization are kept).
        sigma: the noise level, in the model's units.
        batch_size: noise draws evaluated at once.
        seed: the noise generator's seed (certificates are reproducible).
    """

    def __init__(self, model: Classifier, sigma: float, batch_size: int = 1000,
                 seed: int = 0) -> None:
        if not isinstance(model, Classifier) or model.multilabel:
            raise DefenseError("randomized smoothing needs a Classifier with class outputs")
        if not (sigma > 0 and math.isfinite(sigma)):
            raise DefenseError(f"sigma must be > 0 (in the model's units); got {sigma!r}")
        self.model, self.sigma, self.batch_size = model, float(sigma), int(batch_size)
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)

    @torch.no_grad()
    def _counts(self, x: torch.Tensor, num: int) -> torch.Tensor:
        """Class counts of ``f(x + e)`` over ``num`` noise draws for one input ``(C, ...)``."""
        counts: torch.Tensor | None = None
        left = num
        while left > 0:
            b = min(self.batch_size, left)
            noise = torch.randn((b, *x.shape), generator=self.generator)
            xb = x.unsqueeze(0).cpu() + self.sigma * noise
            logits = self.model.forward(xb.to(self.model.device, self.model.work_dtype))
            c = torch.bincount(logits.argmax(1).cpu(), minlength=logits.shape[1])
            counts = c if counts is None else counts + c
            left -= b
        assert counts is not None
        return counts

    def certify(self, x: torch.Tensor, n0: int = 100, n: int = 100_000,
                alpha: float = 0.001) -> Certificate:
        """Cohen et al.'s CERTIFY for every input of the batch ``x`` ``(N, C, ...)``."""
        self._check(x, n, alpha)
        if n0 < 1:
            raise DefenseError(f"n0 must be >= 1; got {n0!r}")
        preds, radii, lows = [], [], []
        with self.model.attack_mode():
            for xi in x:
                c_a = int(self._counts(xi, n0).argmax())
                n_a = int(self._counts(xi, n)[c_a])
                p_low = clopper_pearson_lower(n_a, n, alpha)
                lows.append(p_low)
                if p_low < 0.5:
                    preds.append(ABSTAIN)
                    radii.append(0.0)
                else:
                    from scipy.stats import norm

                    preds.append(c_a)
                    radii.append(self.sigma * float(norm.ppf(p_low)))
        return Certificate(torch.tensor(preds), torch.tensor(radii, dtype=torch.float64),
                           torch.tensor(lows, dtype=torch.float64))

    def predict(self, x: torch.Tensor, n: int = 1000, alpha: float = 0.001) -> torch.Tensor:
        """Cohen et al.'s PREDICT: the top class of ``n`` draws when a two-sided binomial test of
        the top two counts rejects equality at ``alpha``, else ``-1`` (abstain)."""
        from scipy.stats import binomtest

        self._check(x, n, alpha)
        out = []
        with self.model.attack_mode():
            for xi in x:
                counts = self._counts(xi, n)
                top2 = counts.topk(2)
                n_a, n_b = int(top2.values[0]), int(top2.values[1])
                p = binomtest(n_a, n_a + n_b, 0.5).pvalue if n_a + n_b > 0 else 1.0
                out.append(int(top2.indices[0]) if p <= alpha else ABSTAIN)
        return torch.tensor(out)

    def as_model(self, votes: int = 32, seed: int | None = 0) -> Classifier:
        """The smoothed classifier as an attackable model: the base network behind unclipped
        Gaussian noise of ``sigma``, deciding by majority over ``votes`` draws (attack it with
        ``eot=N``)."""
        m = self.model
        return Classifier(m.module, bounds=m.bounds, mean=m.mean, std=m.std,
                          num_classes=m.num_classes, preprocess=m.preprocess,
                          chunk_size=m.chunk_size,
                          defense=GaussianNoise(self.sigma, clip=False, seed=seed), votes=votes)

    def _check(self, x: torch.Tensor, n: int, alpha: float) -> None:
        self.model.check_inputs(x)
        if isinstance(n, bool) or int(n) != n or n < 1:
            raise DefenseError(f"n must be a positive integer; got {n!r}")
        if not 0 < alpha < 1:
            raise DefenseError(f"alpha must be in (0, 1); got {alpha!r}")


def gaussian_noise_generator(sigma: float, seed: int = 0) -> object:
    """An ``example_generator`` for :func:`medrobust.training.train` that trains on ``x + e``,
    ``e ~ N(0, sigma^2 I)`` (Cohen et al.'s training with noise; not clipped)."""
    if not (sigma > 0 and math.isfinite(sigma)):
        raise DefenseError(f"sigma must be > 0; got {sigma!r}")
    gen = torch.Generator().manual_seed(int(seed))

    def generate(wrapper: Classifier, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x + sigma * torch.randn(x.shape, generator=gen).to(x.device, x.dtype)

    return generate


__all__ = [
    "ABSTAIN",
    "Certificate",
    "SmoothedClassifier",
    "clopper_pearson_lower",
    "gaussian_noise_generator",
]
