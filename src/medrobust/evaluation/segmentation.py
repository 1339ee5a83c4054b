"""Robustness evaluation of a segmenter: Dice (and HD95) clean and under attack, per case.

The units run through the evaluation pipeline's planner, runner and resumable store
(:mod:`medrobust.evaluation.plan`, :mod:`~medrobust.evaluation.runner`,
:mod:`~medrobust.evaluation.store`) as the family ``"segmentation"``
(:class:`SegmentationFamily`, registered on import): one unit per attack, budget and batch,
computed at the full budget (no early stop: the Dice reached, not the first success). A unit stores
small per-case vectors only (Dice per class, the share of voxels changed, the L-inf norm), never
volumes. What differs from a classifier's evaluation is the aggregation (there is no robust
accuracy): :func:`evaluate_segmentation` reports

* the clean Dice and HD95 (95th-percentile Hausdorff distance, in the voxel spacing's units) per
  class, with bootstrap 95% intervals over cases;
* the Dice per class under each attack and budget, with intervals over cases;
* the per-case worst case over attacks at each budget (the lowest Dice any attack reached);
* figures: Dice versus eps per foreground class, and overlays of the clean prediction, the
  adversarial prediction and the perturbation on axial, coronal and sagittal slices of the case
  hurt most;
* with an output folder, ``report.html`` (:mod:`medrobust.evaluation.report_segmentation`): all of
  the above in one self-contained page, budgets stated in the volume's units (HU for CT, [0, 1] for
  normalized MR) with the region of interest the attacks were confined to
  (:mod:`medrobust.evaluation.roi`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medrobust.attacks import ATTACKS, FixedBudgetAttack
from medrobust.criteria import DenseCriterion, dice_per_class
from medrobust.data.base import ImageData
from medrobust.evaluation.budgets import Budget, default_budgets, parse_budgets
from medrobust.evaluation.errors import EvaluationError
from medrobust.evaluation.families.base import (
    Family,
    UnitJob,
    UnitOutput,
    register_family,
)
from medrobust.evaluation.plan import CLEAN_UNIT, make_plan, split_names
from medrobust.evaluation.roi import Roi, parse_roi
from medrobust.evaluation.runner import RunSettings, run_plan
from medrobust.evaluation.specs import RESERVED, AttackSpec
from medrobust.evaluation.store import DB_NAME, ResultsStore
from medrobust.evaluation.util import (
    accepts,
    jsonable,
    sha256_json,
    state_dict_sha256,
    tensor_sha256,
)
from medrobust.models import Segmenter

__all__ = ["SegmentationFamily", "evaluate_segmentation", "hd95", "hurt_most", "summary_lines"]

FAMILY = "segmentation"
RESULTS_FILE = "segmentation_results.json"
REPORT_FILE = "report.html"


# ------------------------------------------------------------------------------ metrics
def hd95(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float] | None = None) -> float:
    """The 95th-percentile Hausdorff distance between two boolean masks, as MONAI computes it:
    the larger of the two directed 95th percentiles of the surface-to-surface distances, in the
    units of ``spacing`` (voxels by default); ``nan`` when either mask is empty."""
    from scipy import ndimage

    p, t = np.asarray(pred, dtype=bool), np.asarray(truth, dtype=bool)
    if not p.any() or not t.any():
        return math.nan
    sampling = None if spacing is None else [float(s) for s in spacing]
    ps = p & ~ndimage.binary_erosion(p)
    ts = t & ~ndimage.binary_erosion(t)
    to_t = ndimage.distance_transform_edt(~ts, sampling=sampling)
    to_p = ndimage.distance_transform_edt(~ps, sampling=sampling)
    return float(max(np.percentile(to_t[ps], 95), np.percentile(to_p[ts], 95)))


def _mean_ci(values: np.ndarray, seed: int = 0, n_boot: int = 2000) -> dict[str, Any]:
    """Mean over cases with a percentile-bootstrap 95% interval (cases with NaN left out)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    if v.size == 0:
        return {"mean": None, "ci95": [None, None], "n": 0}
    rng = np.random.default_rng(seed)
    boots = rng.choice(v, size=(n_boot, v.size), replace=True).mean(1)
    return {"mean": float(v.mean()), "ci95": [float(np.quantile(boots, 0.025)),
                                                float(np.quantile(boots, 0.975))],
            "n": int(v.size)}


# ------------------------------------------------------------------------------ the family
class SegmentationFamily(Family):
    """Units of a segmenter's evaluation: one attack at one budget on one batch of cases.

    The attack is built by the spec (``criterion`` in the spec's ``segmentation_criterion``
    attribute, default the segmenter's); the record holds, per attacked case, ``dice`` (K
    values), ``changed`` (the share of voxels whose prediction the attack changed) and ``linf``.
    """

    name = FAMILY

    def run(self, spec: AttackSpec, job: UnitJob) -> UnitOutput:
        attack = spec.build(job.eps, job.norm, job.seed)
        idx = job.idx
        x, y = job.x[idx], job.y[idx]
        criterion = getattr(spec, "segmentation_criterion", None)
        roi: Roi | None = getattr(spec, "segmentation_roi", None)
        mask = None if roi is None else roi.mask(x, y)
        res = attack(job.clf, x, y, criterion=criterion, mask=mask)
        assert res.dice is not None
        clean_pred = job.clean_logits[idx].argmax(1)
        changed = (res.predictions != clean_pred).reshape(len(idx), -1).float().mean(1)
        record = {
            "idx": idx.numpy().astype(np.int64),
            "dice": res.dice.numpy().astype(np.float64),
            "changed": changed.numpy().astype(np.float64),
            "linf": res.perturbation_norms["linf"].numpy().astype(np.float64),
        }
        return UnitOutput(record, res.adversarial)

    def vectors(self, spec: AttackSpec, rec: dict[str, np.ndarray], budget: Budget,
                clean_pred: np.ndarray) -> dict[str, np.ndarray]:
        """Per-case vectors at ``budget``: ``dice`` (N, K), ``changed``, ``linf``."""
        return {k: rec[k] for k in ("dice", "changed", "linf")}


register_family(SegmentationFamily())


def _specs(attacks: Sequence[str] | str, norm: str,
           attack_kwargs: Mapping[str, Mapping[str, Any]] | None, steps: int | None,
           criterion: DenseCriterion | None) -> list[AttackSpec]:
    specs: list[AttackSpec] = []
    per = {str(k).lower().replace("-", "").replace("_", ""): dict(v)
           for k, v in (attack_kwargs or {}).items()}
    for raw in split_names(attacks):
        name = raw.lower().replace("-", "").replace("_", "")
        cls = ATTACKS.get(name)
        if cls is None:
            raise EvaluationError(
                f"unknown attack {raw!r}; available: {', '.join(sorted(ATTACKS))}"
            )
        if not getattr(cls, "supports_dense", False):
            raise EvaluationError(
                f"attack {raw!r} cannot attack a segmenter (dense outputs); use fgsm, bim, pgd, "
                "mifgsm, cospgd or dag"
            )
        kw: dict[str, Any] = {}
        if accepts(cls, "early_stop"):
            kw["early_stop"] = False  # the Dice reached with the whole budget
        if steps is not None and accepts(cls, "steps"):
            kw["steps"] = int(steps)
        elif steps is not None and accepts(cls, "max_iter"):  # DAG's iteration cap
            kw["max_iter"] = int(steps)
        kw.update(per.get(name, {}))
        bad = [k for k in kw if k in RESERVED]
        if bad:
            raise EvaluationError(f"attack {raw!r}: {', '.join(bad)} are set by the evaluation")
        crit_cfg = None if criterion is None else {"criterion": type(criterion).__name__,
                                                    **jsonable(vars(criterion))}
        key = f"{name}:{sha256_json(jsonable({'kw': kw, 'crit': crit_cfg}))[:12]}"
        minimization = not (issubclass(cls, FixedBudgetAttack) or accepts(cls, "eps"))
        if minimization:
            raise EvaluationError(f"attack {raw!r} has no budget; a segmenter's evaluation "
                                  "sweeps eps")
        spec = AttackSpec(name, cls, kw, key, False, single_step=False, kind=FAMILY)
        spec.segmentation_criterion = criterion  # type: ignore[attr-defined]
        try:
            spec.build(0.0, norm, 0)
        except (TypeError, ValueError) as err:
            raise EvaluationError(f"attack {raw!r}: invalid arguments {kw}: {err}") from None
        specs.append(spec)
    if not specs:
        raise EvaluationError("no attack given")
    return specs


def _resolve(model: Any, device: Any) -> tuple[Segmenter, str]:
    if isinstance(model, Segmenter):
        return model, type(model.module).__name__
    if isinstance(model, (str, os.PathLike)):
        from medrobust.modelstore import load_model

        loaded = load_model(model, device=device)
        if loaded.segmenter is None:
            raise EvaluationError(f"{model}: a {loaded.task} model, not a segmenter")
        return loaded.segmenter, str(model)
    seg = getattr(model, "segmenter", None)
    if isinstance(seg, Segmenter):
        return seg, str(getattr(model, "path", None) or "loaded model")
    raise EvaluationError(
        f"model must be a medrobust.Segmenter or a segmentation model folder; got "
        f"{type(model).__name__}"
    )


# ------------------------------------------------------------------------------ the evaluation
def evaluate_segmentation(
    model: Any,
    data: ImageData,
    attacks: Sequence[str] | str = ("pgd", "cospgd", "dag"),
    eps: Sequence[float | str | Budget] | str | None = None,
    norm: str = "linf",
    out: str | os.PathLike[str] | None = None,
    batch_size: int = 4,
    seed: int = 0,
    *,
    criterion: DenseCriterion | None = None,
    attack_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    steps: int | None = None,
    progress: bool = False,
    resume: bool = True,
    figures: bool = True,
    device: str | torch.device | None = None,
    roi: torch.Tensor | str | None = None,
    units: str | None = None,
) -> dict[str, Any]:
    """Evaluate a segmenter's robustness on a labelled data set (see the module docstring).

    Args:
        model: a :class:`~medrobust.Segmenter`, a loaded model, or a segmentation model folder.
        data: images in the model's units and label maps ``(N, *spatial)``.
        attacks: attacks with dense support (``fgsm``, ``bim``, ``pgd``, ``mifgsm``, ``cospgd``,
            ``dag``), a list or a comma-separated text.
        eps: budgets in the model's input units (numbers or texts such as ``"4/255"``); default
            0, 1, 2, 4, 8 /255 of the input range (L-inf).
        norm: the budget's norm (DAG: L-inf only).
        out: a folder for ``segmentation_results.json``, the figures and the resumable
            ``results.sqlite`` (a rerun continues); ``None`` keeps everything in memory.
        batch_size: cases per unit of work.
        seed: the run's seed (each unit's attack seed derives from it).
        criterion: the attacks' criterion (e.g. ``DiceBelow(2, 0.5)``); default the segmenter's
            (:class:`~medrobust.criteria.PixelFraction`).
        attack_kwargs: extra arguments per attack name, e.g. ``{"dag": {"max_iter": 50}}``.
        steps: the number of steps of every attack that takes ``steps`` (DAG: ``max_iter``).
        progress: a progress bar on stderr.
        resume: reuse the units stored in ``out``'s database.
        figures: write the Dice-versus-eps curve and the overlays (needs ``out``).
        device: where to load a model folder.
        roi: where the attacks may perturb (:mod:`medrobust.evaluation.roi`): ``None`` (the
            whole volume), a mask shared by every case, or ``"box[:margin]"`` (a box around each
            case's foreground).
        units: what the budgets are in, for the report (default: the loaded model's units, else
            the data's).

    Returns:
        The results document (also written to ``out/segmentation_results.json``, with
        ``out/report.html``).
    """
    seg, model_name = _resolve(model, device)
    if data.task != "segmentation" or data.labels.dim() != data.images.dim() - 1:
        raise EvaluationError(
            f"data must be a segmentation set (label maps (N, *spatial)); got task "
            f"{data.task!r} with labels of shape {tuple(data.labels.shape)}"
        )
    if isinstance(batch_size, bool) or int(batch_size) < 1:
        raise EvaluationError(f"batch_size must be a positive integer; got {batch_size!r}")
    norm_name = str(norm).lower()
    specs = _specs(attacks, norm_name, attack_kwargs, steps, criterion)
    region = parse_roi(roi, data.images)
    for spec in specs:
        spec.segmentation_roi = region  # type: ignore[attr-defined]
    if units is None:
        units = getattr(model, "units", None) or getattr(data, "units", None)
    budgets = (default_budgets(seg.bounds, norm_name, units)
               if eps is None else parse_budgets(eps))
    labels = data.labels.to(torch.int64)
    seg.check_inputs(data.images[:1])
    with seg.attack_mode():
        k, spatial, _ = seg.output_shape(data.images[:1].to(seg.dtype))
    if tuple(labels.shape[1:]) != spatial:
        raise EvaluationError(
            f"label maps have spatial shape {tuple(labels.shape[1:])} but the segmenter's "
            f"output is {spatial}"
        )
    base = {
        "kind": FAMILY,
        "weights": state_dict_sha256(seg.module),
        "data": tensor_sha256(data.images, labels),
        "bounds": list(seg.bounds),
        "batch_size": int(batch_size),
        "seed": int(seed),
        "norm": norm_name,
    }
    if region.kind != "none":  # the hash of an evaluation without ROI stays what it was
        base["roi"] = region.key()
    unit_hash = sha256_json(base)[:32]
    settings = RunSettings(norm=norm_name, seed=int(seed), unit_hash=unit_hash,
                           progress=progress, resume=resume, model_name=model_name)
    out_dir = None if out is None else Path(out).expanduser()
    if out_dir is not None:
        _refuse_foreign_results(out_dir / RESULTS_FILE)
        out_dir.mkdir(parents=True, exist_ok=True)
    store = ResultsStore(None if out_dir is None else out_dir / DB_NAME)
    try:
        plan = make_plan(specs, budgets, None, len(data), int(batch_size))
        collected = run_plan(seg, data, labels, plan, store, settings)  # type: ignore[arg-type]
    finally:
        store.close()

    clean_pred = torch.from_numpy(collected[f"{CLEAN_UNIT}|"]["pred"])
    names = list(data.class_names) if data.class_names else [str(c) for c in range(k)]
    clean_dice = dice_per_class(clean_pred, labels, k).numpy()
    spacing = getattr(data, "spacing", None)
    clean_hd = np.array([[hd95((clean_pred[i] == c).numpy(), (labels[i] == c).numpy(), spacing)
                          for c in range(k)] for i in range(len(data))])
    doc: dict[str, Any] = {
        "kind": FAMILY,
        "model": model_name,
        "n": len(data),
        "classes": names,
        "norm": norm_name,
        "budget_units": None if units is None else str(units),
        "bounds": [float(v) for v in seg.bounds],
        "spacing": None if spacing is None else [float(v) for v in spacing],
        "roi": region.describe(labels),
        "eps": [{"label": b.label, "value": b.value} for b in budgets],
        "criterion": None if criterion is None else type(criterion).__name__,
        "clean": {names[c]: {"dice": _mean_ci(clean_dice[:, c], seed),
                             "hd95": _mean_ci(clean_hd[:, c], seed)} for c in range(1, k)},
        "attacks": {},
        "worst_case": [],
        "per_case": {"clean_dice": clean_dice.tolist()},
        "units": {"computed": collected.computed, "reused": collected.reused},
    }
    per_attack: dict[str, list[np.ndarray]] = {}
    for spec in specs:
        entries = []
        per_attack[spec.name] = []
        for b in budgets:
            rec = collected[f"{spec.key}|{b.key}"]
            dice = np.full((len(data), k), np.nan)
            dice[rec["idx"]] = rec["dice"]
            per_attack[spec.name].append(dice)
            entries.append({
                "eps": b.label, "value": b.value,
                "dice": {names[c]: _mean_ci(dice[:, c], seed) for c in range(1, k)},
                "changed_voxels": _mean_ci(rec["changed"], seed)["mean"],
                "linf_max": float(np.max(rec["linf"])) if len(rec["linf"]) else None,
            })
        doc["attacks"][spec.name] = {"config": spec.describe(norm_name), "per_eps": entries}
    worst_all = []
    for j, b in enumerate(budgets):
        stack = np.stack([per_attack[s.name][j] for s in specs])  # (attacks, N, K)
        worst = np.nanmin(np.where(np.isnan(stack), np.inf, stack), axis=0)
        worst = np.where(np.isinf(worst), np.nan, worst)
        worst_all.append(worst)
        doc["worst_case"].append({
            "eps": b.label, "value": b.value,
            "dice": {names[c]: _mean_ci(worst[:, c], seed) for c in range(1, k)},
            "lowest_case": {names[c]: (None if np.all(np.isnan(worst[:, c])) else
                                       int(np.nanargmin(worst[:, c]))) for c in range(1, k)},
        })
    doc["per_case"]["worst_dice"] = {b.label: w.tolist() for b, w in zip(budgets, worst_all,
                                                                          strict=True)}
    if out_dir is not None:
        if figures:
            doc["figures"] = _figures(out_dir, seg, data, labels, specs, budgets, per_attack,
                                      worst_all, clean_dice, names, norm_name, seed, criterion,
                                      region)
        text = json.dumps(jsonable(doc), indent=2, allow_nan=False)
        tmp = out_dir / f".{RESULTS_FILE}.{os.getpid()}.tmp"
        tmp.write_text(text + "\n", encoding="utf-8")
        os.replace(tmp, out_dir / RESULTS_FILE)
        from medrobust.evaluation.report_segmentation import write_segmentation_report

        write_segmentation_report(json.loads(text), out_dir / REPORT_FILE, out_dir)
        doc["report"] = REPORT_FILE
    return doc


def _refuse_foreign_results(path: Path) -> None:
    """Refuse to run when ``path`` exists and is not a segmentation results file medrobust
    wrote (it would be replaced at the end of the run)."""
    if not path.exists():
        return
    try:
        kind = json.loads(path.read_text(encoding="utf-8")).get("kind")
    except (OSError, ValueError, AttributeError):
        kind = None
    if kind != FAMILY:
        raise EvaluationError(f"{path}: exists and is not a segmentation results file medrobust "
                              "wrote; not replaced (choose another output folder)")


def _figures(out_dir: Path, seg: Segmenter, data: ImageData, labels: torch.Tensor,
             specs: list[AttackSpec], budgets: list[Budget],
             per_attack: dict[str, list[np.ndarray]], worst: list[np.ndarray],
             clean_dice: np.ndarray, names: list[str], norm: str, seed: int,
             criterion: DenseCriterion | None, region: Roi) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig_dir = out_dir / "figures"
    fig_dir.mkdir(exist_ok=True)
    k = clean_dice.shape[1]
    xs = [b.value for b in budgets]
    fig, axes = plt.subplots(1, k - 1, figsize=(4.5 * (k - 1), 3.6), squeeze=False)
    for c in range(1, k):
        ax = axes[0, c - 1]
        for s in specs:
            ax.plot(xs, [np.nanmean(d[:, c]) for d in per_attack[s.name]], marker="o",
                    label=s.name)
        ax.plot(xs, [np.nanmean(w[:, c]) for w in worst], "k--", marker="s",
                label="worst case")
        ax.set_title(f"Dice: {names[c]}")
        ax.set_xlabel(f"eps ({norm})")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    curve = fig_dir / "dice_vs_eps.png"
    fig.savefig(curve, dpi=100)
    plt.close(fig)
    out = {"dice_vs_eps": str(curve.relative_to(out_dir))}

    # overlays: the case hurt most (the largest drop of the first foreground class's Dice from
    # clean to the worst case at the largest budget) and the attack that hurt it most, recomputed
    # on that case alone (the store holds no volumes)
    j = len(budgets) - 1
    c = 1
    case = hurt_most(clean_dice[:, c], worst[j][:, c])
    if case is None:
        return out
    best = min(specs, key=lambda s: np.nan_to_num(per_attack[s.name][j][case, c], nan=2.0))
    x = data.images[case:case + 1].to(seg.dtype)
    y = labels[case:case + 1]
    res = best.build(budgets[j].value, norm, seed)(seg, x, y, criterion=criterion,
                                                   mask=region.mask(x, y))
    clean_pred = seg.predict(x)[0].numpy()
    adv_pred = res.predictions[0].numpy()
    img = x[0, 0].float().numpy()
    delta = (res.adversarial - x)[0, 0].float().numpy()
    planes = _planes(img.ndim, (labels[case] == c).numpy())
    fig, axes = plt.subplots(len(planes), 3, figsize=(9, 3 * len(planes)), squeeze=False)
    lim = max(float(np.abs(delta).max()), 1e-12)
    for r, (plane, sl) in enumerate(planes):
        for col, (title, mask) in enumerate((("clean prediction", clean_pred),
                                             ("adversarial prediction", adv_pred))):
            ax = axes[r, col]
            ax.imshow(img[sl], cmap="gray")
            ax.imshow(np.ma.masked_where(mask[sl] == 0, mask[sl]), cmap="tab10", alpha=0.5,
                      vmin=0, vmax=9, interpolation="nearest")
            ax.set_title(f"{title} ({plane})", fontsize=8)
            ax.axis("off")
        ax = axes[r, 2]
        ax.imshow(delta[sl], cmap="RdBu_r", vmin=-lim, vmax=lim)
        ax.set_title(f"perturbation ({plane}, |max| {lim:.3g})", fontsize=8)
        ax.axis("off")
    fig.suptitle(f"case {case}, {best.name} at eps {budgets[j].label}", fontsize=9)
    fig.tight_layout()
    overlay = fig_dir / "overlays.png"
    fig.savefig(overlay, dpi=100)
    plt.close(fig)
    out["overlays"] = str(overlay.relative_to(out_dir))
    out["overlay_case"] = str(case)
    out["overlay_attack"] = best.name
    out["overlay_eps"] = budgets[j].label
    out["overlay_planes"] = ",".join(plane for plane, _ in planes)
    return out


def hurt_most(clean: np.ndarray, worst: np.ndarray) -> int | None:
    """The case with the largest Dice drop from ``clean`` to ``worst`` (ties: the lower worst
    Dice, then the first); ``None`` when no case has both values."""
    drop = np.asarray(clean, dtype=np.float64) - np.asarray(worst, dtype=np.float64)
    ok = ~np.isnan(drop)
    if not ok.any():
        return None
    cand = np.flatnonzero(ok)
    order = np.lexsort((cand, worst[cand], -drop[cand]))
    return int(cand[order[0]])


def _planes(ndim: int, structure: np.ndarray) -> list[tuple[str, tuple[Any, ...]]]:
    """Slices through the structure's centre: axial, coronal, sagittal (3D) or the image (2D)."""
    if ndim == 2:
        return [("image", (slice(None), slice(None)))]
    pts = np.argwhere(structure)
    centre = pts.mean(0).round().astype(int) if len(pts) else np.array(structure.shape) // 2
    d, h, w = (int(v) for v in centre)
    return [("axial", (d, slice(None), slice(None))),
            ("coronal", (slice(None), h, slice(None))),
            ("sagittal", (slice(None), slice(None), w))]


def summary_lines(doc: dict[str, Any]) -> list[str]:
    """A plain-text table of a segmentation evaluation: mean Dice per foreground class, clean,
    under each attack and budget, and the per-case worst case."""
    names = doc["classes"][1:]

    def cell(d: dict[str, Any]) -> str:
        m = d.get("mean")
        return "   nan" if m is None else f"{m:6.3f}"

    head = f"{'':24s}{'eps':>10s}  " + "  ".join(f"{n[:12]:>12s}" for n in names)
    lines = [f"Dice (mean over {doc['n']} cases)", head]
    lines.append(f"{'clean':24s}{'':>10s}  "
                 + "  ".join(f"{cell(doc['clean'][n]['dice']):>12s}" for n in names))
    for name, block in doc["attacks"].items():
        for e in block["per_eps"]:
            lines.append(f"{name:24s}{e['eps']:>10s}  "
                         + "  ".join(f"{cell(e['dice'][n]):>12s}" for n in names))
    for e in doc["worst_case"]:
        lines.append(f"{'worst case':24s}{e['eps']:>10s}  "
                     + "  ".join(f"{cell(e['dice'][n]):>12s}" for n in names))
    return lines
