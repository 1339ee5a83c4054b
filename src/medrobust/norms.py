"""Norms for perturbation budgets: measure, project, steepest-ascent direction and random start.

Every operation works per sample on tensors of any rank ``(N, ...)`` and takes a per-sample budget
``eps`` of shape ``(N,)``. The steepest-ascent directions are the ones of a projected gradient
method under each norm: the sign for L-inf (Goodfellow et al. 2015), the normalized gradient for L2,
and the sparse L1 descent of Tramer & Boneh, "Adversarial Training and Robustness for Multiple
Perturbations", NeurIPS 2019.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

_TINY = 1e-12


def batch_view(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample vector ``(N,)`` to broadcast against ``like`` ``(N, ...)``."""
    return v.view((-1,) + (1,) * (like.dim() - 1))


def flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1)


def measure_all(delta: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sample "linf", "l2", "l1", "l0" (changed elements) and "pixels" (changed positions,
    all channels of a pixel or voxel counting once) of a perturbation ``(N, C, ...)``."""
    d = flat(delta.detach()).double()
    changed = delta.detach() != 0
    pixels = changed.any(dim=1) if delta.dim() > 2 else changed
    return {
        "linf": d.abs().amax(1).float() if d.shape[1] else d.new_zeros(d.shape[0]).float(),
        "l2": d.norm(p=2, dim=1).float(),
        "l1": d.abs().sum(1).float(),
        "l0": flat(changed).sum(1),
        "pixels": flat(pixels).sum(1),
    }


class Norm(ABC):
    """A perturbation norm with the parts a projected steepest-ascent attack needs."""

    name: str

    @abstractmethod
    def measure(self, delta: torch.Tensor) -> torch.Tensor:
        """Per-sample norm ``(N,)``."""

    @abstractmethod
    def project(self, delta: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """The closest point to ``delta`` in the ball of radius ``eps`` (per sample)."""

    @abstractmethod
    def direction(
        self, grad: torch.Tensor, x: torch.Tensor | None = None,
        bounds: tuple[float, float] | None = None,
    ) -> torch.Tensor:
        """Steepest-ascent direction of unit norm (zero where the gradient is zero)."""

    @abstractmethod
    def random(self, shape: torch.Size, eps: torch.Tensor, generator: torch.Generator
               ) -> torch.Tensor:
        """A point drawn uniformly from the ball of radius ``eps`` (on the generator's device)."""

    def __repr__(self) -> str:
        return self.name


class Linf(Norm):
    name = "linf"

    def measure(self, delta: torch.Tensor) -> torch.Tensor:
        return flat(delta).abs().amax(1)

    def project(self, delta: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        e = batch_view(eps, delta)
        return torch.maximum(torch.minimum(delta, e), -e)

    def direction(self, grad: torch.Tensor, x: torch.Tensor | None = None,
                  bounds: tuple[float, float] | None = None) -> torch.Tensor:
        return grad.sign()

    def random(self, shape: torch.Size, eps: torch.Tensor, generator: torch.Generator
               ) -> torch.Tensor:
        u = torch.rand(shape, generator=generator, device=generator.device)
        return (2 * u - 1) * batch_view(eps.to(u.device), u)


class L2(Norm):
    name = "l2"

    def measure(self, delta: torch.Tensor) -> torch.Tensor:
        return flat(delta).norm(p=2, dim=1)

    def project(self, delta: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        norms = self.measure(delta)
        factor = torch.where(norms > eps, eps / norms.clamp_min(_TINY), torch.ones_like(norms))
        return delta * batch_view(factor, delta)

    def direction(self, grad: torch.Tensor, x: torch.Tensor | None = None,
                  bounds: tuple[float, float] | None = None) -> torch.Tensor:
        return grad / batch_view(self.measure(grad).clamp_min(_TINY), grad)

    def random(self, shape: torch.Size, eps: torch.Tensor, generator: torch.Generator
               ) -> torch.Tensor:
        g = torch.randn(shape, generator=generator, device=generator.device)
        d = g[0].numel()
        radius = torch.rand(shape[0], generator=generator, device=generator.device) ** (1.0 / d)
        return self.direction(g) * batch_view(radius * eps.to(g.device), g)


def project_l1_ball(delta: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Euclidean projection onto the L1 ball (Duchi et al., ICML 2008), per sample."""
    v = flat(delta)
    abs_v = v.abs()
    outside = abs_v.sum(1) > eps
    if not outside.any():
        return delta
    mu, _ = abs_v.sort(dim=1, descending=True)
    cumsum = mu.cumsum(1)
    arange = torch.arange(1, v.shape[1] + 1, device=v.device, dtype=v.dtype)
    cond = mu * arange > (cumsum - eps.unsqueeze(1))
    rho = (cond * arange).argmax(1, keepdim=True)  # the last index where cond holds
    theta = (cumsum.gather(1, rho) - eps.unsqueeze(1)) / (rho + 1).to(v.dtype)
    projected = v.sign() * (abs_v - theta).clamp_min(0)
    out = torch.where(outside.unsqueeze(1), projected, v)
    return out.view_as(delta)


class L1(Norm):
    """L1 with the sparse steepest-descent step of Tramer & Boneh (2019).

    ``sparsity`` is the fraction of coordinates (those with the largest |gradient|) moved at each
    step; coordinates already at a bound in the direction of their gradient are skipped, as in the
    paper, so the step is not wasted on moves the box would undo.
    """

    name = "l1"

    def __init__(self, sparsity: float = 0.01) -> None:
        if not 0.0 < sparsity <= 1.0:
            raise ValueError(f"L1 sparsity must lie in (0, 1]; got {sparsity}")
        self.sparsity = float(sparsity)

    def measure(self, delta: torch.Tensor) -> torch.Tensor:
        return flat(delta).abs().sum(1)

    def project(self, delta: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return project_l1_ball(delta, eps.to(delta.dtype))

    def direction(self, grad: torch.Tensor, x: torch.Tensor | None = None,
                  bounds: tuple[float, float] | None = None) -> torch.Tensor:
        g = flat(grad)
        if x is not None and bounds is not None:
            xf = flat(x)
            blocked = ((xf <= bounds[0]) & (g < 0)) | ((xf >= bounds[1]) & (g > 0))
            g = g.masked_fill(blocked, 0.0)
        k = max(1, int(round(self.sparsity * g.shape[1])))
        abs_g = g.abs()
        threshold = abs_g.topk(k, dim=1).values[:, -1:]
        selected = (abs_g >= threshold) & (abs_g > 0)
        step = g.sign() * selected
        count = selected.sum(1, keepdim=True).clamp_min(1)
        return (step / count).view_as(grad)

    def random(self, shape: torch.Size, eps: torch.Tensor, generator: torch.Generator
               ) -> torch.Tensor:
        # Uniform in the L1 ball: Dirichlet(1, ..., 1) radii with one slack coordinate.
        n, d = shape[0], int(torch.Size(shape[1:]).numel())
        e = -torch.log(torch.rand((n, d + 1), generator=generator, device=generator.device)
                       .clamp_min(_TINY))
        mags = (e / e.sum(1, keepdim=True))[:, :d]
        signs = torch.randint(0, 2, (n, d), generator=generator, device=generator.device) * 2 - 1
        return (mags * signs * eps.to(mags.device).unsqueeze(1)).view(shape)


NORMS: dict[str, type[Norm]] = {"linf": Linf, "l2": L2, "l1": L1}


def get_norm(norm: str | Norm) -> Norm:
    """A :class:`Norm` from its name ("linf", "l2", "l1") or an instance."""
    if isinstance(norm, Norm):
        return norm
    key = str(norm).lower().replace("-", "").replace("_", "")
    aliases = {"inf": "linf", "linfinity": "linf", "2": "l2", "1": "l1"}
    key = aliases.get(key, key)
    if key not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; expected one of {sorted(NORMS)}")
    return NORMS[key]()
