"""Robustness evaluation of a lesion detector: sensitivity at fixed false positives per volume
(FROC), clean and under attack, with bootstrap intervals over volumes.

The units run through the evaluation pipeline's planner, runner and resumable store
(:mod:`medrobust.evaluation.plan`, :mod:`~medrobust.evaluation.runner`,
:mod:`~medrobust.evaluation.store`) as the family ``"detection"`` (:class:`DetectionFamily`,
registered on import): one unit per attack, budget and batch of volumes. The threat is the one
of DAG on detection (Xie et al., ICCV 2017): hide the true lesions. Each attack —
:class:`~medrobust.attacks.DAGDetection` with the budget as its bound and
:class:`~medrobust.attacks.PGDDetection` (PGD on DAG's detection loss) by default — runs at the
full budget on the volumes with lesions, with the criterion
:class:`~medrobust.detection_criteria.BoxesVanish`; volumes without lesions keep their clean
detections (there is nothing to hide; their false positives count as they are). A unit stores the
post-NMS detections of each volume (padded to the detector's ``max_detections``), whether every
lesion vanished at the detector's own threshold, and the L-inf norm; never volumes.

:func:`evaluate_detection` then reports, clean and per attack and budget, the FROC points at 1/8 to
8 false positives per volume with their mean (the CPM of LUNA16) and the sensitivity at a stated
rate (default 1 FP/volume), each with a 95% bootstrap interval over volumes
(:mod:`medrobust.evaluation.froc`); the strongest attack at each budget; and with an output folder
``results.json``, ``report.html`` (:mod:`medrobust.evaluation.report_detection`) and two figures.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medrobust.attacks import ATTACKS, FixedBudgetAttack
from medrobust.boxes import boxes_from_masks, pack_boxes, unpack_boxes
from medrobust.data.base import ImageData
from medrobust.data.streamed import materialize
from medrobust.evaluation.budgets import Budget, default_budgets, parse_budgets
from medrobust.evaluation.errors import EvaluationError
from medrobust.evaluation.families.base import Family, UnitJob, UnitOutput, register_family
from medrobust.evaluation.froc import FROC_FP_RATES, at_threshold, froc
from medrobust.evaluation.plan import CLEAN_UNIT, make_plan, split_names
from medrobust.evaluation.roi import Roi, box_mask, parse_roi
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
from medrobust.models.detector import Detector

__all__ = [
    "DEFAULT_ATTACKS",
    "DetectionFamily",
    "boxes_of",
    "evaluate_detection",
    "summary_lines",
]

FAMILY = "detection"
RESULTS_FILE = "results.json"
REPORT_FILE = "report.html"
DEFAULT_ATTACKS = ("dag-detection", "pgd-detection")


def _detections_record(det: Detector, outputs: torch.Tensor | None = None,
                       packed: torch.Tensor | None = None) -> dict[str, np.ndarray]:
    """Post-NMS detections (of the anchor table ``outputs``, or already ``packed``) padded to
    ``max_detections`` rows per volume."""
    if packed is None:
        assert outputs is not None
        packed = det.predictions(outputs.to(det.device))
    packed = packed.detach().float().cpu()
    n, p, w = packed.shape
    cap = det.max_detections
    out = torch.zeros((n, cap, w))
    out[:, :, w - 2] = -1.0
    out[:, : min(p, cap)] = packed[:, :cap]
    return {"dets": out.numpy().astype(np.float32)}


def _unpack(rec: np.ndarray) -> list[dict[str, torch.Tensor]]:
    return unpack_boxes(torch.from_numpy(np.asarray(rec, dtype=np.float32)))


# ------------------------------------------------------------------------------ the family
class DetectionFamily(Family):
    """Units of a detector's evaluation: one attack at one budget on one batch of volumes.

    The record holds, per volume of the batch: ``dets`` (the post-NMS detections on the attack's
    output, ``(n, max_detections, 2*dims + 2)``, class -1 pads), ``vanished`` (every lesion gone
    at the detector's threshold; ``False`` for volumes without lesions), ``attacked`` and
    ``linf``."""

    name = FAMILY

    def run(self, spec: AttackSpec, job: UnitJob) -> UnitOutput:
        det: Detector = job.clf  # type: ignore[assignment]
        n = int(job.x.shape[0])
        d2 = 2 * det.spatial_dims
        positive = (job.y[..., d2] >= 0).any(1)
        idx = positive.nonzero().flatten()
        clean = _detections_record(det, job.clean_logits)["dets"]
        dets = clean.copy()
        vanished = np.zeros(n, dtype=bool)
        linf = np.zeros(n, dtype=np.float64)
        adv_all = job.x.clone()
        if idx.numel() and (job.eps or 0.0) > 0:
            attack = spec.build(job.eps, job.norm, job.seed)
            x, y = job.x[idx], job.y[idx]
            roi: Roi | None = getattr(spec, "detection_roi", None)
            mask = None
            if roi is not None and roi.kind == "box":
                mask = _box_roi(y, x, roi.margin)
            elif roi is not None:
                mask = roi.mask(x, y)
            res = attack(det, x, y, mask=mask)
            part = _detections_record(det, packed=res.predictions)["dets"]
            dets[idx.numpy()] = part
            vanished[idx.numpy()] = res.success.numpy()
            linf[idx.numpy()] = res.perturbation_norms["linf"].numpy()
            adv_all[idx] = res.adversarial.to(adv_all.dtype)
        elif idx.numel():  # eps 0: the clean detections; lesions gone only if never found
            crit = det.default_criterion(False).bind(job.y[idx].to(det.device), None, "ce")
            found = crit.is_adversarial(job.clean_logits[idx].to(det.device),
                                        torch.arange(idx.numel(), device=det.device))
            vanished[idx.numpy()] = found.cpu().numpy()
        record = {
            "idx": np.arange(n, dtype=np.int64),
            "dets": dets,
            "vanished": vanished,
            "attacked": positive.numpy(),
            "linf": linf,
        }
        return UnitOutput(record, adv_all)

    def vectors(self, spec: AttackSpec, rec: dict[str, np.ndarray], budget: Budget,
                clean_pred: np.ndarray) -> dict[str, np.ndarray]:
        """Per-volume vectors at ``budget``: ``dets``, ``vanished``, ``attacked``, ``linf``."""
        return {k: rec[k] for k in ("dets", "vanished", "attacked", "linf")}


register_family(DetectionFamily())


def _box_roi(packed: torch.Tensor, x: torch.Tensor, margin: int) -> torch.Tensor:
    """Per volume, the union of its true boxes grown by ``margin`` voxels, as a mask like ``x``."""
    spatial = tuple(x.shape[2:])
    d = len(spatial)
    maps = torch.zeros((x.shape[0], *spatial), dtype=torch.int64)
    for i, item in enumerate(unpack_boxes(packed.cpu())):
        for b in item["boxes"]:
            lo = [int(np.floor(float(v))) for v in b[:d]]
            hi = [int(np.ceil(float(v))) for v in b[d:]]
            sl = tuple(slice(max(a, 0), min(max(c, a + 1), s)) for a, c, s in zip(lo, hi, spatial,
                                                                                  strict=True))
            maps[(i, *sl)] = 1  # type: ignore[index]
    return box_mask(maps, margin).unsqueeze(1).to(device=x.device, dtype=x.dtype)


def boxes_of(data: ImageData) -> list[dict[str, torch.Tensor]]:
    """The true boxes of a data set with lesion masks (``labels`` ``(N, *spatial)``, foreground >
    0): one box per volume around its foreground, class 0, as ``medrobust train --task
    detection`` derives them (:func:`medrobust.boxes.boxes_from_masks`)."""
    if data.labels.dim() != data.images.dim() - 1:
        raise EvaluationError(
            f"a detector is evaluated against boxes; without them the data needs lesion masks "
            f"(N, *spatial) to derive them from; got labels of shape {tuple(data.labels.shape)}"
        )
    return boxes_from_masks(data.labels > 0)


def _specs(attacks: Sequence[str] | str, norm: str,
           attack_kwargs: Mapping[str, Mapping[str, Any]] | None, steps: int | None
           ) -> list[AttackSpec]:
    specs: list[AttackSpec] = []
    per = {str(k).lower().replace("-", "").replace("_", ""): dict(v)
           for k, v in (attack_kwargs or {}).items()}
    for raw in split_names(attacks):
        name = raw.strip().lower().replace("-", "").replace("_", "")
        cls = ATTACKS.get(name)
        if cls is None:
            raise EvaluationError(
                f"unknown attack {raw!r}; available: {', '.join(sorted(ATTACKS))}"
            )
        if not getattr(cls, "supports_boxes", False):
            raise EvaluationError(
                f"attack {raw!r} cannot attack a detector (boxes); use dag-detection or "
                "pgd-detection"
            )
        if not (issubclass(cls, FixedBudgetAttack) or accepts(cls, "eps")):
            raise EvaluationError(f"attack {raw!r} has no budget; a detector's evaluation "
                                  "sweeps eps")
        kw: dict[str, Any] = {}
        if accepts(cls, "early_stop"):
            kw["early_stop"] = False
        if steps is not None:
            if accepts(cls, "steps"):
                kw["steps"] = int(steps)
            elif accepts(cls, "max_iter"):
                kw["max_iter"] = int(steps)
        kw.update(per.get(name, {}))
        bad = [k for k in kw if k in RESERVED]
        if bad:
            raise EvaluationError(f"attack {raw!r}: {', '.join(bad)} are set by the evaluation")
        key = f"{name}:{sha256_json(jsonable(kw))[:12]}"
        spec = AttackSpec(name, cls, kw, key, False, single_step=False, kind=FAMILY)
        try:
            spec.build(0.0, norm, 0)
        except (TypeError, ValueError) as err:
            raise EvaluationError(f"attack {raw!r}: invalid arguments {kw}: {err}") from None
        specs.append(spec)
    if not specs:
        raise EvaluationError("no attack given")
    return specs


def _resolve(model: Any, device: Any) -> tuple[Detector, str]:
    if isinstance(model, Detector):
        return model, "Detector (in memory)"
    if isinstance(model, (str, os.PathLike)):
        from medrobust.models.detector import load_detector
        from medrobust.modelstore import ModelError

        try:
            return load_detector(model, device=device), str(model)
        except ModelError as err:
            raise EvaluationError(str(err)) from None
    raise EvaluationError(
        f"model must be a medrobust Detector or a detector model folder; got "
        f"{type(model).__name__}"
    )


# ------------------------------------------------------------------------------ the evaluation
def evaluate_detection(
    model: Any,
    data: ImageData,
    attacks: Sequence[str] | str = DEFAULT_ATTACKS,
    eps: Sequence[float | str | Budget] | str | None = None,
    norm: str = "linf",
    out: str | os.PathLike[str] | None = None,
    batch_size: int = 8,
    seed: int = 0,
    *,
    boxes: Sequence[Mapping[str, Any]] | None = None,
    fp_rates: Sequence[float] = FROC_FP_RATES,
    fp_rate: float = 1.0,
    iou_thresh: float = 0.1,
    attack_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    steps: int | None = None,
    roi: torch.Tensor | str | None = None,
    units: str | None = None,
    n_boot: int = 1000,
    progress: bool = False,
    resume: bool = True,
    figures: bool = True,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Evaluate a detector's robustness on volumes with lesions (see the module docstring).

    Args:
        model: a :class:`~medrobust.Detector` or a detector model folder (``medrobust train
            --task detection``).
        data: the volumes ``(N, C, *spatial)`` in the detector's units; without ``boxes``, its
            labels are lesion masks the boxes are derived from (:func:`boxes_of`).
        attacks: attacks with ``supports_boxes`` and a budget (``dag-detection``,
            ``pgd-detection``), a list or a comma-separated text.
        eps: budgets in the detector's input units (HU for CT: default 0, 1, 2, 4, 8, 16).
        norm: the budget's norm.
        out: a folder for ``results.json``, ``report.html``, the figures and the resumable
            ``results.sqlite``; ``None`` keeps everything in memory.
        batch_size: volumes per unit of work.
        seed: the run's seed (each unit's attack seed derives from it; and the bootstrap's).
        boxes: per volume ``{"boxes", "labels"}`` in medrobust's axis order (default: from the
            masks).
        fp_rates: the FROC points (false positives per volume).
        fp_rate: the rate at which the sensitivity is stated (added to ``fp_rates``).
        iou_thresh: IoU at which a detection finds a lesion.
        attack_kwargs: extra arguments per attack name, e.g. ``{"dag-detection": {"max_iter":
            20}}``.
        steps: iterations of every attack (``steps`` or DAG's ``max_iter``).
        roi: where the attacks may perturb: ``None``, a shared mask, or ``"box[:margin]"`` (the
            union of each volume's true boxes grown by ``margin`` voxels).
        units: the budgets' units for the report (default: the data's).
        n_boot: bootstrap resamplings of the volumes for the intervals.
        progress, resume, figures, device: as for :func:`~medrobust.evaluation.evaluate`.

    Returns:
        The results document (also written to ``out/results.json``).
    """
    det, model_name = _resolve(model, device)
    if not (float(fp_rate) > 0 and np.isfinite(float(fp_rate))):
        raise EvaluationError(f"fp_rate must be a positive number; got {fp_rate!r}")
    rates = sorted({float(r) for r in fp_rates} | {float(fp_rate)})
    if any(not (r > 0 and np.isfinite(r)) for r in rates):
        raise EvaluationError(f"fp_rates must be positive numbers; got {list(fp_rates)}")
    if isinstance(batch_size, bool) or int(batch_size) < 1:
        raise EvaluationError(f"batch_size must be a positive integer; got {batch_size!r}")
    try:
        det.check_inputs(data.images[:1].to(det.dtype))
    except ValueError as err:
        raise EvaluationError(f"data: {err}") from None
    truth = list(boxes) if boxes is not None else boxes_of(data)
    if len(truth) != len(data):
        raise EvaluationError(f"{len(truth)} box lists for {len(data)} volumes")
    try:
        labels = pack_boxes(truth, det.spatial_dims)
    except ValueError as err:
        raise EvaluationError(f"boxes: {err}") from None
    truth = unpack_boxes(labels)
    norm_name = str(norm).lower()
    specs = _specs(attacks, norm_name, attack_kwargs, steps)
    region = parse_roi(roi, data.images)
    for spec in specs:
        spec.detection_roi = region  # type: ignore[attr-defined]
    if units is None:
        units = getattr(model, "units", None) or getattr(data, "units", None)
    budgets = (default_budgets(det.bounds, norm_name, units) if eps is None
               else parse_budgets(eps))
    base = {
        "kind": FAMILY,
        "weights": state_dict_sha256(det.module),
        "selection": det.selection,
        "data": tensor_sha256(data.images, labels),
        "bounds": list(det.bounds),
        "batch_size": int(batch_size),
        "seed": int(seed),
        "norm": norm_name,
        "roi": region.key(),
    }
    settings = RunSettings(norm=norm_name, seed=int(seed), unit_hash=sha256_json(base)[:32],
                           progress=progress, resume=resume, model_name=model_name)
    out_dir = None if out is None else Path(out).expanduser()
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        _check_ours(out_dir / RESULTS_FILE)
    store = ResultsStore(None if out_dir is None else out_dir / DB_NAME)
    try:
        plan = make_plan(specs, budgets, None, len(data), int(batch_size))
        collected = run_plan(det, data, labels, plan, store, settings)  # type: ignore[arg-type]
    finally:
        store.close()

    clean_logits = torch.from_numpy(np.asarray(collected[f"{CLEAN_UNIT}|"]["logits"]))
    clean_dets = _unpack(_detections_record(det, clean_logits)["dets"])

    operating: list[float | None] = []  # the clean threshold at fp_rate, once known

    def score(dets: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
        f = froc(dets, truth, rates, iou_thresh, n_boot=n_boot, seed=seed)
        at = next(p for p in f["points"] if p["fp_per_volume"] == float(fp_rate))
        if not operating:
            operating.append(at["threshold"])
        fixed = at_threshold(dets, truth, operating[0], iou_thresh, n_boot=n_boot, seed=seed)
        return {"froc": f["points"], "at_fp_rate": at, "cpm": f["cpm"],
                "at_clean_threshold": fixed}

    positives = int(sum(int(t["boxes"].shape[0] > 0) for t in truth))
    doc: dict[str, Any] = {
        "kind": FAMILY,
        "model": model_name,
        "n": len(data),
        "positives": positives,
        "lesions": int(sum(int(t["boxes"].shape[0]) for t in truth)),
        "spatial_dims": det.spatial_dims,
        "norm": norm_name,
        "budget_units": None if units is None else str(units),
        "bounds": [float(v) for v in det.bounds],
        "roi": _describe_roi(region, labels, materialize(data.images)),
        "eps": [{"label": b.label, "value": b.value} for b in budgets],
        "fp_rates": rates,
        "fp_rate": float(fp_rate),
        "iou_thresh": float(iou_thresh),
        "selection": det.selection,
        "n_boot": int(n_boot),
        "seed": int(seed),
        "clean": score(clean_dets),
        "attacks": {},
        "strongest": [],
        "units": {"computed": collected.computed, "reused": collected.reused},
    }
    for spec in specs:
        entries = []
        for b in budgets:
            rec = collected[f"{spec.key}|{b.key}"]
            order = np.argsort(rec["idx"])
            dets = _unpack(rec["dets"][order])
            att = rec["attacked"][order].astype(bool)
            entries.append({
                "eps": b.label, "value": b.value, **score(dets),
                "vanished": (float(rec["vanished"][order][att].mean()) if att.any() else None),
                "linf_max": float(np.max(rec["linf"])) if len(rec["linf"]) else None,
            })
        doc["attacks"][spec.name] = {"config": spec.describe(norm_name), "per_eps": entries}
    for j, b in enumerate(budgets):
        cands = [(n, a["per_eps"][j]) for n, a in doc["attacks"].items()]
        name, e = min(cands, key=lambda c: (np.inf if c[1]["at_fp_rate"]["sensitivity"] is None
                                            else c[1]["at_fp_rate"]["sensitivity"]))
        doc["strongest"].append({"eps": b.label, "value": b.value, "attack": name,
                                 "at_fp_rate": e["at_fp_rate"], "cpm": e["cpm"]})
    if out_dir is not None:
        if figures:
            doc["figures"] = _figures(out_dir, doc)
        text = json.dumps(jsonable(doc), indent=2, allow_nan=False)
        (out_dir / RESULTS_FILE).write_text(text + "\n", encoding="utf-8")
        from medrobust.evaluation.report_detection import write_detection_report

        write_detection_report(json.loads(text), out_dir / REPORT_FILE, out_dir)
        doc["report"] = REPORT_FILE
    return doc


def _check_ours(path: Path) -> None:
    """Refuse to replace a ``results.json`` that is not a detection evaluation's."""
    if not path.exists():
        return
    try:
        kind = json.loads(path.read_text(encoding="utf-8")).get("kind")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        kind = None
    if kind != FAMILY:
        raise EvaluationError(f"{path}: exists and holds no detection evaluation; not replaced "
                              "(choose another output folder)")


def _describe_roi(region: Roi, packed: torch.Tensor, images: torch.Tensor) -> dict[str, Any]:
    if region.kind != "box":
        return region.describe()
    frac = float(_box_roi(packed, images[:, :1], region.margin).mean())
    return {"kind": "box", "margin": region.margin, "fraction": frac,
            "text": f"per volume, the union of its lesion boxes grown by {region.margin} voxels "
                    f"(on average {100 * frac:.1f}% of the voxels; volumes without lesions are "
                    "not attacked)"}


def _figures(out_dir: Path, doc: dict[str, Any]) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig_dir = out_dir / "figures"
    fig_dir.mkdir(exist_ok=True)
    out: dict[str, str] = {}
    fig, ax = plt.subplots(figsize=(5.5, 4))

    def curve(block: dict[str, Any], **kw: Any) -> None:
        pts = [p for p in block["froc"] if p["sensitivity"] is not None]
        ax.plot([p["fp_per_volume"] for p in pts], [p["sensitivity"] for p in pts], marker="o",
                **kw)

    curve(doc["clean"], label="clean", color="k")
    last = len(doc["eps"]) - 1
    for name, a in doc["attacks"].items():
        curve(a["per_eps"][last], label=f"{name}, eps {a['per_eps'][last]['eps']}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("false positives per volume")
    ax.set_ylabel("sensitivity")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("FROC")
    fig.tight_layout()
    path = fig_dir / "froc.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    out["froc"] = str(path.relative_to(out_dir))

    fig, ax = plt.subplots(figsize=(5.5, 4))
    xs = [e["value"] for e in doc["eps"]]
    for name, a in doc["attacks"].items():
        ax.plot(xs, [e["at_fp_rate"]["sensitivity"] for e in a["per_eps"]], marker="o",
                label=name)
    ax.axhline(doc["clean"]["at_fp_rate"]["sensitivity"] or 0.0, color="k", ls=":",
               label="clean")
    ax.set_xlabel(f"eps ({doc['norm']}, {doc.get('budget_units') or 'input units'})")
    ax.set_ylabel(f"sensitivity at {doc['fp_rate']:g} FP/volume")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = fig_dir / "sensitivity_vs_eps.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    out["sensitivity_vs_eps"] = str(path.relative_to(out_dir))
    return out


def summary_lines(doc: dict[str, Any]) -> list[str]:
    """A plain-text table: sensitivity at the stated FP rate and the CPM, clean and per attack."""
    def cell(p: dict[str, Any]) -> str:
        s = p["sensitivity"]
        lo, hi = p["ci95"]
        return ("n/a" if s is None else f"{s:.3f}"
                + ("" if lo is None else f" [{lo:.3f}, {hi:.3f}]"))

    def cpm(c: dict[str, Any]) -> str:
        return "n/a" if c["value"] is None else f"{c['value']:.3f}"

    rate = f"{doc['fp_rate']:g}"
    lines = [f"sensitivity at {rate} FP/volume (95% CI over {doc['n']} volumes, "
             f"{doc['lesions']} lesions); CPM = mean over {len(doc['fp_rates'])} FROC points",
             f"{'':18s}{'eps':>10s}  {'sensitivity':>22s}  {'CPM':>6s}",
             f"{'clean':18s}{'':>10s}  {cell(doc['clean']['at_fp_rate']):>22s}  "
             f"{cpm(doc['clean']['cpm']):>6s}"]
    for name, a in doc["attacks"].items():
        for e in a["per_eps"]:
            lines.append(f"{name:18s}{e['eps']:>10s}  {cell(e['at_fp_rate']):>22s}  "
                         f"{cpm(e['cpm']):>6s}")
    for s in doc["strongest"]:
        lines.append(f"{'strongest attack':18s}{s['eps']:>10s}  {cell(s['at_fp_rate']):>22s}  "
                     f"{cpm(s['cpm']):>6s}")
    return lines
