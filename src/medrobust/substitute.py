"""A substitute model trained without the target's data, by querying it as a label oracle.

Papernot, McDaniel, Goodfellow, Jha, Celik & Swami, "Practical Black-Box Attacks against Machine
Learning", AsiaCCS 2017 (Algorithm 1). Starting from a small initial set ``S_0`` of inputs that are
*not* the target's training data (a few held-out images), each substitute training epoch ``rho``:

1. labels every new point of ``S_rho`` by querying the oracle (its label only);
2. trains the substitute ``F`` on ``S_rho`` with those labels;
3. grows the set by Jacobian-based dataset augmentation,
   ``S_{rho+1} = S_rho U { x + lambda_rho sign(J_F(x)[O(x)]) : x in S_rho }``, the step along the
   sign of the gradient of the substitute's output for the oracle's label, clipped to the bounds,
   with ``lambda_rho = lambda (-1)^floor(rho / tau)`` (the periodic step size, Section 6.1) and,
   optionally, reservoir sampling (only ``kappa`` random points of ``S_rho`` are augmented,
   Section 6.2), which keeps the query count linear instead of doubling.

Every oracle query is counted (each point is labelled once) and reported; with ``max_queries``
the augmentation stops before the budget would be exceeded. The substitute is then a proxy for
transfer attacks (:func:`medrobust.transfer`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medrobust.models import Classifier, Model

__all__ = ["SubstituteResult", "train_substitute"]


@dataclass
class SubstituteResult:
    """A trained substitute and what it cost.

    Attributes:
        model: the substitute, wrapped with the oracle's bounds.
        queries: oracle queries spent (one per labelled point).
        inputs, labels: the final synthetic training set and the oracle's labels.
        history: per substitute epoch: ``{"epoch", "set_size", "queries", "train_agreement"}``.
    """

    model: Classifier
    queries: int
    inputs: torch.Tensor
    labels: torch.Tensor
    history: list[dict[str, Any]] = field(default_factory=list)


def _fit(clf: Classifier, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float,
         batch_size: int, g: torch.Generator) -> None:
    net = clf.module
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    net.train()
    for _ in range(epochs):
        perm = torch.randperm(x.shape[0], generator=g)
        for i in range(0, x.shape[0], batch_size):
            b = perm[i:i + batch_size].to(x.device)
            loss = F.cross_entropy(clf.forward(x[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()


def _jacobian_sign(clf: Classifier, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``sign(d F_y(x) / dx)``: the sign of the gradient of the substitute's logit for ``y``."""

    def pick(out: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return out.gather(1, y[index].unsqueeze(1)).squeeze(1)

    with clf.attack_mode():
        _, _, grad = clf.value_and_grad(x, pick)
    return grad.sign()


def train_substitute(
    oracle: Model,
    seed_inputs: torch.Tensor,
    net: nn.Module,
    *,
    epochs: int = 6,
    train_epochs: int = 10,
    lam: float = 0.1,
    tau: int | None = None,
    reservoir: int | None = None,
    max_queries: int | None = None,
    lr: float = 1e-3,
    batch_size: int = 64,
    mean: float | None = None,
    std: float | None = None,
    seed: int = 0,
) -> SubstituteResult:
    """Train ``net`` as a substitute of ``oracle`` (Papernot et al., AsiaCCS 2017).

    Args:
        oracle: the target (any model kind; only its labels are used: a label-only
            :class:`~medrobust.models.BlackBox` is enough).
        seed_inputs: the initial set ``S_0`` ``(N, C, ...)`` in the oracle's bounds (not the
            target's training data: the paper uses 150 held-out test images for MNIST).
        net: the substitute network (returns logits); trained in place.
        epochs: substitute training epochs ``rho`` (the set grows ``epochs - 1`` times).
        train_epochs: passes over the set per substitute epoch (the paper's 10).
        lam: the augmentation step ``lambda`` in input units (the paper's 0.1 for [0, 1]).
        tau: the period of the step's sign flip (``None``: no flip).
        reservoir: ``kappa``: augment only this many random points per epoch (``None``: all).
        max_queries: the oracle query budget; augmentation stops before it is exceeded.
        lr, batch_size: the substitute's optimizer (Adam) and batch.
        mean, std: normalization inside the substitute's wrapper.
        seed: the randomness (initial weights are the caller's; shuffling, reservoir).
    """
    if not isinstance(oracle, Model):
        raise TypeError(f"oracle must be a medrobust model (BlackBox, Classifier ...); got "
                        f"{type(oracle).__name__}")
    oracle.check_inputs(seed_inputs, "seed_inputs")
    for name, v in (("epochs", epochs), ("train_epochs", train_epochs)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer; got {v!r}")
    if not (lam > 0 and math.isfinite(lam)):
        raise ValueError(f"lam must be a finite number > 0; got {lam!r}")
    if tau is not None and (isinstance(tau, bool) or not isinstance(tau, int) or tau < 1):
        raise ValueError(f"tau must be a positive integer or None; got {tau!r}")
    if reservoir is not None and (isinstance(reservoir, bool) or not isinstance(reservoir, int)
                                  or reservoir < 1):
        raise ValueError(f"reservoir must be a positive integer or None; got {reservoir!r}")
    if max_queries is not None and max_queries < seed_inputs.shape[0]:
        raise ValueError(
            f"max_queries={max_queries} cannot even label the {seed_inputs.shape[0]} seed inputs"
        )
    g = torch.Generator().manual_seed(int(seed))
    sub = Classifier(net, bounds=oracle.bounds, mean=mean, std=std)
    lo, hi = oracle.bounds
    x = seed_inputs.detach().to(sub.device, sub.work_dtype).clone()
    queries = 0
    y = oracle.predict(x).to(x.device)
    queries += int(x.shape[0])
    history: list[dict[str, Any]] = []
    for rho in range(epochs):
        _fit(sub, x, y, train_epochs, lr, batch_size, g)
        agree = float((sub.predict(x) == y).float().mean())
        history.append({"epoch": rho, "set_size": int(x.shape[0]), "queries": queries,
                        "train_agreement": agree})
        if rho == epochs - 1:
            break
        step = lam * (-1.0) ** (rho // tau) if tau is not None else lam
        pick = torch.arange(x.shape[0])
        if reservoir is not None and reservoir < x.shape[0]:
            pick = torch.randperm(x.shape[0], generator=g)[:reservoir]
        if max_queries is not None:
            room = max_queries - queries
            if room <= 0:
                break
            pick = pick[:room]
        pick = pick.to(x.device)
        new = (x[pick] + step * _jacobian_sign(sub, x[pick], y[pick])).clamp(lo, hi)
        new_y = oracle.predict(new).to(x.device)
        queries += int(new.shape[0])
        x, y = torch.cat([x, new]), torch.cat([y, new_y])
    return SubstituteResult(model=sub, queries=queries, inputs=x, labels=y, history=history)
