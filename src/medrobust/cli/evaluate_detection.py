"""``medrobust evaluate`` on a detector folder (``medrobust train --task detection``): the
sensitivity at fixed false positives per volume, clean and under attack
(:mod:`medrobust.evaluation.detection`).

Example::

    medrobust evaluate --model runs/det --data phantom --limit 64 --eps 0,20,50 --steps 10

``--data phantom`` / ``phantom3d`` (no further options) are the detection phantoms the detector
was trained on (CT in HU with lesions, :func:`medrobust.detection_training.detection_phantoms`,
the ``--split`` stream, the size and seed recorded in the folder); any other data set needs lesion
masks, which give the boxes. ``--attacks standard`` means ``dag-detection,pgd-detection``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from medrobust.cli import CLIError

__all__ = ["is_detector_folder", "run_detection"]

_CLASSIFIER_BATCH = 64  # evaluate's --batch-size default, meant for 2D classifiers; 8 volumes here


def is_detector_folder(path: Path) -> bool:
    """Whether ``path`` is a model folder whose ``model.json`` says kind ``detector``."""
    try:
        doc = json.loads((path / "model.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(doc, dict) and doc.get("kind") == "detector"


def _data(args: argparse.Namespace, meta: dict[str, Any], dims: int) -> tuple[Any, Any]:
    from medrobust.cli.evaluate import _load_data
    from medrobust.cli.train_tasks import _phantom_dims
    from medrobust.detection_training import detection_phantoms
    from medrobust.evaluation.detection import boxes_of

    pd = _phantom_dims(str(args.data))
    plain = str(args.data).strip().lower() in ("phantom", "phantom2d", "phantom3d")
    if pd is not None and plain:
        if pd != dims:
            raise CLIError(f"--data {args.data} is {pd}D but the detector is {dims}D "
                           f"(use {'phantom3d' if dims == 3 else 'phantom'})")
        size = int((meta.get("data") or {}).get("size") or 32)
        seed = int((meta.get("training") or {}).get("seed") or 0)
        try:
            data, boxes = detection_phantoms(args.limit or 64, size, dim=dims, seed=seed,
                                             split=args.split)
        except ValueError as err:
            raise CLIError(f"--data {args.data}: {err}") from None
        return data, boxes
    data = _load_data(args.data, args.split, args.limit)
    if data.labels.dim() != data.images.dim() - 1:
        raise CLIError(f"--data {args.data}: a detector is evaluated against lesion boxes, "
                       "derived from lesion masks; this data set has class labels "
                       f"{tuple(data.labels.shape)} (use phantom, phantom3d or a segmentation "
                       "data set)")
    return data, boxes_of(data)


def run_detection(args: argparse.Namespace, model_dir: Path, attacks: list[str],
                  budgets: Any) -> int:
    """Run ``medrobust evaluate`` on a detector folder."""
    import sys

    from medrobust.evaluation import EvaluationError
    from medrobust.evaluation.detection import (
        DEFAULT_ATTACKS,
        REPORT_FILE,
        RESULTS_FILE,
        evaluate_detection,
        summary_lines,
    )
    if args.adaptive:
        raise CLIError("--adaptive applies to defended classifiers, not to a detector")
    if not args.fp_rate > 0:
        raise CLIError(f"--fp-rate must be > 0; got {args.fp_rate}")
    meta = json.loads((model_dir / "model.json").read_text(encoding="utf-8"))
    units = str((meta.get("input") or {}).get("units") or "HU")
    dims = (meta.get("input") or {}).get("spatial_dims")
    if dims not in (2, 3):
        raise CLIError(f"{model_dir / 'model.json'}: input.spatial_dims must be 2 or 3; "
                       f"got {dims!r}")
    data, boxes = _data(args, meta, int(dims))
    names = list(DEFAULT_ATTACKS) if args.attacks == "standard" else attacks
    if args.out is None:
        stem = Path(str(args.data)).name.split(".")[0] or "data"
        out = Path("evaluations") / f"{model_dir.resolve().name}-{stem}-{args.split}"
    else:
        out = Path(args.out).expanduser()
    if not args.quiet:
        print(f"evaluating the detector {model_dir} on {args.data} ({args.split}, "
              f"{len(data)} volumes); {args.norm} budgets in {units}", file=sys.stderr)
    try:
        doc = evaluate_detection(
            str(model_dir), data, names, eps=budgets, norm=args.norm, out=out,
            batch_size=8 if args.batch_size == _CLASSIFIER_BATCH else args.batch_size,
            seed=args.seed, boxes=boxes, fp_rate=args.fp_rate, steps=args.steps, roi=args.roi,
            units=units, progress=not args.quiet, resume=not args.overwrite, device=args.device,
        )
    except EvaluationError as err:
        raise CLIError(str(err)) from None
    except OSError as err:
        raise CLIError(f"{out}: cannot write ({err.strerror or err})") from None
    except RuntimeError as err:  # e.g. an unavailable device
        raise CLIError(f"{model_dir}: cannot run the detector on {args.device!r} ({err})"
                       ) from None
    print("\n".join(summary_lines(doc)))
    print(f"report: {out / REPORT_FILE}")
    print(f"results: {out / RESULTS_FILE}")
    return 0
