"""The extension point of the evaluation pipeline: a *family* knows how to run one kind of unit
of work and how to turn its stored vectors into numbers.

The pipeline (:mod:`medrobust.evaluation.engine`) is::

    plan (units = attack x eps x batch) -> run units (resumable store) -> aggregate -> checks
    -> report

and is the same for every kind of evaluation. What differs between a fixed-budget attack, a
minimum-norm attack, an ensemble run in sequence (``standard``), and next a transfer matrix, a
defense attacked naively and adaptively, a segmentation model or a black box with a query budget,
is only

* which units a spec needs per batch (:meth:`Family.units`: one per budget, or one for all),
* how one unit is computed from a batch (:meth:`Family.run`, returning small per-sample vectors —
  never images — and the adversarial inputs for the gallery),
* how the stored vectors become a prediction per sample at a budget (:meth:`Family.vectors`) and
  what else the attack's block of ``results.json`` holds (:meth:`Family.block`).

A new family is one module that subclasses :class:`Family` and calls :func:`register_family`, plus
one import line in :mod:`medrobust.evaluation.families` (so that it registers on import). Its
specs carry ``kind = family.name``. Nothing else in the pipeline changes.

Conventions of a unit's record (a ``dict`` of numpy arrays, stored as one row of the SQLite
store): arrays over the attacked samples of the batch (``idx``: their index in the batch) are
concatenated over batches; arrays whose name starts with ``cost_`` are per-unit totals, summed
over batches element by element (forward/backward passes, per component for an ensemble); arrays
whose name starts with ``time_`` are seconds (volatile: reported under ``run``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from medrobust.evaluation.budgets import Budget
    from medrobust.evaluation.specs import AttackSpec
    from medrobust.models import Classifier

__all__ = [
    "FAMILIES",
    "MIN_NORM_KEY",
    "Family",
    "UnitJob",
    "UnitOutput",
    "family_of",
    "merge_records",
    "register_family",
]

MIN_NORM_KEY = "min-norm"
"""The ``eps_key`` of a unit computed once for every budget (a minimum-norm attack)."""


@dataclass
class UnitJob:
    """Everything one unit of work sees: one batch, one budget.

    Attributes:
        clf: the model.
        x: the batch's inputs (model dtype); ``y``: their labels.
        idx: the rows of the batch the evaluation attacks (all, or one direction's).
        budget: the budget of this unit (``None`` for a unit valid at every budget).
        norm: the norm's name.
        seed: the unit's own seed (:func:`~medrobust.evaluation.util.unit_seed`).
        span: the width of the model's bounds (PSNR/SSIM range).
        large: this is the unbounded sanity check's budget.
        clean_logits: the model's logits on ``x`` (float, CPU), computed once per batch.
        num_classes: the number of classes.
    """

    clf: Classifier
    x: torch.Tensor
    y: torch.Tensor
    idx: torch.Tensor
    budget: Budget | None
    norm: str
    seed: int
    span: float
    large: bool
    clean_logits: torch.Tensor
    num_classes: int

    @property
    def eps(self) -> float | None:
        return None if self.budget is None else self.budget.value


@dataclass
class UnitOutput:
    """A computed unit: the record to store, and the adversarial inputs of the rows ``idx``."""

    record: dict[str, np.ndarray]
    adversarial: torch.Tensor | None = None


class Family(ABC):
    """A kind of unit of work (see the module docstring)."""

    name: str = ""

    def units(self, spec: AttackSpec, budgets: list[Budget], big: Budget | None
              ) -> list[tuple[str, Budget | None]]:
        """The ``(eps_key, budget)`` units this spec needs on each batch (default: one per
        budget, the large one included)."""
        out: list[tuple[str, Budget | None]] = [(b.key, b) for b in budgets]
        if big is not None:
            out.append((big.key, big))
        return out

    def unit_budget(self, spec: AttackSpec, budget: Budget) -> str:
        """The ``eps_key`` of the unit that holds this spec's results at ``budget``."""
        return budget.key

    @abstractmethod
    def run(self, spec: AttackSpec, job: UnitJob) -> UnitOutput:
        """Compute one unit."""

    @abstractmethod
    def vectors(self, spec: AttackSpec, rec: dict[str, np.ndarray], budget: Budget,
                clean_pred: np.ndarray) -> dict[str, np.ndarray]:
        """Per-sample vectors over all N samples at ``budget``: ``pred`` (the prediction on the
        attack's output; the clean prediction where a sample was not attacked or not broken
        within the budget), ``attacked`` (bool) and the perturbation statistics ``linf``, ``l2``,
        ``psnr``, ``ssim`` (NaN where not defined)."""

    def block(self, spec: AttackSpec, collected: dict[str, dict[str, np.ndarray]],
              budgets: list[Budget], clean_correct: np.ndarray) -> dict[str, Any]:
        """Extra fields of the attack's block in ``results.json`` (default: none)."""
        return {}

    def entry(self, spec: AttackSpec, rec: dict[str, np.ndarray], budget: Budget,
              clean_correct: np.ndarray) -> dict[str, Any]:
        """Extra fields of one per-budget entry (default: none)."""
        return {}


FAMILIES: dict[str, Family] = {}
"""The registered families, by name (a spec's ``kind``)."""


def register_family(family: Family) -> Family:
    """Make ``family`` available to the pipeline under ``family.name``."""
    if not family.name:
        raise ValueError("a family needs a name")
    FAMILIES[family.name] = family
    return family


def family_of(spec: AttackSpec) -> Family:
    try:
        return FAMILIES[spec.kind]
    except KeyError:
        raise KeyError(
            f"no evaluation family {spec.kind!r} is registered (known: {sorted(FAMILIES)})"
        ) from None


def merge_records(parts: list[dict[str, np.ndarray]], offsets: list[int]
                  ) -> dict[str, np.ndarray]:
    """The records of one unit key over all batches, in sample order: per-sample arrays
    concatenated (``idx`` shifted by each batch's first sample), ``cost_``/``time_`` summed."""
    out: dict[str, np.ndarray] = {}
    if not parts:
        return out
    names = [k for k in parts[0] if all(k in p for p in parts)]
    for name in names:
        if name.startswith(("cost_", "time_")):
            out[name] = np.sum([np.asarray(p[name], dtype=np.float64) for p in parts], axis=0)
        elif name == "idx":
            out[name] = np.concatenate([p[name].astype(np.int64) + o
                                        for p, o in zip(parts, offsets, strict=True)])
        else:
            out[name] = np.concatenate([p[name] for p in parts])
    return out
