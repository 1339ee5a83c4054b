"""``results.json``: the versioned, documented output of :func:`medrobust.evaluate`.

``schema_version`` changes whenever a field is removed or changes meaning; adding a field keeps
it. Older files stay readable: :func:`read_results` (and :func:`upgrade`) bring a version-1 file to
the current layout.

Version history:

* 1 — the first layout.
* 2 — ``success_rate`` of the per-budget entries and of ``worst_case`` is renamed
  ``success_on_correct`` ("attack success on correctly classified samples"), so that "success
  rate" means one thing everywhere (an ``AttackResult.success_rate`` is over all samples). Added:
  ``headline`` (the figure to quote and whether it is reliable), ``preflight`` checks inside
  ``sanity`` (status ``info`` besides pass/fail/warn/skipped, and ``warnings``), ensembles
  (``kind: "ensemble"`` with ``components``, per-budget ``broken_by``, ``robust_after`` and
  ``cost``), ``alternative`` (the fallback attacks run when a check failed), ``gradient_free``,
  per-budget ``cost`` (forward/backward passes), ``clean.predicted_classes``, the ordinal
  ``grade_error``/``grade_shift``, ``robust_auc`` (binary), and ``run.timing`` (seconds per
  attack and component; volatile).

Every number is plain JSON; a missing or undefined number (an AUC with one class, a statistic
over no sample, an infinite PSNR) is ``null``. Budgets are in the model's input units.

A proportion (``P`` below) is ``{"value", "ci_low", "ci_high", "k", "n"}``: ``k`` of ``n`` with
the 95% Wilson interval. A statistic (``S``) is ``{"n", "mean", "median", "min", "max"}`` over the
finite values.

Top level::

    schema_version   int (this is version 2)
    kind             "medrobust-evaluation"
    medrobust_version
    config_hash      hash of everything that determines the numbers (the rerun key)
    seed             the run's seed (each unit's attack seed is derived from it)
    config           {attacks: [{name, kind: "fixed-budget"|"minimum-norm", single_step,
                      kwargs, config, key}], eps: [float], eps_labels: [str], large_eps,
                      norm, batch_size, direction: null|"pos2neg"|"neg2pos", positive_class,
                      units, bounds, display_window}
    model            {source, weights_sha256 (of the weights file, when loaded from a folder),
                      state_dict_sha256, architecture, task, num_classes, class_names}
    data             {source, dataset, split, file_sha256 (when known), content_sha256 (of the
                      evaluated tensors), n, shape, task, units, bounds, class_names,
                      class_counts}
    clean            {n, accuracy: P, auc: {value, ci_low, ci_high, method},
                      per_class: [{class, name, **P}], sensitivity: P, specificity: P (binary)}
    attacks          {name: {key, kind, single_step,
                        per_eps: [E], large_eps: E|null, distance: S (minimum-norm only)}}
    worst_case       [{eps, eps_label, n, robust_accuracy: P, success_on_correct: P,
                       fooled_only_by: {attack: int}, per_class, sensitivity, specificity}]
    sanity           {passed, failed: [id], tolerance_samples, gradient_masking_suspected,
                      checks: [{id, check: "eps0"|"monotonic"|"iterative"|"large_eps", attack,
                                status: "pass"|"fail"|"warn"|"skipped", detail, values}]}
    gallery          [{index, label, label_name, attack, eps, eps_label, fooled, reproduced,
                       linf, l2, clean_top3: [{class, name, prob}], adversarial_top3, window}]
    run              {started, finished, duration_s, units_computed, units_reused, run_id,
                      python, torch, device}  — the only volatile field: everything outside
                      "run" is identical for a resumed and an uninterrupted run.

A per-budget entry ``E``::

    {eps, eps_label, n, n_attacked,
     robust_accuracy: P   (correct clean and under the attack, over all n),
     raw_accuracy: P      (correct under the attack alone, over all n),
     success_on_correct: P (fooled, among the attacked samples correct when clean),
     perturbation: {successful: {linf: S, l2: S, psnr: S, ssim: S}, attacked: {...}},
     per_class: [{class, name, **P}], sensitivity: P, specificity: P (binary)}

Definitions are in :mod:`medrobust.evaluation.aggregate` and :mod:`medrobust.evaluation.sanity`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["REQUIRED_KEYS", "SCHEMA_VERSION", "read_results", "stable_view", "upgrade",
           "validate"]

SCHEMA_VERSION = 2

REQUIRED_KEYS = (
    "schema_version", "kind", "medrobust_version", "config_hash", "seed", "config", "model",
    "data", "clean", "attacks", "worst_case", "sanity", "gallery", "run",
)

VOLATILE_KEYS = ("run",)


def stable_view(doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` without its volatile fields (timestamps, durations, run counters)."""
    return {k: v for k, v in doc.items() if k not in VOLATILE_KEYS}


def _rename(entry: Any) -> None:
    if isinstance(entry, dict) and "success_rate" in entry and "success_on_correct" not in entry:
        entry["success_on_correct"] = entry.pop("success_rate")


def upgrade(doc: dict[str, Any]) -> dict[str, Any]:
    """A copy of a ``results.json`` document in the current layout (version 1 files: the
    renamed ``success_on_correct``, an empty ``warnings`` list, ``headline`` from the worst
    case)."""
    import copy

    out = copy.deepcopy(doc)
    v = out.get("schema_version")
    if not isinstance(v, int) or v >= SCHEMA_VERSION:
        return out
    for a in (out.get("attacks") or {}).values():
        for e in a.get("per_eps") or []:
            _rename(e)
        _rename(a.get("large_eps"))
    for w in out.get("worst_case") or []:
        _rename(w)
    sanity = out.get("sanity") or {}
    sanity.setdefault("warnings", [c["id"] for c in sanity.get("checks", [])
                                   if c.get("status") == "warn"])
    if "headline" not in out and "sanity" in out:
        from medrobust.evaluation.headline import headline

        out["headline"] = headline(out)
    out["schema_version_read"] = v
    return out


def read_results(path: Any) -> dict[str, Any]:
    """Read a ``results.json`` of any version this medrobust knows, in the current layout."""
    import json
    from pathlib import Path

    doc = json.loads(Path(path).read_text(encoding="utf-8"))
    validate(doc)
    return upgrade(doc)


def validate(doc: dict[str, Any]) -> None:
    """Raise ``ValueError`` when ``doc`` is not a ``results.json`` this version can read."""
    if not isinstance(doc, dict):
        raise ValueError("results.json must hold a JSON object")
    missing = [k for k in REQUIRED_KEYS if k not in doc]
    if missing:
        raise ValueError(f"results.json: missing key(s) {missing}")
    if doc["kind"] != "medrobust-evaluation":
        raise ValueError(f"results.json: kind {doc['kind']!r} is not a medrobust evaluation")
    v = doc["schema_version"]
    if not isinstance(v, int) or v > SCHEMA_VERSION:
        raise ValueError(f"results.json: schema_version {v!r} is newer than this medrobust reads")
    eps = doc["config"]["eps"]
    for name, a in doc["attacks"].items():
        if [e["eps"] for e in a["per_eps"]] != eps:
            raise ValueError(f"results.json: attack {name!r} does not cover every eps")
    if [w["eps"] for w in doc["worst_case"]] != eps:
        raise ValueError("results.json: worst_case does not cover every eps")
