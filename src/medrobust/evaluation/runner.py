"""Step 2 of the pipeline: compute every unit of a :class:`~medrobust.evaluation.plan.Plan` (or
read it back from the resumable store), batch by batch, and collect the per-sample vectors.

Reproducibility: each unit's attack seed is derived from the run's seed, the attack, the budget
and the batch (:func:`~medrobust.evaluation.util.unit_seed`), so a run that was killed and resumed
computes exactly the numbers an uninterrupted run computes. Memory: only the current batch's images
and small per-sample vectors are held; images are never stored, and a batch whose units are all
stored is not read at all (streamed data: :mod:`medrobust.data.streamed`).

A unit that raises (a model that fails on some batch) stops the run with one
:class:`~medrobust.evaluation.errors.EvaluationError` naming the model, the batch and the unit;
every unit computed before it is already stored, so the rerun continues from there.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from medrobust.data.base import ImageData
from medrobust.evaluation.errors import EvaluationError
from medrobust.evaluation.families import UnitJob, family_of, merge_records
from medrobust.evaluation.plan import CLEAN_UNIT, Plan, Unit
from medrobust.evaluation.store import ResultsStore
from medrobust.evaluation.util import unit_seed
from medrobust.models import Classifier

__all__ = ["Collected", "RunSettings", "attack_index", "clean_record", "run_plan"]

DIRECTIONS = ("pos2neg", "neg2pos")


@dataclass
class RunSettings:
    """What the runner needs besides the plan."""

    norm: str
    seed: int
    unit_hash: str
    direction: str | None = None
    positive_class: int = 1
    progress: bool = False
    resume: bool = True
    model_name: str = "the model"
    robust_auc: bool = False


@dataclass
class Collected:
    """The merged records, keyed ``"unit|eps_key"``, and how many units were computed/reused."""

    records: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    computed: int = 0
    reused: int = 0

    def __getitem__(self, key: str) -> dict[str, np.ndarray]:
        return self.records[key]

    def __contains__(self, key: object) -> bool:
        return key in self.records


def attack_index(labels: torch.Tensor, direction: str | None, pos: int) -> torch.Tensor:
    """The rows of a batch the evaluation attacks: all, or one direction's (binary tasks)."""
    if direction == "pos2neg":
        return (labels == pos).nonzero().flatten()
    if direction == "neg2pos":
        return (labels != pos).nonzero().flatten()
    return torch.arange(labels.shape[0])


def clean_record(clf: Classifier, x: torch.Tensor) -> dict[str, np.ndarray]:
    """The clean pass of a batch: logits, softmax probabilities and predictions."""
    with clf.attack_mode():
        logits = clf.logits(x).float().cpu()
    if not torch.isfinite(logits).all():
        raise ValueError("the model returned NaN or Inf logits")
    if getattr(clf, "multilabel", False):
        from medrobust.evaluation.families.multilabel import clean_record_multilabel

        return clean_record_multilabel(logits)
    return {"probs": torch.softmax(logits, 1).numpy().astype(np.float32),
            "pred": logits.argmax(1).numpy().astype(np.int64),
            "logits": logits.numpy().astype(np.float32)}


def _clean_scores(rec: dict[str, np.ndarray]) -> torch.Tensor:
    if "logits" in rec:
        return torch.from_numpy(np.asarray(rec["logits"], dtype=np.float32))
    return torch.from_numpy(np.log(np.clip(rec["probs"], 1e-30, None)).astype(np.float32))


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def compute_unit(clf: Classifier, unit: Unit, x: torch.Tensor, y: torch.Tensor,
                 clean: dict[str, np.ndarray], settings: RunSettings, span: float,
                 num_classes: int) -> Any:
    """Compute one attack unit (the family's :class:`~medrobust.evaluation.families.UnitOutput`)."""
    assert unit.spec is not None
    idx = attack_index(y, settings.direction, settings.positive_class)
    job = UnitJob(
        clf=clf, x=x, y=y, idx=idx, budget=unit.budget, norm=settings.norm,
        seed=unit_seed(settings.seed, unit.name, unit.eps_key, unit.batch), span=span,
        large=unit.large, clean_logits=_clean_scores(clean), num_classes=num_classes,
    )
    return family_of(unit.spec).run(unit.spec, job)


def run_plan(clf: Classifier, data: ImageData, labels: torch.Tensor, plan: Plan,
             store: ResultsStore, settings: RunSettings,
             clean_all: dict[str, np.ndarray] | None = None,
             batches: Sequence[int] | None = None) -> Collected:
    """Compute (or read back) every unit; return the per-sample vectors, in sample order.

    ``batches``: only these batches (a rank's share of a distributed run); default all.

    ``clean_all``: the clean pass of an earlier run over all samples, for a plan without clean
    units (a follow-up)."""
    from medrobust.progress import Progress

    span = float(clf.bounds[1] - clf.bounds[0])
    # test hook: seconds to sleep after each computed unit (lets a test kill a run mid-way)
    delay = float(os.environ.get("_MEDROBUST_TEST_UNIT_DELAY", "0") or 0)
    parts: dict[str, list[dict[str, np.ndarray]]] = {}
    offsets: dict[str, list[int]] = {}
    out = Collected()
    nb = plan.batches
    # a bar in a terminal, a line every few seconds when stderr is redirected
    bar = Progress("evaluate", len(plan), unit="unit", show=settings.progress)
    num_classes = 0
    try:
        for b in (range(nb) if batches is None else batches):
            sl = plan.slice(b)
            x: torch.Tensor | None = None  # read only when a unit of this batch is computed
            y = labels[sl]
            clean: dict[str, np.ndarray] | None = None
            if clean_all is not None:
                clean = {k: v[sl] for k, v in clean_all.items()}
                num_classes = int(clean["probs"].shape[1])
            for unit in plan.units(b):
                note = f"batch {b + 1}/{nb} {unit.describe()}"
                rec = store.get(settings.unit_hash, unit.name, unit.eps_key, b) \
                    if settings.resume else None
                if rec is None:
                    if x is None:
                        x = data.images[sl]
                        if x.dtype != clf.dtype:
                            x = x.to(clf.dtype)
                    try:
                        if unit.spec is None:
                            rec = clean_record(clf, x)
                        else:
                            assert clean is not None
                            rec = compute_unit(clf, unit, x, y, clean, settings, span,
                                               num_classes).record
                    except (EvaluationError, KeyboardInterrupt):
                        raise
                    except Exception as err:
                        kept = (f"; the {out.computed} unit(s) computed in this run and every "
                                "earlier one are kept in the results database: rerun the same "
                                "command to continue" if store.path is not None else "")
                        raise EvaluationError(
                            f"{settings.model_name} failed on batch {b + 1}/{nb} (samples "
                            f"{sl.start}-{sl.stop - 1}) during {unit.describe()}: "
                            f"{_first_line(err)}{kept}"
                        ) from err
                    store.put(settings.unit_hash, unit.name, unit.eps_key, b, rec)
                    out.computed += 1
                    if delay > 0:
                        time.sleep(delay)
                else:
                    out.reused += 1
                if unit.spec is None:
                    clean = rec
                    num_classes = int(rec["probs"].shape[1])
                key = f"{unit.name}|{unit.eps_key}"
                parts.setdefault(key, []).append(rec)
                offsets.setdefault(key, []).append(sl.start)
                bar.update(1, note)
    finally:
        bar.close()
    if settings.progress:
        print(f"evaluate: {out.computed} unit(s) computed, {out.reused} reused from the results "
              "database", file=sys.stderr)
    for key, lst in parts.items():
        if key.startswith(f"{CLEAN_UNIT}|"):
            out.records[key] = {k: np.concatenate([p[k] for p in lst]) for k in lst[0]
                                if all(k in p for p in lst)}
        else:
            out.records[key] = merge_records(lst, offsets[key])
    return out
