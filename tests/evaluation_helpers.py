"""Tiny models and data for the evaluation tests, with numbers that can be computed by hand."""

from __future__ import annotations

import torch
from torch import nn

import medrobust as mr
from medrobust.data import ImageData

SIDE = 4  # images are 1 x 4 x 4


class Linear(nn.Module):
    """``z = w . x + b``: one logit, a binary sigmoid model (logits ``[0, z]``)."""

    def __init__(self, w: torch.Tensor, b: float) -> None:
        super().__init__()
        self.lin = nn.Linear(w.numel(), 1)
        with torch.no_grad():
            self.lin.weight.copy_(w.reshape(1, -1))
            self.lin.bias.fill_(b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x.flatten(1))


class Quantized(Linear):
    """The same linear model behind a rounding of its input to 1/4 steps: a forward that is
    piecewise constant, so every input gradient is zero (deliberate gradient masking)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin((torch.round(x * 4) / 4).flatten(1))


def weights() -> tuple[torch.Tensor, float]:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(SIDE * SIDE, generator=g)
    w = torch.where(w.abs() < 0.2, torch.sign(w) * 0.2 + (w == 0) * 0.2, w)  # no zero weight
    return w, float(-0.5 * w.sum()) + 0.05


def linear_data(n: int = 40, seed: int = 0) -> ImageData:
    """Images in [0.3, 0.7] (so budgets up to 0.3 never meet the bounds), labels from the
    linear model with a few flipped (some clean errors)."""
    g = torch.Generator().manual_seed(seed)
    x = 0.3 + 0.4 * torch.rand(n, 1, SIDE, SIDE, generator=g)
    w, b = weights()
    z = x.flatten(1) @ w + b
    y = (z > 0).long()
    flip = torch.arange(n) % 9 == 4
    y = torch.where(flip, 1 - y, y)
    return ImageData(x, y, (0.0, 1.0), "intensity", "binary", ["normal", "finding"])


def linear_model(masked: bool = False) -> mr.Classifier:
    w, b = weights()
    net = (Quantized if masked else Linear)(w, b)
    return mr.Classifier(net, bounds=(0.0, 1.0), num_classes=2)


def hand_robust(data: ImageData, eps: float) -> torch.Tensor:
    """Per-sample robustness of the linear model at an L-inf budget, by hand: the worst
    perturbation moves ``z`` by ``eps * ||w||_1`` against the label."""
    w, b = weights()
    z = data.images.flatten(1).double() @ w.double() + b
    shift = eps * w.double().abs().sum()
    y = data.labels
    return torch.where(y == 1, z - shift > 0, z + shift < 0)
