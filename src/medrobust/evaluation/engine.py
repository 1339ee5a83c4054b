"""The evaluation engine: every attack at every budget over a data set, batch by batch, resumable.

``evaluate(model, data, attacks=["fgsm", "pgd"], eps=[...])`` runs, for each batch of the data
(in order, fixed slices), the clean pass and then each attack at each budget, and stores the
per-sample vectors of each unit of work in SQLite (:mod:`medrobust.evaluation.store`). When every
unit is there it aggregates them (:mod:`medrobust.evaluation.aggregate`), runs the sanity checks
(:mod:`medrobust.evaluation.sanity`), draws the gallery and writes ``results.json`` and
``report.html``.

Reproducibility: each unit's attack seed is derived from ``seed``, the attack, the budget and the
batch index (:func:`unit_seed`), so a run that was killed and resumed computes exactly the numbers
an uninterrupted run computes. Memory: only the current batch's images and small per-sample
vectors (predictions, flags, norms) are held; images are never stored.

Attacks are built by name from :data:`medrobust.attacks.ATTACKS`. A fixed-budget attack (a
:class:`~medrobust.attacks.FixedBudgetAttack`) is run once per budget. Any other attack — a
minimum-norm attack (:class:`~medrobust.attacks.MinimumNormAttack`: DeepFool, C&W, ...) or one
with a budget of another kind (sparse, spatial) — is run once per batch, and a sample counts as
broken at budget ``eps`` when the attack succeeded with a perturbation of norm ``<= eps``,
measured in the evaluation's norm.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import inspect
import json
import math
import os
import shutil
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medrobust.attacks import ATTACKS, Attack, FixedBudgetAttack, MinimumNormAttack
from medrobust.data.base import ImageData
from medrobust.evaluation.budgets import Budget, default_budgets, large_budget, parse_budgets
from medrobust.evaluation.errors import EvaluationError, ResultsStoreError
from medrobust.evaluation.metrics import psnr, ssim
from medrobust.evaluation.store import DB_NAME, ResultsStore
from medrobust.models import Classifier
from medrobust.norms import get_norm

__all__ = [
    "AttackSpec",
    "EvaluationResult",
    "MIN_NORM_KEY",
    "evaluate",
    "unit_seed",
]

MIN_NORM_KEY = "min-norm"
CLEAN_UNIT = "clean"
RESULTS_JSON = "results.json"
REPORT_HTML = "report.html"
FIGURES_DIR = "figures"
DIRECTIONS = ("pos2neg", "neg2pos")
CLASSIFICATION_TASKS = ("binary", "multi-class", "ordinal")
# arguments the engine sets itself; an attack_kwargs entry may not override them
_RESERVED = ("eps", "norm", "seed", "generator")


# ------------------------------------------------------------------------------------ helpers
def _sha256_json(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def unit_seed(seed: int, unit: str, eps_key: str, batch: int) -> int:
    """The attack seed of one unit of work: a hash of the run's seed, the attack, the budget and
    the batch index (so a resumed run draws exactly what an uninterrupted one drew)."""
    h = hashlib.sha256(f"{int(seed)}|{unit}|{eps_key}|{int(batch)}".encode()).digest()
    return int.from_bytes(h[:7], "little")


def state_dict_sha256(module: nn.Module) -> str:
    """sha256 over a module's state dict (names, dtypes, shapes and bytes, sorted by name)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        tt = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{tt.dtype}|{tuple(tt.shape)}|".encode())
        h.update(tt.reshape(-1).view(torch.uint8).numpy().tobytes() if tt.numel() else b"")
    return h.hexdigest()


def tensor_sha256(*tensors: torch.Tensor) -> str:
    """sha256 over tensors' dtypes, shapes and bytes (the content fingerprint of a data set)."""
    h = hashlib.sha256()
    for t in tensors:
        tt = t.detach().to("cpu").contiguous()
        h.update(f"{tt.dtype}|{tuple(tt.shape)}|".encode())
        h.update(tt.reshape(-1).view(torch.uint8).numpy().tobytes() if tt.numel() else b"")
    return h.hexdigest()


def file_sha256(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _jsonable(value: Any) -> Any:
    """Plain JSON values (tuples to lists, tensors and numpy to Python, nan/inf to None)."""
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return str(value)


# ------------------------------------------------------------------------------------ attacks
@dataclass
class AttackSpec:
    """One attack of an evaluation: its registry name, the extra arguments, and what kind it is.

    Attributes:
        name: the key in :data:`medrobust.attacks.ATTACKS`.
        cls: the attack class.
        kwargs: extra constructor arguments (``eps``, ``norm`` and ``seed`` are the engine's).
        key: ``name`` plus a hash of ``kwargs``: the attack's identity in the results database.
        minimization: not a fixed-budget attack: run once per batch and judged against every
            budget by the norm of its perturbation.
        kind: "fixed-budget", "minimum-norm" or "unbounded" (another kind of budget).
        single_step: one gradient step (FGSM) — the baseline of the "iterative beats single-step"
            check.
    """

    name: str
    cls: type[Attack]
    kwargs: dict[str, Any]
    key: str
    minimization: bool
    single_step: bool
    kind: str = "fixed-budget"
    large_step: float | None = None

    def build(self, eps: float | None, norm: str, seed: int, large: bool = False) -> Attack:
        """The attack object for one unit of work.

        ``large`` marks the unbounded sanity check (a budget holding the whole input range). There
        an iterative attack starts from the clean input and takes at least ``LARGE_EPS_STEPS``
        steps of ``large_step`` (a fiftieth of the model's intensity window, or of the bounds):
        its default step, a fraction of eps, would otherwise jump across the whole range (and a
        random start lands anywhere in it), where a saturating intensity window has zero gradient,
        and the check would flag the model for the attack's configuration.
        """
        kw = dict(self.kwargs)
        kw["seed"] = int(seed)
        if not self.minimization or _accepts(self.cls, "norm"):
            kw["norm"] = norm
        if not self.minimization:
            kw["eps"] = float(eps if eps is not None else 0.0)
        if large and not self.single_step:
            if _accepts(self.cls, "random_start"):
                kw["random_start"] = False
            if _accepts(self.cls, "steps"):
                kw["steps"] = max(int(kw.get("steps") or 0), LARGE_EPS_STEPS)
            if self.large_step is not None and _accepts(self.cls, "step_size"):
                kw["step_size"] = self.large_step
        return self.cls(**kw)

    def describe(self, norm: str) -> dict[str, Any]:
        """The attack's full configuration (its defaults included) for ``results.json``."""
        cfg = self.build(None if self.minimization else 1.0, norm, 0).config()
        for k in ("eps", "seed", "generator"):
            cfg.pop(k, None)
        return {
            "name": self.name,
            "kind": self.kind,
            "single_step": self.single_step,
            "kwargs": _jsonable(self.kwargs),
            "config": _jsonable(cfg),
            "key": self.key,
        }


LARGE_EPS_STEPS = 100
"""The fewest steps an iterative attack takes in the unbounded (large-eps) sanity check; with
steps of a fiftieth of the window it can travel across the window twice."""


def _accepts(cls: type, name: str) -> bool:
    try:
        params = inspect.signature(cls.__init__).parameters  # type: ignore[misc]
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def build_attack_specs(
    attacks: Sequence[str] | str, norm: str, attack_kwargs: Mapping[str, Mapping[str, Any]] | None,
    common_kwargs: Mapping[str, Any] | None = None,
) -> list[AttackSpec]:
    """Resolve attack names against the registry and check their arguments by building each once.

    ``attack_kwargs`` maps an attack name to its extra arguments; ``common_kwargs`` are given to
    every attack whose constructor takes them (the CLI's ``--steps``). Fixed-budget attacks stop
    early on success (``early_stop=True``) unless told otherwise: the success flags and the robust
    accuracy are the same, the run is faster, and the perturbation statistics are those of the
    first successful iterate.
    """
    names = [attacks] if isinstance(attacks, str) else list(attacks)
    if isinstance(attacks, str) and "," in attacks:
        names = [a for a in attacks.split(",")]
    if not names:
        raise EvaluationError("no attack given; expected one or more of " + ", ".join(ATTACKS))
    per_attack = {str(k).lower(): dict(v) for k, v in (attack_kwargs or {}).items()}
    specs: list[AttackSpec] = []
    seen: set[str] = set()
    for raw in names:
        name = str(raw).strip().lower().replace("-", "").replace("_", "")
        if name not in ATTACKS:
            raise EvaluationError(
                f"unknown attack {str(raw).strip()!r}; available: {', '.join(sorted(ATTACKS))}"
            )
        if name in seen:
            raise EvaluationError(f"attack {name!r} given twice")
        seen.add(name)
        cls = ATTACKS[name]
        kw: dict[str, Any] = {}
        minimization = not issubclass(cls, FixedBudgetAttack)
        kind = ("fixed-budget" if not minimization else
                "minimum-norm" if issubclass(cls, MinimumNormAttack) else "unbounded")
        if not minimization and _accepts(cls, "early_stop"):
            kw["early_stop"] = True
        for k, v in (common_kwargs or {}).items():
            if v is not None and _accepts(cls, k):
                kw[k] = v
        kw.update(per_attack.pop(name, {}))
        bad = [k for k in kw if k in _RESERVED]
        if bad:
            raise EvaluationError(
                f"attack {name!r}: {', '.join(bad)} are set by the evaluation (give eps= and "
                "norm= to evaluate, and seed= for the run)"
            )
        key = f"{name}:{_sha256_json(_jsonable(kw))[:12]}"
        spec = AttackSpec(name, cls, kw, key, minimization, single_step=False, kind=kind)
        try:
            atk = spec.build(None if minimization else 0.0, norm, 0)
        except (TypeError, ValueError) as err:
            raise EvaluationError(f"attack {name!r}: invalid arguments {kw}: {err}") from None
        spec.single_step = (not minimization) and int(getattr(atk, "steps", 0) or 0) == 1
        specs.append(spec)
    unknown = sorted(k for k in per_attack if k.replace("-", "").replace("_", "") not in ATTACKS)
    if unknown:  # a typo; arguments of known attacks that are not evaluated are ignored
        raise EvaluationError(f"attack_kwargs for unknown attack(s): {', '.join(unknown)}")
    return specs


# ------------------------------------------------------------------------------------- models
@dataclass
class ModelInfo:
    """The classifier under evaluation and what is known about it."""

    classifier: Classifier
    metadata: dict[str, Any]
    source: str | None
    weights_sha256: str
    weights_file_sha256: str | None


def resolve_model(model: Any, device: str | torch.device | None = None) -> ModelInfo:
    """A :class:`ModelInfo` from a :class:`Classifier`, a loaded model folder, or a folder path
    (loaded with :func:`medrobust.modelstore.load_model`)."""
    meta: dict[str, Any] = {}
    source: str | None = None
    file_sha: str | None = None
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        try:
            from medrobust import modelstore
        except ImportError as err:  # pragma: no cover - the model folder module is missing
            raise EvaluationError(f"cannot load model folders here ({err})") from err
        try:
            model = modelstore.load_model(path, device=device)
        except ValueError as err:
            raise EvaluationError(str(err)) from err
    if isinstance(model, Classifier):
        clf = model
    elif hasattr(model, "classifier") and hasattr(model, "metadata"):
        clf = model.classifier
        meta = dict(model.metadata or {})
        if getattr(model, "path", None) is not None:
            source = str(model.path)
            wfile = Path(model.path) / str(meta.get("weights", "weights.safetensors"))
            if wfile.is_file():
                file_sha = file_sha256(wfile)
        if clf is None:
            raise EvaluationError(
                f"{source or 'the model'}: a {meta.get('task', 'segmentation')} model; evaluate "
                "needs a classifier"
            )
    else:
        raise EvaluationError(
            f"model must be a medrobust.Classifier or a saved model folder; got "
            f"{type(model).__name__}"
        )
    return ModelInfo(clf, meta, source, state_dict_sha256(clf.module), file_sha)


def _meta_positive_class(meta: Mapping[str, Any]) -> int | None:
    for where in (meta, meta.get("extra") or {}):
        if isinstance(where, Mapping) and where.get("positive_class") is not None:
            return int(where["positive_class"])
    return None


def display_window(clf: Classifier, meta: Mapping[str, Any], data: ImageData
                   ) -> tuple[float, float]:
    """The intensity range to display images with: the model's intensity window when it has one
    (CT in HU), else a ``window`` (center, width) in the data's metadata, else the bounds."""
    pre = (meta.get("preprocessing") or {}).get("steps") if meta else None
    stack: list[Any] = [pre]
    while stack:
        s = stack.pop(0)
        if isinstance(s, list):
            stack.extend(s)
        elif isinstance(s, Mapping):
            if s.get("type") == "window" and "lo" in s and "hi" in s:
                return float(s["lo"]), float(s["hi"])
            if s.get("type") == "compose":
                stack.extend(s.get("steps") or [])
    mods: list[Any] = [clf.preprocess]
    while mods:
        m = mods.pop(0)
        if m is None:
            continue
        if hasattr(m, "lo") and hasattr(m, "hi"):
            return float(m.lo), float(m.hi)
        if hasattr(m, "steps"):
            mods.extend(list(m.steps))
    lo, hi = float(data.bounds[0]), float(data.bounds[1])
    win = data.meta.get("window") if data.meta else None
    if isinstance(win, (list, tuple)) and len(win) == 2:
        c, w = float(win[0]), float(win[1])
        # only a window that fits the data's range (a CT window on [0, 1] data is ignored)
        if 0 < w <= hi - lo and c - w / 2 < hi and c + w / 2 > lo:
            return c - w / 2, c + w / 2
    return lo, hi


def check_model_data(info: ModelInfo, data: ImageData) -> int:
    """Raise a clear :class:`EvaluationError` when the model cannot be evaluated on ``data``;
    return the number of classes."""
    clf, meta = info.classifier, info.metadata
    if not isinstance(data, ImageData):
        raise EvaluationError(f"data must be a medrobust ImageData; got {type(data).__name__}")
    if len(data) == 0:
        raise EvaluationError("the data set is empty")
    if data.task not in CLASSIFICATION_TASKS:
        raise EvaluationError(
            f"data task {data.task!r} is not supported by evaluate yet (expected one of "
            f"{', '.join(CLASSIFICATION_TASKS)})"
        )
    if data.labels.dim() != 1 or data.labels.is_floating_point():
        raise EvaluationError(
            f"labels must be one class index per sample; got shape {tuple(data.labels.shape)} "
            f"and dtype {data.labels.dtype}"
        )
    inp = meta.get("input") or {}
    want_c = inp.get("channels")
    if isinstance(want_c, int) and want_c != data.channels:
        raise EvaluationError(
            f"the model takes {want_c}-channel inputs but the data has {data.channels} "
            f"channel(s) (shape {tuple(data.images.shape[1:])})"
        )
    want_dims = inp.get("spatial_dims")
    if isinstance(want_dims, int) and want_dims != len(data.spatial_shape):
        raise EvaluationError(
            f"the model takes {want_dims}D inputs but the data is {len(data.spatial_shape)}D "
            f"(shape {tuple(data.images.shape[1:])})"
        )
    units = inp.get("units")
    if units and data.units and str(units) != str(data.units):
        raise EvaluationError(
            f"the model takes inputs in {units!r} but the data is in {data.units!r}"
        )
    lo, hi = clf.bounds
    if float(data.bounds[0]) < lo - 1e-6 or float(data.bounds[1]) > hi + 1e-6:
        raise EvaluationError(
            f"the data's range [{data.bounds[0]:g}, {data.bounds[1]:g}] {data.units} is not "
            f"inside the model's bounds [{lo:g}, {hi:g}]"
        )
    xmin, xmax = float(data.images.min()), float(data.images.max())
    if not (math.isfinite(xmin) and math.isfinite(xmax)):
        raise EvaluationError("the images contain NaN or Inf values")
    if xmin < lo or xmax > hi:
        raise EvaluationError(
            f"the images lie in [{xmin:g}, {xmax:g}], outside the model's bounds [{lo:g}, {hi:g}]"
        )
    try:
        with clf.attack_mode():
            out = clf.logits(data.images[:1].to(dtype=clf.dtype))
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise EvaluationError(
            f"the model does not accept the data's inputs of shape "
            f"{tuple(data.images.shape[1:])}: {first}"
        ) from None
    k = int(out.shape[1])
    if data.class_names and len(data.class_names) != k:
        raise EvaluationError(
            f"the model has {k} classes but the data has {len(data.class_names)} "
            f"({', '.join(map(str, data.class_names[:8]))})"
        )
    ymin, ymax = int(data.labels.min()), int(data.labels.max())
    if ymin < 0 or ymax >= k:
        raise EvaluationError(
            f"labels lie in [{ymin}, {ymax}] but the model has {k} classes"
        )
    return k


# ------------------------------------------------------------------------------------- result
@dataclass
class EvaluationResult:
    """The outcome of :func:`evaluate`.

    Attributes:
        results: the content of ``results.json`` (see :mod:`medrobust.evaluation.schema`).
        out: the output folder, or ``None``.
        gallery: the gallery examples (images included) used for the report.
    """

    results: dict[str, Any]
    out: Path | None = None
    gallery: list[dict[str, Any]] = field(default_factory=list, repr=False)

    @property
    def clean_accuracy(self) -> float:
        return float(self.results["clean"]["accuracy"]["value"])

    @property
    def clean_auc(self) -> float | None:
        v = self.results["clean"]["auc"]["value"]
        return None if v is None else float(v)

    @property
    def eps(self) -> list[float]:
        return [float(e["eps"]) for e in self.results["worst_case"]]

    @property
    def robust_accuracy(self) -> dict[float, float]:
        """Worst case over all attacks, per budget: the robust accuracy to quote."""
        return {float(e["eps"]): float(e["robust_accuracy"]["value"])
                for e in self.results["worst_case"]}

    def attack_accuracy(self, attack: str) -> dict[float, float]:
        """One attack's robust accuracy per budget."""
        return {float(e["eps"]): float(e["robust_accuracy"]["value"])
                for e in self.results["attacks"][attack]["per_eps"]}

    @property
    def sanity_passed(self) -> bool:
        return bool(self.results["sanity"]["passed"])

    @property
    def checks(self) -> list[dict[str, Any]]:
        return list(self.results["sanity"]["checks"])

    @property
    def json_path(self) -> Path | None:
        return None if self.out is None else self.out / RESULTS_JSON

    @property
    def report_path(self) -> Path | None:
        return None if self.out is None else self.out / REPORT_HTML

    def summary_table(self) -> str:
        """A plain-text table: budget, worst-case robust accuracy (95% CI), each attack."""
        from medrobust.evaluation.report import summary_text

        return summary_text(self.results)

    def write_report(self, path: str | os.PathLike[str]) -> Path:
        """Write the HTML report to ``path`` (also for an evaluation run without ``out``)."""
        from medrobust.evaluation.report import write_report

        return write_report(self.results, self.gallery, Path(path))

    def __repr__(self) -> str:
        ra = ", ".join(f"{e:g}: {a:.3f}" for e, a in self.robust_accuracy.items())
        return (
            f"EvaluationResult(clean_accuracy={self.clean_accuracy:.3f}, "
            f"robust_accuracy={{{ra}}}, sanity_passed={self.sanity_passed}, out={self.out})"
        )


# ------------------------------------------------------------------------------ output folder
_OUR_FILES = (RESULTS_JSON, REPORT_HTML, DB_NAME, DB_NAME + "-journal")


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise EvaluationError(f"{out}: exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".medrobust-write-test-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise EvaluationError(
            f"{out}: output folder is not writable ({err.strerror or err})"
        ) from None
    if overwrite:
        for name in _OUR_FILES:
            p = out / name
            if p.is_file():
                p.unlink()
        fig = out / FIGURES_DIR
        if fig.is_dir():
            shutil.rmtree(fig)


def _existing_run_hash(out: Path) -> str | None:
    p = out / RESULTS_JSON
    if not p.is_file():
        return None
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
        return str(d.get("config_hash"))
    except (OSError, ValueError, AttributeError):
        return "unreadable"


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------ engine
def evaluate(
    model: Classifier | str | os.PathLike[str] | Any,
    data: ImageData,
    attacks: Sequence[str] | str = ("fgsm", "pgd"),
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
        attacks: names in :data:`medrobust.attacks.ATTACKS` (a list, or ``"fgsm,pgd"``).
        eps: budgets in the model's input units: numbers or texts like ``"8/255"`` (a list or a
            comma-separated text). Default: 0, 1, 2, 4, 8 /255 of the input range (L-inf).
        norm: ``"linf"``, ``"l2"`` or ``"l1"``.
        out: the output folder (``results.json``, ``report.html``, ``figures/*.png`` and the
            resumable ``results.sqlite``); ``None`` keeps everything in memory.
        batch_size: samples per batch (the unit of resumption).
        seed: the run's seed; every unit's attack seed is derived from it (:func:`unit_seed`).
        direction: ``None`` attacks every sample; ``"pos2neg"`` attacks only the samples of the
            positive class (hide a finding), ``"neg2pos"`` only the others (binary tasks).
        attack_kwargs: extra arguments per attack name, e.g. ``{"pgd": {"steps": 20}}``.
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
            that cannot be written or holds other results; :class:`ResultsStoreError` for a
            corrupted ``results.sqlite``.
    """
    from medrobust import __version__
    from medrobust.evaluation.aggregate import aggregate
    from medrobust.evaluation.gallery import build_gallery
    from medrobust.evaluation.sanity import run_checks

    __import__("medrobust.compat").compat.check_evaluation(model, data)  # model/data fit
    started = time.time()
    started_iso = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
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
    specs = build_attack_specs(attacks, norm_name, attack_kwargs, {"steps": steps})

    info = resolve_model(model, device)
    clf = info.classifier
    k = check_model_data(info, data)
    budgets = default_budgets(clf.bounds, norm_name) if eps is None else parse_budgets(eps)
    n = len(data)
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
    pos = positive_class if positive_class is not None else _meta_positive_class(info.metadata)
    if pos is None:
        pos = 1
    if not (0 <= int(pos) < k):
        raise EvaluationError(f"positive_class {pos} is not a class of this {k}-class model")
    pos = int(pos)
    if direction is not None and not binary:
        raise EvaluationError(f"direction={direction!r} needs a binary task; this model has {k}")

    labels = data.labels.to(torch.int64)
    data_sha = tensor_sha256(data.images, labels)
    import medrobust.evaluation.schema as schema

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
    unit_hash = _sha256_json(base)[:32]
    run_config = {
        "base": base,
        "attacks": [s.key for s in specs],
        "eps": [b.key for b in budgets],
        "large_eps": None if big is None else big.key,
        "positive_class": pos,
        "gallery": gallery,
        "schema_version": schema.SCHEMA_VERSION,
    }
    run_hash = _sha256_json(run_config)[:32]

    out_dir = None if out is None else Path(out).expanduser()
    run_id = uuid.uuid4().hex
    db_path: Path | None = None
    if out_dir is not None:
        _prepare_out(out_dir, overwrite)
        prior = _existing_run_hash(out_dir)
        if prior is not None and prior != run_hash and not overwrite:
            raise EvaluationError(
                f"{out_dir}: holds the results of another evaluation (results.json); choose "
                "another folder or pass overwrite to replace them"
            )
        db_path = out_dir / DB_NAME
        if not resume and not overwrite and (prior is not None or db_path.exists()):
            raise EvaluationError(
                f"{out_dir}: holds earlier results; resume=False would recompute them: pass "
                "overwrite to replace them"
            )
    store = ResultsStore(db_path, run_id=run_id)
    try:
        collected, counts = _run_units(
            clf, data, labels, specs, budgets, big, norm_name, store, unit_hash, seed,
            batch_size, direction, pos, progress, resume,
        )
        results = aggregate(
            collected=collected, labels=labels.numpy(), k=k, task=data.task, specs=specs,
            budgets=budgets, big=big, direction=direction, positive_class=pos, seed=seed,
        )
        results["sanity"] = run_checks(results)
        gal, gal_json = build_gallery(
            clf, data, labels, specs, budgets, results, collected, norm_name, unit_hash,
            seed, batch_size, direction, pos, gallery, display_window(clf, info.metadata, data),
        )
    finally:
        store.close()

    doc: dict[str, Any] = {
        "schema_version": schema.SCHEMA_VERSION,
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
            "positive_class": pos if binary else None,
            "units": str(info.metadata.get("input", {}).get("units") or data.units),
            "bounds": list(clf.bounds),
            "display_window": list(display_window(clf, info.metadata, data)),
        },
        "model": {
            "source": info.source,
            "weights_sha256": info.weights_file_sha256,
            "state_dict_sha256": info.weights_sha256,
            "architecture": _jsonable(info.metadata.get("architecture")),
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
            "n": n,
            "shape": list(data.images.shape[1:]),
            "task": data.task,
            "units": data.units,
            "bounds": list(data.bounds),
            "class_names": list(data.class_names) or [str(i) for i in range(k)],
            "class_counts": np.bincount(labels.numpy(), minlength=k).tolist(),
        },
        **results,
        "gallery": gal_json,
        "run": {
            "started": started_iso,
            "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "duration_s": round(time.time() - started, 3),
            "units_computed": counts["computed"],
            "units_reused": counts["reused"],
            "run_id": run_id,
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "device": str(clf.device),
        },
    }
    doc = _jsonable(doc)
    result = EvaluationResult(doc, out_dir, gal)
    if out_dir is not None:
        from medrobust.evaluation.figures import write_figures
        from medrobust.evaluation.report import write_report

        _atomic_write_text(out_dir / RESULTS_JSON, json.dumps(doc, indent=2) + "\n")
        figures = write_figures(doc, gal, out_dir / FIGURES_DIR)
        write_report(doc, gal, out_dir / REPORT_HTML, figures=figures)
    return result


# --------------------------------------------------------------------------- the batch loop
def _attack_index(labels: torch.Tensor, direction: str | None, pos: int) -> torch.Tensor:
    if direction == "pos2neg":
        return (labels == pos).nonzero().flatten()
    if direction == "neg2pos":
        return (labels != pos).nonzero().flatten()
    return torch.arange(labels.shape[0])


def _attack_unit(
    clf: Classifier, spec: AttackSpec, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor,
    eps: float | None, norm: str, seed: int, span: float, large: bool = False,
) -> dict[str, np.ndarray]:
    """Run one attack on the samples ``idx`` of a batch; per-sample vectors of the result."""
    if idx.numel() == 0:
        empty_f = np.zeros(0, dtype=np.float32)
        out = {"idx": np.zeros(0, dtype=np.int64), "pred": np.zeros(0, dtype=np.int64),
               "success": np.zeros(0, dtype=bool), "linf": empty_f, "l2": empty_f,
               "psnr": empty_f, "ssim": empty_f}
        if spec.minimization:
            out["dist"] = empty_f
        return out
    xa, ya = x[idx], y[idx]
    atk = spec.build(eps, norm, seed, large=large)
    res = atk(clf, xa, ya)
    adv = res.adversarial.detach()
    out = {
        "idx": idx.numpy().astype(np.int64),
        "pred": res.predictions.numpy().astype(np.int64),
        "success": res.success.numpy().astype(bool),
        "linf": res.perturbation_norms["linf"].numpy().astype(np.float32),
        "l2": res.perturbation_norms["l2"].numpy().astype(np.float32),
        "psnr": psnr(xa, adv, span).numpy().astype(np.float32),
        "ssim": ssim(xa, adv, span).numpy().astype(np.float32),
    }
    if spec.minimization:
        out["dist"] = get_norm(norm).measure((adv - xa).double()).float().cpu().numpy()
    return out


def _run_units(
    clf: Classifier, data: ImageData, labels: torch.Tensor, specs: list[AttackSpec],
    budgets: list[Budget], big: Budget | None, norm: str, store: ResultsStore, unit_hash: str,
    seed: int, batch_size: int, direction: str | None, pos: int, progress: bool, resume: bool,
) -> tuple[dict[str, Any], dict[str, int]]:
    """Compute (or read back) every unit; return the per-sample vectors, in sample order."""
    from tqdm.auto import tqdm

    n = len(data)
    nb = (n + batch_size - 1) // batch_size
    span = float(clf.bounds[1] - clf.bounds[0])
    # test hook: seconds to sleep after each computed unit (lets a test kill a run mid-way)
    delay = float(os.environ.get("_MEDROBUST_TEST_UNIT_DELAY", "0") or 0)
    eps_list: list[Budget] = list(budgets) + ([big] if big is not None else [])
    units: list[tuple[AttackSpec | None, Budget | None]] = [(None, None)]
    for s in specs:
        if s.minimization:
            units.append((s, None))
        else:
            units.extend((s, b) for b in eps_list)
    # per unit: a list of per-batch dicts (small vectors), concatenated at the end
    parts: dict[tuple[str, str], list[dict[str, np.ndarray]]] = {}
    counts = {"computed": 0, "reused": 0}
    bar = tqdm(total=nb * len(units), disable=not progress, unit="unit", desc="evaluate",
               dynamic_ncols=True, file=sys.stderr)
    try:
        for b in range(nb):
            sl = slice(b * batch_size, min(n, (b + 1) * batch_size))
            x = data.images[sl]
            y = labels[sl]
            if x.dtype != clf.dtype:
                x = x.to(clf.dtype)
            idx = _attack_index(y, direction, pos)
            for spec, budget in units:
                unit = CLEAN_UNIT if spec is None else spec.key
                eps_key = "" if spec is None else (MIN_NORM_KEY if budget is None else budget.key)
                bar.set_postfix_str(
                    f"batch {b + 1}/{nb} "
                    + ("clean" if spec is None else
                       f"{spec.name} eps={'min-norm' if budget is None else budget.label}"),
                    refresh=False,
                )
                rec = store.get(unit_hash, unit, eps_key, b) if resume else None
                if rec is None:
                    if spec is None:
                        with clf.attack_mode():
                            logits = clf.logits(x).float()
                        probs = torch.softmax(logits, 1)
                        rec = {"probs": probs.cpu().numpy().astype(np.float32),
                               "pred": logits.argmax(1).cpu().numpy().astype(np.int64)}
                    else:
                        rec = _attack_unit(
                            clf, spec, x, y, idx, None if budget is None else budget.value,
                            norm, unit_seed(seed, unit, eps_key, b), span,
                            large=budget is not None and budget is big,
                        )
                    store.put(unit_hash, unit, eps_key, b, rec)
                    counts["computed"] += 1
                    if delay > 0:
                        time.sleep(delay)
                else:
                    counts["reused"] += 1
                if "idx" in rec:
                    rec = dict(rec)
                    rec["idx"] = rec["idx"] + sl.start
                parts.setdefault((unit, eps_key), []).append(rec)
                bar.update(1)
    finally:
        bar.close()
    if progress:
        print(f"evaluate: {counts['computed']} unit(s) computed, {counts['reused']} reused from "
              f"the results database", file=sys.stderr)
    collected: dict[str, Any] = {}
    for key, lst in parts.items():
        collected[f"{key[0]}|{key[1]}"] = {
            name: np.concatenate([p[name] for p in lst]) for name in lst[0]
        }
    return collected, counts


__all__ += ["ResultsStoreError", "check_model_data", "display_window", "resolve_model"]
