"""The evaluation pipeline, end to end: :func:`evaluate`.

Each step is its own module, and dependencies point one way (no module imports one that imports
it back)::

    plan      (plan.py)      names -> specs; specs x budgets x batches -> units
    run       (runner.py)    each unit computed by its family (families/), or read back from
    store     (store.py)       the resumable SQLite store
    aggregate (aggregate.py) per-sample vectors -> the numbers (tasks.py: per task type)
    checks    (preflight.py, sanity.py, headline.py)  pre-flight and masking checks; the figure
                             to quote
    report    (gallery.py, figures.py, report.py, output.py)  results.json, report.html, figures

A new kind of evaluation (a transfer matrix, a defense attacked naively and adaptively, a
segmentation model, a black box with a query budget) plugs in as a family
(:mod:`medrobust.evaluation.families.base`) and, for a new task, a task type
(:mod:`medrobust.evaluation.tasks`), without a branch in this file.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medrobust.data.base import ImageData
from medrobust.evaluation.budgets import Budget, default_budgets, large_budget, parse_budgets
from medrobust.evaluation.errors import EvaluationError, ResultsStoreError
from medrobust.evaluation.families import MIN_NORM_KEY
from medrobust.evaluation.modelinfo import (
    ModelInfo,
    check_model_data,
    display_window,
    meta_positive_class,
    resolve_model,
)
from medrobust.evaluation.plan import CLEAN_UNIT, build_attack_specs, make_plan
from medrobust.evaluation.result import REPORT_HTML, RESULTS_JSON, EvaluationResult
from medrobust.evaluation.runner import DIRECTIONS, Collected, RunSettings, run_plan
from medrobust.evaluation.specs import AttackSpec
from medrobust.evaluation.store import DB_NAME, ResultsStore
from medrobust.evaluation.util import jsonable, sha256_json, tensor_sha256, unit_seed
from medrobust.norms import get_norm

__all__ = [
    "CLEAN_UNIT",
    "DB_NAME",
    "EvaluationResult",
    "MIN_NORM_KEY",
    "REPORT_HTML",
    "RESULTS_JSON",
    "ResultsStoreError",
    "check_model_data",
    "display_window",
    "evaluate",
    "resolve_model",
    "unit_seed",
]

MASKING_CHECKS = ("eps0", "monotonic", "iterative", "large_eps", "gradient_free")


def _check_args(norm: str, batch_size: Any, seed: Any, direction: str | None) -> str:
    try:
        norm_name = get_norm(norm).name
    except ValueError as err:
        raise EvaluationError(str(err)) from None
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise EvaluationError(f"batch_size must be a positive integer; got {batch_size!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise EvaluationError(f"seed must be an integer; got {seed!r}")
    if direction is not None and direction not in DIRECTIONS:
        raise EvaluationError(
            f"unknown direction {direction!r}; expected one of {', '.join(DIRECTIONS)} or none"
        )
    return norm_name


def _model_name(info: ModelInfo) -> str:
    if info.source:
        return f"model {info.source}"
    return f"model {type(info.classifier.module).__name__}"


def evaluate(
    model: Any,
    data: ImageData,
    attacks: Sequence[str] | str = "standard",
    eps: Sequence[float | str | Budget] | str | None = None,
    norm: str = "linf",
    out: str | os.PathLike[str] | None = None,
    batch_size: int = 64,
    seed: int = 0,
    direction: str | None = None,
    attack_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    progress: bool = True,
    overwrite: bool = False,
    resume: bool = True,
    *,
    positive_class: int | None = None,
    large_eps: bool = True,
    gallery: int = 6,
    steps: int | None = None,
    device: str | torch.device | None = None,
) -> EvaluationResult:
    """Evaluate a classifier's adversarial robustness on a data set.

    Args:
        model: a :class:`~medrobust.Classifier`, a loaded model folder, or the path of a model
            folder (loaded with :func:`medrobust.modelstore.load_model` on ``device``).
        data: an :class:`~medrobust.data.ImageData` (binary, multi-class or ordinal labels) in
            the model's input units.
        attacks: names in :data:`medrobust.attacks.ATTACKS` or ensembles
            (:data:`medrobust.evaluation.families.PRESETS`: ``"standard"`` — the default, APGD-CE,
            APGD-T, FAB-T and Square run in sequence as AutoAttack —, ``"standard-rand"``,
            ``"plus"``), as a list or a text ``"fgsm,pgd"``.
        eps: budgets in the model's input units: numbers or texts like ``"8/255"`` (a list or a
            comma-separated text). Default: 0, 1, 2, 4, 8 /255 of the input range (L-inf).
        norm: ``"linf"``, ``"l2"`` or ``"l1"``.
        out: the output folder (``results.json``, ``report.html``, ``figures/*.png`` and the
            resumable ``results.sqlite``); ``None`` keeps everything in memory. One run at a
            time per folder (a second is refused).
        batch_size: samples per batch (the unit of resumption).
        seed: the run's seed; every unit's attack seed is derived from it (:func:`unit_seed`).
        direction: ``None`` attacks every sample; ``"pos2neg"`` attacks only the samples of the
            positive class (hide a finding), ``"neg2pos"`` only the others (binary tasks).
        attack_kwargs: extra arguments per attack name, e.g. ``{"pgd": {"steps": 20}}``; for an
            ensemble, per component attack or label, e.g. ``{"apgd": {"steps": 10},
            "square": {"queries": 200}}`` (a reduced preset).
        progress: show a progress bar (tqdm, on stderr).
        overwrite: delete the folder's earlier medrobust results first. Without it, a folder
            holding the results of another configuration is an error.
        resume: reuse the units stored in ``results.sqlite`` (a rerun of the same command
            continues where it stopped). ``resume=False`` on a folder with results needs
            ``overwrite=True``.
        positive_class: the positive class of a binary task (for sensitivity, specificity and
            ``direction``); default: the model folder's ``positive_class``, else class 1.
        large_eps: also run each attack at a budget containing the whole input range, for the
            "large eps reaches ~100% success" check.
        gallery: the number of gallery examples in the report.
        steps: the number of steps of every iterative attack that takes ``steps``.
        device: where to load a model folder.

    Returns:
        An :class:`EvaluationResult`.

    Raises:
        EvaluationError: bad arguments, a model that does not match the data, an output folder
            that cannot be written, is in use by another run or holds other results, a model that
            fails on a batch (the units computed before are kept); :class:`ResultsStoreError` for
            a corrupted ``results.sqlite``.
    """
    from medrobust import __version__
    from medrobust.evaluation.schema import SCHEMA_VERSION

    started = time.time()
    started_iso = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    norm_name = _check_args(norm, batch_size, seed, direction)

    info = resolve_model(model, device)
    clf = info.classifier
    k = check_model_data(info, data)
    specs = build_attack_specs(attacks, norm_name, attack_kwargs, {"steps": steps},
                               num_classes=k)
    budgets = default_budgets(clf.bounds, norm_name) if eps is None else parse_budgets(eps)
    numel = int(data.images[0].numel())
    big = large_budget(clf.bounds, norm_name, numel) if large_eps else None
    if big is not None and any(b.value >= big.value for b in budgets):
        big = None  # the sweep already contains a budget this large
    if big is not None:
        dw = display_window(clf, info.metadata, data)
        span = float(clf.bounds[1] - clf.bounds[0])
        width = min(span, float(dw[1] - dw[0])) if dw[1] > dw[0] else span
        for s in specs:
            s.large_step = big.value * (width / span) / 50.0
    binary = k == 2
    pos = positive_class if positive_class is not None else meta_positive_class(info.metadata)
    pos = 1 if pos is None else pos
    if not (0 <= int(pos) < k):
        raise EvaluationError(f"positive_class {pos} is not a class of this {k}-class model")
    pos = int(pos)
    if direction is not None and not binary:
        raise EvaluationError(f"direction={direction!r} needs a binary task; this model has {k}")

    labels = data.labels.to(torch.int64)
    data_sha = tensor_sha256(data.images, labels)
    base = {
        "store_version": 1,
        "medrobust_version": __version__,
        "weights": info.weights_sha256,
        "data": data_sha,
        "bounds": list(clf.bounds),
        "mean": None if clf.mean is None else clf.mean.tolist(),
        "std": None if clf.std is None else clf.std.tolist(),
        "preprocess": repr(clf.preprocess),
        "batch_size": batch_size,
        "seed": seed,
        "norm": norm_name,
        "direction": direction,
        "positive_class": pos if direction is not None else None,
        "dtype": str(clf.dtype),
    }
    unit_hash = sha256_json(base)[:32]
    run_config = {
        "base": base,
        "attacks": [s.key for s in specs],
        "eps": [b.key for b in budgets],
        "large_eps": None if big is None else big.key,
        "positive_class": pos,
        "gallery": gallery,
        "schema_version": SCHEMA_VERSION,
    }
    run_hash = sha256_json(run_config)[:32]
    settings = RunSettings(norm=norm_name, seed=seed, unit_hash=unit_hash, direction=direction,
                           positive_class=pos, progress=progress, resume=resume,
                           model_name=_model_name(info))
    run_id = uuid.uuid4().hex

    out_dir = None if out is None else Path(out).expanduser()
    if out_dir is None:
        results, gal, gal_json, counts = _compute(
            clf, info, data, labels, specs, budgets, big, k, pos, settings, None, batch_size,
            gallery, seed, direction, attack_kwargs, steps, run_id)
    else:
        from medrobust.evaluation.output import (
            OutputLock,
            clear_previous,
            existing_run_hash,
            prepare_out,
        )

        prepare_out(out_dir, overwrite)
        with OutputLock(out_dir):
            if overwrite:
                clear_previous(out_dir)
            prior = existing_run_hash(out_dir)
            if prior is not None and prior != run_hash and not overwrite:
                raise EvaluationError(
                    f"{out_dir}: holds the results of another evaluation (results.json); "
                    "choose another folder or pass overwrite to replace them"
                )
            db_path = out_dir / DB_NAME
            if not resume and not overwrite and (prior is not None or db_path.exists()):
                raise EvaluationError(
                    f"{out_dir}: holds earlier results; resume=False would recompute them: "
                    "pass overwrite to replace them"
                )
            results, gal, gal_json, counts = _compute(
                clf, info, data, labels, specs, budgets, big, k, pos, settings, db_path,
                batch_size, gallery, seed, direction, attack_kwargs, steps, run_id)
            doc = _document(results, gal_json, counts, info, data, specs, budgets, big, k, pos,
                            norm_name, batch_size, direction, seed, data_sha, run_hash, clf,
                            started, started_iso)
            _write(out_dir, doc, gal)
            return EvaluationResult(doc, out_dir, gal)
    doc = _document(results, gal_json, counts, info, data, specs, budgets, big, k, pos,
                    norm_name, batch_size, direction, seed, data_sha, run_hash, clf, started,
                    started_iso)
    return EvaluationResult(doc, None, gal)


def _compute(
    clf: Any, info: ModelInfo, data: ImageData, labels: torch.Tensor, specs: list[AttackSpec],
    budgets: list[Budget], big: Budget | None, k: int, pos: int, settings: RunSettings,
    db_path: Path | None, batch_size: int, gallery: int, seed: int, direction: str | None,
    attack_kwargs: Mapping[str, Mapping[str, Any]] | None, steps: int | None, run_id: str,
) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """Plan, run, aggregate, check (and run the fallback attacks when a check failed)."""
    from medrobust.evaluation.aggregate import aggregate
    from medrobust.evaluation.families import FAMILIES, build_ensemble_spec
    from medrobust.evaluation.families.ensemble import FALLBACK
    from medrobust.evaluation.gallery import build_gallery
    from medrobust.evaluation.headline import _has_masking_resistant, headline
    from medrobust.evaluation.preflight import PROBE, model_checks, preflight_checks
    from medrobust.evaluation.sanity import run_checks

    assert FAMILIES  # the families register on import
    store = ResultsStore(db_path, run_id=run_id)
    try:
        plan = make_plan(specs, budgets, big, len(data), batch_size)
        collected = run_plan(clf, data, labels, plan, store, settings)
        agg = dict(labels=labels.numpy(), k=k, task=data.task, budgets=budgets,
                   direction=direction, positive_class=pos, seed=seed)
        results = aggregate(collected=collected, specs=specs, big=big, **agg)  # type: ignore
        notes = [n for s in specs for n in s.notes]
        rand_aware = any(s.name == "standard-rand" for s in specs)
        probes = model_checks(clf, data.images[:PROBE], rand_aware)
        pre = preflight_checks(collected[f"{CLEAN_UNIT}|"]["pred"], k, notes, probes)
        sanity = run_checks(results)
        sanity["checks"] = pre + sanity["checks"]
        sanity["preflight"] = [c["id"] for c in pre]
        sanity["failed"] = [c["id"] for c in sanity["checks"] if c["status"] == "fail"]
        sanity["warnings"] = [c["id"] for c in sanity["checks"] if c["status"] == "warn"]
        sanity["passed"] = not sanity["failed"]
        masking = [c["id"] for c in sanity["checks"]
                   if c["status"] == "fail" and c["check"] in MASKING_CHECKS]
        sanity["gradient_masking_suspected"] = bool(masking)
        results["sanity"] = sanity
        computed, reused = collected.computed, collected.reused
        if masking and not _has_masking_resistant(results):
            fb = build_ensemble_spec(FALLBACK, settings.norm, k, attack_kwargs, {"steps": steps})
            fplan = make_plan([fb], budgets, None, len(data), batch_size, clean=False)
            more = run_plan(clf, data, labels, fplan, store, settings,
                            clean_all=collected[f"{CLEAN_UNIT}|"])
            computed += more.computed
            reused += more.reused
            merged = Collected({**collected.records, **more.records})
            both = aggregate(collected=merged, specs=[*specs, fb], big=None, **agg)  # type: ignore
            results["alternative"] = {
                "reason": f"checks failed: {', '.join(masking)}",
                "attacks": [c.label for c in fb.components],
                "notes": list(fb.notes),
                "block": both["attacks"][fb.name],
                "worst_case": both["worst_case"],
            }
            results["timing"][fb.name] = both["timing"][fb.name]
        results["headline"] = headline(results)
        gal, gal_json = build_gallery(
            clf, data, labels, specs, budgets, results, collected, settings, batch_size, gallery,
            display_window(clf, info.metadata, data),
        )
    finally:
        store.close()
    return results, gal, gal_json, {"computed": computed, "reused": reused, "run_id": run_id}


def _document(
    results: dict[str, Any], gal_json: list[dict[str, Any]], counts: dict[str, Any],
    info: ModelInfo, data: ImageData, specs: list[AttackSpec], budgets: list[Budget],
    big: Budget | None, k: int, pos: int, norm_name: str, batch_size: int,
    direction: str | None, seed: int, data_sha: str, run_hash: str, clf: Any, started: float,
    started_iso: str,
) -> dict[str, Any]:
    from medrobust import __version__
    from medrobust.evaluation.schema import SCHEMA_VERSION

    results = dict(results)
    timing = results.pop("timing", {})
    labels = data.labels.to(torch.int64).numpy()
    doc: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "kind": "medrobust-evaluation",
        "medrobust_version": __version__,
        "config_hash": run_hash,
        "seed": seed,
        "config": {
            "attacks": [s.describe(norm_name) for s in specs],
            "eps": [b.value for b in budgets],
            "eps_labels": [b.label for b in budgets],
            "large_eps": None if big is None else big.value,
            "norm": norm_name,
            "batch_size": batch_size,
            "direction": direction,
            "positive_class": pos if k == 2 else None,
            "units": str(info.metadata.get("input", {}).get("units") or data.units),
            "bounds": list(clf.bounds),
            "display_window": list(display_window(clf, info.metadata, data)),
        },
        "model": {
            "source": info.source,
            "weights_sha256": info.weights_file_sha256,
            "state_dict_sha256": info.weights_sha256,
            "architecture": jsonable(info.metadata.get("architecture")),
            "task": info.metadata.get("task", data.task),
            "num_classes": k,
            "class_names": list(info.metadata.get("class_names") or data.class_names
                                or [str(i) for i in range(k)]),
        },
        "data": {
            "source": data.source or None,
            "dataset": data.meta.get("dataset"),
            "split": data.meta.get("split"),
            "file_sha256": data.meta.get("sha256"),
            "content_sha256": data_sha,
            "n": len(data),
            "shape": list(data.images.shape[1:]),
            "task": data.task,
            "units": data.units,
            "bounds": list(data.bounds),
            "class_names": list(data.class_names) or [str(i) for i in range(k)],
            "class_counts": np.bincount(labels, minlength=k).tolist(),
        },
        **results,
        "gallery": gal_json,
        "run": {
            "started": started_iso,
            "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "duration_s": round(time.time() - started, 3),
            "units_computed": counts["computed"],
            "units_reused": counts["reused"],
            "run_id": counts["run_id"],
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "device": str(clf.device),
            "timing": timing,
        },
    }
    return jsonable(doc)  # type: ignore[no-any-return]


def _write(out_dir: Path, doc: dict[str, Any], gal: list[dict[str, Any]]) -> None:
    """Render everything in memory, then write it all or nothing."""
    from medrobust.evaluation.figures import render_figures
    from medrobust.evaluation.output import FIGURES_DIR, write_outputs
    from medrobust.evaluation.report import render_report

    figures = render_figures(doc, gal)
    files = {f"{FIGURES_DIR}/{name}": data for name, data in figures.items()}
    files[REPORT_HTML] = render_report(doc, figures).encode("utf-8")
    files[RESULTS_JSON] = (json.dumps(doc, indent=2) + "\n").encode("utf-8")
    write_outputs(out_dir, files)
