"""Metrics of a robustness evaluation: accuracy with Wilson intervals, AUC as MedMNIST computes it
(with a bootstrap interval), and the perceptibility of a perturbation (PSNR, SSIM), in torch.

Everything here is a pure function of small per-sample vectors (numpy) or of one batch of images
(torch), so that the engine can aggregate results of any size from what it stored per batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import norm as _normal

from medrobust.metrics import medmnist_auc

__all__ = [
    "Proportion",
    "auc_medmnist",
    "bootstrap_auc_ci",
    "psnr",
    "ssim",
    "summary_stats",
    "wilson_interval",
]

Z95 = float(_normal.ppf(0.975))


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval for ``k`` successes in ``n`` trials (95% by default).

    Wilson (1927); unlike the normal approximation it stays inside [0, 1] and behaves at 0 and n
    (a robust accuracy of 0/156 gets [0, 0.024], not [0, 0]). ``(nan, nan)`` for ``n == 0``.
    """
    if n <= 0:
        return float("nan"), float("nan")
    p = k / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    lo, hi = max(0.0, centre - half), min(1.0, centre + half)
    # exact at the ends (rounding would otherwise leave 1e-17 gaps)
    if k == 0:
        lo = 0.0
    if k == n:
        hi = 1.0
    return lo, hi


@dataclass(frozen=True)
class Proportion:
    """``k`` of ``n`` with its 95% Wilson interval."""

    k: int
    n: int

    @property
    def value(self) -> float:
        return self.k / self.n if self.n else float("nan")

    def to_dict(self) -> dict[str, float | int | None]:
        lo, hi = wilson_interval(self.k, self.n)
        return {
            "value": _finite(self.value),
            "ci_low": _finite(lo),
            "ci_high": _finite(hi),
            "k": int(self.k),
            "n": int(self.n),
        }

    @classmethod
    def of(cls, mask: np.ndarray, within: np.ndarray | None = None) -> Proportion:
        """The share of ``True`` in ``mask`` (restricted to ``within`` when given)."""
        m = np.asarray(mask, dtype=bool)
        if within is not None:
            m = m[np.asarray(within, dtype=bool)]
        return cls(int(m.sum()), int(m.size))


def _finite(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


def summary_stats(values: np.ndarray) -> dict[str, float | int | None]:
    """``n``, mean, median, min and max of the finite entries (``None`` when there are none)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"n": 0, "mean": None, "median": None, "min": None, "max": None}
    return {
        "n": int(v.size),
        "mean": float(v.mean()),
        "median": float(np.median(v)),
        "min": float(v.min()),
        "max": float(v.max()),
    }


# ----------------------------------------------------------------------------------------- AUC
def auc_medmnist(labels: np.ndarray, probs: np.ndarray, task: str) -> float:
    """AUC as ``medmnist.evaluator.getAUC`` computes it (:func:`medrobust.metrics.medmnist_auc`):
    binary, the ROC AUC of the class-1 probability; multi-class and ordinal, the mean one-vs-rest
    AUC; multi-label, the mean over labels. Classes without positives (or negatives) are left out
    of the mean (nan if none is left)."""
    return medmnist_auc(labels, probs, task)


def bootstrap_auc_ci(
    labels: np.ndarray, probs: np.ndarray, task: str, *, resamples: int = 1000, seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """A percentile bootstrap interval for :func:`auc_medmnist` (``resamples`` draws of the N
    samples with replacement, from a fixed seed, so the interval is reproducible)."""
    y = np.asarray(labels)
    p = np.asarray(probs, dtype=np.float64)
    n = y.shape[0]
    if n < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    values = np.empty(resamples)
    for b in range(resamples):
        idx = rng.integers(0, n, n)
        values[b] = auc_medmnist(y[idx], p[idx], task)
    values = values[np.isfinite(values)]
    if values.size < max(10, resamples // 10):
        return float("nan"), float("nan")
    alpha = (1 - level) / 2
    return float(np.quantile(values, alpha)), float(np.quantile(values, 1 - alpha))


# ---------------------------------------------------------------------------- perceptibility
def psnr(clean: torch.Tensor, adversarial: torch.Tensor, data_range: float) -> torch.Tensor:
    """Per-sample peak signal-to-noise ratio in dB, ``10 log10(range^2 / MSE)``, with ``range``
    the width of the model's bounds (so HU images use the HU range). ``inf`` when identical."""
    d = (adversarial.detach().double() - clean.detach().double()).reshape(clean.shape[0], -1)
    mse = d.pow(2).mean(1)
    out = 10 * torch.log10(float(data_range) ** 2 / mse)
    return torch.where(mse > 0, out, torch.full_like(out, float("inf"))).float().cpu()


def _gaussian_kernel(size: int, sigma: float) -> torch.Tensor:
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    return g / g.sum()


def _filter(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian filter over every spatial axis of ``(N, C, *spatial)``, 'valid' mode."""
    c = x.shape[1]
    dims = x.dim() - 2
    conv = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
    k = kernel.to(dtype=x.dtype, device=x.device)
    for axis in range(dims):
        shape = [1, 1] + [1] * dims
        shape[2 + axis] = k.numel()
        weight = k.reshape(shape).repeat([c] + [1] * (dims + 1))
        x = conv(x, weight, groups=c)
    return x


def ssim(
    clean: torch.Tensor, adversarial: torch.Tensor, data_range: float, *, win_size: int = 11,
    sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03,
) -> torch.Tensor:
    """Per-sample structural similarity (Wang et al., IEEE TIP 2004), mean over channels.

    The reference setting: an 11-tap Gaussian window of sigma 1.5, K1 = 0.01, K2 = 0.03, population
    covariances, ``L`` = the width of the model's bounds, the mean of the SSIM map over the 'valid'
    region. Equal to ``skimage.metrics.structural_similarity(..., gaussian_weights=True,
    sigma=1.5, use_sample_covariance=False, data_range=L)`` (per channel, averaged). Works on 1D,
    2D and 3D inputs; the window shrinks (odd) when an axis is shorter than 11.
    """
    x = clean.detach().double()
    y = adversarial.detach().double()
    if x.dim() < 3:
        x, y = x.unsqueeze(1), y.unsqueeze(1)
    size = min([win_size, *x.shape[2:]])
    if size % 2 == 0:
        size -= 1
    kernel = _gaussian_kernel(max(size, 1), sigma)
    c1 = (k1 * data_range) ** 2
    c2 = (k2 * data_range) ** 2
    mx, my = _filter(x, kernel), _filter(y, kernel)
    sxx = _filter(x * x, kernel) - mx * mx
    syy = _filter(y * y, kernel) - my * my
    sxy = _filter(x * y, kernel) - mx * my
    smap = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return smap.reshape(smap.shape[0], -1).mean(1).float().cpu()
