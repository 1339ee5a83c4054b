"""Transfer matrices: how adversarial examples crafted on one model fool another.

Liu, Chen, Liu & Song, "Delving into Transferable Adversarial Examples and Black-box Attacks",
ICLR 2017, Table 1 layout: rows are the proxy (source) models the examples are crafted on, columns
the target models they are evaluated on; the diagonal is the white-box case. Each cell holds the
target's accuracy on the examples, and the transfer success: the fraction of the samples the
target classifies correctly when clean that it misclassifies on the examples (samples it already
gets wrong are not counted as fooled). The hold-one-out ensemble table (their Table 4) crafts on an
:class:`~medrobust.models.Ensemble` of every model but one and evaluates on the one held out.

All models must take inputs in the same bounds and units (a budget means the same thing for all):
models that differ are refused with an error naming them.

The work is a list of jobs, one per (row, batch): the clean pass of every model on a batch, the
examples crafted on proxy ``i`` (or on the ensemble holding out ``j``) for a batch and every
target's predictions on them. Under ``torchrun`` (:mod:`medrobust.distributed`) the jobs are dealt
round-robin to the ranks; rank 0 gathers the predictions, computes the matrix, and every rank
returns it. An attack draws from a fresh generator seeded by ``seed`` at each call, so a job gives
the same predictions whichever rank runs it: the matrix equals a single process's. Only one batch
of images is held at a time, so streamed data (:mod:`medrobust.data.streamed`) stays streamed.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from medrobust.attacks import Attack, get_attack
from medrobust.models import Classifier
from medrobust.models.ensemble import Ensemble

AttackSpec = str | Attack | Callable[[float], Attack]

__all__ = ["TransferResult", "transfer"]


@dataclass
class TransferResult:
    """A transfer matrix and its hold-one-out ensemble table.

    Attributes:
        names: the models, in row/column order.
        eps, norm: the budget.
        attack: the attack's configuration (as crafted on the first proxy).
        n: the number of samples.
        clean_accuracy: per model.
        correct: per model, how many samples it classifies correctly when clean.
        accuracy: ``accuracy[i][j]``: model ``j``'s accuracy on the examples crafted on ``i``.
        success: ``success[i][j]``: fraction of ``j``'s clean-correct samples that the examples
            crafted on ``i`` fool (``nan`` when ``j`` gets none right).
        ensemble_accuracy, ensemble_success: per held-out model ``j``: crafted on the ensemble of
            all the others (``None`` when fewer than 3 models or disabled).
        combine: how the ensemble fused its members.
    """

    names: list[str]
    eps: float
    norm: str
    attack: dict[str, Any]
    n: int
    clean_accuracy: list[float]
    correct: list[int]
    accuracy: list[list[float]]
    success: list[list[float]]
    ensemble_accuracy: list[float] | None = None
    ensemble_success: list[float] | None = None
    combine: str = "logits"
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (``nan`` written as ``None``)."""

        def clean(v: Any) -> Any:
            if isinstance(v, float) and not math.isfinite(v):
                return None
            if isinstance(v, list):
                return [clean(u) for u in v]
            if isinstance(v, dict):
                return {k: clean(u) for k, u in v.items()}
            return v

        return clean({
            "layout": "rows: proxy (source) model; columns: target model; diagonal: white box",
            "names": self.names, "eps": self.eps, "norm": self.norm, "attack": self.attack,
            "n": self.n, "clean_accuracy": self.clean_accuracy, "correct": self.correct,
            "accuracy": self.accuracy, "success": self.success,
            "ensemble": None if self.ensemble_success is None else {
                "combine": self.combine,
                "held_out": self.names,
                "accuracy": self.ensemble_accuracy,
                "success": self.ensemble_success,
            },
            "extra": self.extra,
        })

    def to_markdown(self, what: str = "success") -> str:
        """The matrix as a Markdown table (``what``: ``"success"`` or ``"accuracy"``)."""
        m = self.success if what == "success" else self.accuracy
        head = "| proxy \\ target | " + " | ".join(self.names) + " |"
        sep = "|---" * (len(self.names) + 1) + "|"
        rows = [
            f"| {a} | " + " | ".join(_fmt(v) for v in row) + " |"
            for a, row in zip(self.names, m, strict=True)
        ]
        out = [head, sep, *rows]
        ens = self.ensemble_success if what == "success" else self.ensemble_accuracy
        if ens is not None:
            out.append("| ensemble of the others | " + " | ".join(_fmt(v) for v in ens) + " |")
        return "\n".join(out)


def _fmt(v: float) -> str:
    return "-" if not math.isfinite(v) else f"{100 * v:.1f}%"


def _unpack_models(
    models: Mapping[str, Any] | Sequence[Any],
) -> tuple[list[str], list[Classifier], list[str | None]]:
    items = list(models.items()) if isinstance(models, Mapping) else [
        (f"model{i}", m) for i, m in enumerate(models)
    ]
    if len(items) < 2:
        raise ValueError(f"a transfer matrix needs at least 2 models; got {len(items)}")
    names, clfs, units = [], [], []
    for name, m in items:
        unit = getattr(m, "units", None)
        clf = getattr(m, "classifier", m)
        if not isinstance(clf, Classifier):
            raise TypeError(
                f"model {name!r} is a {type(m).__name__}; expected a medrobust.Classifier or a "
                "loaded model folder"
            )
        names.append(str(name))
        clfs.append(clf)
        units.append(str(unit) if unit is not None else None)
    bounds = {c.bounds for c in clfs}
    if len(bounds) > 1:
        detail = ", ".join(f"{n}: {c.bounds}" for n, c in zip(names, clfs, strict=True))
        raise ValueError(
            f"the models take inputs in different bounds ({detail}); a transfer matrix needs one "
            "input space (the same bounds and units) so that eps means the same for all"
        )
    known = {u for u in units if u is not None}
    if len(known) > 1:
        detail = ", ".join(f"{n}: {u}" for n, u in zip(names, units, strict=True) if u)
        raise ValueError(f"the models take inputs in different units ({detail})")
    return names, clfs, units


def _make_attack(spec: AttackSpec, eps: float, norm: str, seed: int,
                 kwargs: Mapping[str, Any]) -> Attack:
    if isinstance(spec, Attack):
        return spec
    if isinstance(spec, str):
        from medrobust.attacks import ATTACKS

        key = spec.lower().replace("-", "").replace("_", "")
        if key not in ATTACKS:
            raise ValueError(f"unknown attack {spec!r}; expected one of {sorted(ATTACKS)}")
        params = inspect.signature(ATTACKS[key]).parameters
        kw: dict[str, Any] = dict(kwargs)
        if "eps" in params:
            kw.setdefault("eps", eps)
        if "norm" in params:
            kw.setdefault("norm", norm)
        if "seed" in params:
            kw.setdefault("seed", seed)
        return get_attack(spec, **kw)
    if callable(spec):
        out = spec(eps)
        if not isinstance(out, Attack):
            raise TypeError(f"the attack factory returned {type(out).__name__}, not an Attack")
        return out
    raise TypeError(f"attack must be a name, an Attack or a factory eps -> Attack; got "
                    f"{type(spec).__name__}")


def _norm_name(attack: Attack, default: str) -> str:
    norm = getattr(attack, "norm", None)
    name = getattr(norm, "name", None)
    return str(name) if name is not None else default


def _data(data: Any) -> tuple[Any, torch.Tensor]:
    if hasattr(data, "images") and hasattr(data, "labels"):
        return data.images, data.labels
    if isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = data
        return torch.as_tensor(x), torch.as_tensor(y)
    raise TypeError("data must be (inputs, labels) or an ImageData (medrobust.data)")


def transfer(
    models: Mapping[str, Any] | Sequence[Any],
    data: Any,
    attack: AttackSpec = "pgd",
    eps: float = 4 / 255,
    norm: str = "linf",
    *,
    ensemble: bool = True,
    combine: str = "logits",
    attack_kwargs: Mapping[str, Any] | None = None,
    seed: int = 0,
    batch_size: int = 256,
) -> TransferResult:
    """The transfer matrix of ``attack`` at ``eps`` between ``models`` on ``data``.

    Args:
        models: ``{name: Classifier or loaded model folder}`` or a list (named ``model0`` ...).
        data: ``(inputs, labels)`` in the models' bounds, or an ``ImageData``.
        attack: an attack name (built with ``eps``, ``norm``, ``seed`` and ``attack_kwargs``), an
            :class:`~medrobust.attacks.Attack`, or a factory ``eps -> Attack``.
        eps, norm: the budget.
        ensemble: also compute the hold-one-out ensemble table (needs >= 3 models).
        combine: the ensemble's fusion (``"logits"`` or ``"loss"``).
        seed: the attacks' seed.
        batch_size: samples per attack call.
    """
    from medrobust import distributed
    from medrobust.data.streamed import ImageSource

    names, clfs, units = _unpack_models(models)
    x, y = _data(data)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"data has {x.shape[0]} inputs but {y.shape[0]} labels")
    streamed = isinstance(x, ImageSource)
    if not streamed:
        for c in clfs:
            c.check_inputs(x, "data inputs")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}")
    y = y.long()
    k = len(clfs)
    atk = _make_attack(attack, eps, norm, seed, attack_kwargs or {})
    n = int(x.shape[0])
    batches = [(s, min(n, s + batch_size)) for s in range(0, n, batch_size)]
    held_out = list(range(k)) if ensemble and k >= 3 else []
    # one job per (row, batch): "clean" (every model), "proxy" i, "ensemble" holding out j
    jobs = [("clean", -1, b) for b in range(len(batches))]
    jobs += [("proxy", i, b) for i in range(k) for b in range(len(batches))]
    jobs += [("ensemble", j, b) for j in held_out for b in range(len(batches))]

    ensembles: dict[int, Ensemble] = {}

    def proxy(kind: str, i: int) -> Any:
        if kind == "proxy":
            return clfs[i]
        if i not in ensembles:
            others = [clfs[m] for m in range(k) if m != i]
            u = [units[m] for m in range(k) if m != i]
            ensembles[i] = Ensemble(others, combine=combine,
                                    units=None if any(v is None for v in u) else u)  # type: ignore[arg-type]
        return ensembles[i]

    def run(job: tuple[str, int, int]) -> torch.Tensor:
        """The predictions (targets, batch) of one job."""
        kind, i, b = job
        lo, hi = batches[b]
        xb, yb = x[lo:hi], y[lo:hi]
        if kind == "clean":
            if streamed:
                for c in clfs:
                    c.check_inputs(xb, f"data inputs {lo}-{hi - 1}")
            return torch.stack([c.predict(xb).cpu() for c in clfs])
        adv = atk(proxy(kind, i), xb, yb).adversarial
        targets = range(k) if kind == "proxy" else [i]
        return torch.stack([clfs[j].predict(adv).cpu() for j in targets])

    ctx = distributed.current()
    if ctx is None:
        preds = {job: run(job) for job in jobs}
    else:
        from medrobust.evaluation.util import state_dict_sha256, tensor_sha256

        preds = _run_distributed(ctx, jobs, run, {
            "data": tensor_sha256(x, y),  # a fingerprint for streamed data: no pass over it
            "weights": [state_dict_sha256(c.module) for c in clfs],
            "names": names, "eps": float(getattr(atk, "eps", eps)), "norm": norm, "n": n,
            "attack": atk.config(), "seed": seed, "batch_size": batch_size,
            "ensemble": held_out, "combine": combine,
        })

    def full(kind: str, i: int, row: int) -> torch.Tensor:
        return torch.cat([preds[(kind, i, b)][row] for b in range(len(batches))])

    correct = [full("clean", -1, j) == y for j in range(k)]

    def scores(p: torch.Tensor, j: int) -> tuple[float, float]:
        ok = correct[j]
        acc = float((p == y).float().mean())
        suc = float((p[ok] != y[ok]).float().mean()) if ok.any() else float("nan")
        return acc, suc

    accuracy, success = [], []
    for i in range(k):
        pairs = [scores(full("proxy", i, j), j) for j in range(k)]
        accuracy.append([a for a, _ in pairs])
        success.append([s for _, s in pairs])
    ens_acc: list[float] | None = None
    ens_suc: list[float] | None = None
    if held_out:
        pairs = [scores(full("ensemble", j, 0), j) for j in held_out]
        ens_acc = [a for a, _ in pairs]
        ens_suc = [s for _, s in pairs]
    extra: dict[str, Any] = {}
    if ctx is not None:
        extra["world_size"] = ctx.world_size
    return TransferResult(
        names=names, eps=float(getattr(atk, "eps", eps)), norm=_norm_name(atk, norm),
        attack=atk.config(), n=n,
        clean_accuracy=[float(c.float().mean()) for c in correct],
        correct=[int(c.sum()) for c in correct],
        accuracy=accuracy, success=success,
        ensemble_accuracy=ens_acc, ensemble_success=ens_suc, combine=combine, extra=extra,
    )


def _run_distributed(ctx: Any, jobs: list[tuple[str, int, int]],
                     run: Callable[[tuple[str, int, int]], torch.Tensor],
                     args: dict[str, Any]) -> dict[tuple[str, int, int], torch.Tensor]:
    """Every rank runs its round-robin share of ``jobs``; every rank gets all predictions
    (gathered on rank 0, then broadcast). One rank's error stops every rank with its message."""
    from medrobust import distributed

    distributed.check_same(ctx, args, "transfer arguments (models, data, attack, eps, seed)")
    distributed.check_enough_work(len(jobs), ctx.world_size, "transfer jobs")
    mine = jobs[ctx.rank::ctx.world_size]
    out: dict[tuple[str, int, int], torch.Tensor] = {}
    failure = ""
    try:
        for job in mine:
            out[job] = run(job)
    except (RuntimeError, ValueError, TypeError) as err:
        failure = f"{type(err).__name__}: {err}".splitlines()[0]
    errors = distributed.all_ranks_ok(ctx, not failure, failure)
    if errors:
        raise ValueError("transfer failed: " + "; ".join(errors))
    gathered = distributed.gather_to_main(ctx, out)
    merged: dict[tuple[str, int, int], torch.Tensor] | None = None
    if gathered is not None:
        merged = {}
        for part in gathered:
            merged.update(part)
    result = distributed.broadcast(ctx, merged)
    assert isinstance(result, dict) and len(result) == len(jobs)
    return result
