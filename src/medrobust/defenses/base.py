"""What a defense is, and how several are chained in front of a model.

A :class:`Defense` is a ``torch.nn.Module`` whose ``forward(x, bounds)`` maps inputs in the model's
units to inputs in the same units (a denoised, compressed, smoothed or randomly transformed copy).
It declares

* ``randomized`` — two calls on the same input may differ (the model then predicts by majority
  over several draws, and EOT attacks average gradients over draws);
* ``differentiable`` — whether autograd through ``forward`` gives the defense's gradient. A
  non-differentiable defense (JPEG through Pillow, bit-depth rounding, an iterative solver) gives
  zero gradient to a naive attack;
* :meth:`Defense.backward_approximation` — a differentiable function close to ``forward``, used by
  BPDA (Athalye, Carlini & Wagner, "Obfuscated Gradients Give a False Sense of Security", ICML
  2018): the forward pass is the defense, the backward pass is the approximation's gradient
  (straight-through). The default is the identity.

The attacks, not the defenses, know how to be adaptive (DESIGN: extension points): the model's
``value_and_grad(..., bpda=True, eot=N)`` switches every chain it runs to BPDA mode.

Randomness comes from each defense's own ``torch.Generator`` (``seed``), never the global state.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

Bounds = tuple[float, float]


class DefenseError(ValueError):
    """A defense cannot be built or applied as asked (unknown name, bad option, bad input)."""


class Defense(nn.Module):
    """Base class of input-transform defenses (see the module docstring).

    Subclasses set ``name``, ``randomized``, ``differentiable`` and implement :meth:`transform`;
    they record their constructor options in ``self.options`` (stored in ``model.json``).
    """

    name: str = "defense"
    randomized: bool = False
    differentiable: bool = True

    def __init__(self, seed: int | None = None) -> None:
        super().__init__()
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise DefenseError(f"{self.name}: seed must be an int or None; got {seed!r}")
        self.seed = seed
        self.options: dict[str, Any] = {}
        self._generator: torch.Generator | None = None

    # ---------------------------------------------------------------- randomness
    @property
    def generator(self) -> torch.Generator:
        """The defense's own CPU generator (seeded with ``seed``, else from the OS)."""
        if self._generator is None:
            seed = self.seed if self.seed is not None else int.from_bytes(os.urandom(7), "little")
            self._generator = torch.Generator().manual_seed(int(seed))
        return self._generator

    def reseed(self, seed: int) -> None:
        """Restart the defense's random draws from ``seed``."""
        self._generator = torch.Generator().manual_seed(int(seed))

    def rand(self, *shape: int, like: torch.Tensor) -> torch.Tensor:
        return torch.rand(shape, generator=self.generator).to(like.device, like.dtype)

    def randn(self, *shape: int, like: torch.Tensor) -> torch.Tensor:
        return torch.randn(shape, generator=self.generator).to(like.device, like.dtype)

    def randint(self, low: int, high: int) -> int:
        """An integer in ``[low, high)``."""
        return int(torch.randint(low, high, (1,), generator=self.generator))

    # ---------------------------------------------------------------- the transform
    def transform(self, x: torch.Tensor, bounds: Bounds) -> torch.Tensor:
        """The defended copy of ``x`` (same units and shape unless documented)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, bounds: Bounds = (0.0, 1.0)) -> torch.Tensor:
        if x.dim() < 3:
            raise DefenseError(
                f"{self.name}: inputs must be batched (N, C, *spatial); got shape {tuple(x.shape)}"
            )
        return self.transform(x, bounds)

    def backward_approximation(self, x: torch.Tensor, bounds: Bounds = (0.0, 1.0)) -> torch.Tensor:
        """A differentiable approximation of :meth:`forward` for BPDA (default: the identity)."""
        return x

    def config(self) -> dict[str, Any]:
        """``{"name": ..., "options": {...}}``: what rebuilds this defense (``model.json``)."""
        return {"name": self.name, "options": dict(self.options)}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


def bpda(defense: Defense, x: torch.Tensor, bounds: Bounds) -> torch.Tensor:
    """Straight-through BPDA: the value of ``defense(x)``, the gradient of its approximation."""
    approx = defense.backward_approximation(x, bounds)
    with torch.no_grad():
        value = defense(x, bounds)
    return approx + (value.to(approx.dtype) - approx).detach()


class DefenseChain(nn.Module):
    """Defenses applied in order (the ``defense=[d1, d2]`` of a model).

    In BPDA mode (``bpda=True``) each non-differentiable defense runs straight-through with its
    :meth:`~Defense.backward_approximation`; differentiable ones keep their own gradient.
    """

    def __init__(self, defenses: Sequence[Defense]) -> None:
        super().__init__()
        for d in defenses:
            if not isinstance(d, Defense):
                raise DefenseError(
                    "a defense must be a medrobust.defenses.Defense (e.g. get_defense('jpeg', "
                    f"quality=75)); got {type(d).__name__}"
                )
        if not defenses:
            raise DefenseError("an empty list of defenses")
        self.defenses = nn.ModuleList(defenses)

    @property
    def randomized(self) -> bool:
        return any(bool(d.randomized) for d in self.defenses)

    @property
    def differentiable(self) -> bool:
        return all(bool(d.differentiable) for d in self.defenses)

    def forward(
        self, x: torch.Tensor, bounds: Bounds = (0.0, 1.0), bpda_mode: bool = False
    ) -> torch.Tensor:
        for d in self.defenses:
            if bpda_mode and not d.differentiable:
                x = bpda(d, x, bounds)  # type: ignore[arg-type]
            else:
                x = d(x, bounds)
        return x

    def config(self) -> list[dict[str, Any]]:
        return [d.config() for d in self.defenses]  # type: ignore[operator]

    def __iter__(self) -> Any:
        return iter(self.defenses)

    def __len__(self) -> int:
        return len(self.defenses)


def as_chain(defense: Defense | Iterable[Defense] | DefenseChain | None) -> DefenseChain | None:
    """``None``, a defense, a list of defenses or a chain -> a :class:`DefenseChain` (or None)."""
    if defense is None:
        return None
    if isinstance(defense, DefenseChain):
        return defense
    if isinstance(defense, Defense):
        return DefenseChain([defense])
    if isinstance(defense, (list, tuple)):
        return DefenseChain(list(defense))
    raise DefenseError(
        "defense must be a medrobust.defenses.Defense or a list of them; got "
        f"{type(defense).__name__}"
    )


def to_unit(x: torch.Tensor, bounds: Bounds) -> torch.Tensor:
    """The bounds-normalized view ``(x - lo) / (hi - lo)`` in ``[0, 1]``."""
    lo, hi = bounds
    return (x - lo) / (hi - lo)


def from_unit(u: torch.Tensor, bounds: Bounds) -> torch.Tensor:
    """Back from the ``[0, 1]`` view to the model's units."""
    lo, hi = bounds
    return u * (hi - lo) + lo


__all__ = [
    "Bounds",
    "Defense",
    "DefenseChain",
    "DefenseError",
    "as_chain",
    "bpda",
    "from_unit",
    "to_unit",
]
