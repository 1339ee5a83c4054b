"""CT-GAN's intensity normalization: histogram equalization fitted on training cubes, and back.

Mirsky et al. (USENIX Security 2019, Section 4.2) equalize the histogram of the training cubes
before training and invert the mapping ("rescaling back to HU") after in-painting, so that the
generator sees the whole dynamic range of lung and lesion tissue evenly. Here the mapping is the
empirical CDF of the training voxels, stored as ``levels`` quantiles (data, not code):
``equalize(hu)`` maps HU to [-1, 1] through the CDF; ``dequalize`` is its inverse, piecewise linear.
"""

from __future__ import annotations

import torch

__all__ = ["HistogramEqualizer"]


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """``numpy.interp`` in torch: piecewise-linear, clamped at the ends; ``xp`` increasing."""
    xp = xp.to(x)
    fp = fp.to(x)
    idx = torch.searchsorted(xp, x.contiguous()).clamp(1, xp.numel() - 1)
    x0, x1 = xp[idx - 1], xp[idx]
    f0, f1 = fp[idx - 1], fp[idx]
    t = ((x - x0) / (x1 - x0).clamp_min(1e-12)).clamp(0, 1)
    return f0 + t * (f1 - f0)


class HistogramEqualizer:
    """Maps HU to [-1, 1] by the training voxels' CDF (and back).

    Args:
        quantiles: the HU values at ``levels`` evenly spaced probabilities (strictly increasing
            after a tiny tie-break).
    """

    def __init__(self, quantiles: torch.Tensor) -> None:
        q = torch.as_tensor(quantiles, dtype=torch.float64).flatten()
        if q.numel() < 2 or not torch.isfinite(q).all():
            raise ValueError("an equalizer needs at least 2 finite quantiles")
        q, _ = torch.sort(q)
        # ties (e.g. a plateau of air) would make the inverse ambiguous: spread them minimally
        eps = 1e-3 * torch.arange(q.numel(), dtype=torch.float64)
        self.quantiles = torch.cummax(q + eps, 0).values
        self.probs = torch.linspace(0.0, 1.0, q.numel(), dtype=torch.float64)

    @classmethod
    def fit(cls, hu: torch.Tensor, levels: int = 1024, max_samples: int = 2_000_000,
            seed: int = 0) -> HistogramEqualizer:
        """Fit on voxels ``hu`` (any shape; a seeded subsample of at most ``max_samples``)."""
        v = hu.detach().flatten().double()
        if v.numel() > max_samples:
            g = torch.Generator().manual_seed(seed)
            v = v[torch.randint(v.numel(), (max_samples,), generator=g)]
        return cls(torch.quantile(v, torch.linspace(0, 1, levels, dtype=torch.float64)))

    def equalize(self, hu: torch.Tensor) -> torch.Tensor:
        """HU -> [-1, 1]."""
        return (_interp(hu.double(), self.quantiles, self.probs) * 2 - 1).to(hu.dtype)

    def dequalize(self, v: torch.Tensor) -> torch.Tensor:
        """[-1, 1] -> HU (the inverse of :meth:`equalize` inside the fitted range)."""
        p = ((v.double() + 1) / 2).clamp(0, 1)
        return _interp(p, self.probs, self.quantiles).to(v.dtype)
