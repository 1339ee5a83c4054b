"""``medrobust evaluate``: the robustness report card of a saved model on a data set.

Example::

    medrobust evaluate --model runs/pneu-r18 --data pneumoniamnist --split test \\
        --attacks standard --norm linf --eps 0,0.5/255,1/255,2/255,4/255,8/255

``--attacks standard`` (the default) runs the AutoAttack-style ensemble (APGD-CE, APGD-T, FAB-T,
Square, each on the samples still robust); ``standard-rand`` and ``plus`` are its variants, and
any registered attack names can be listed instead (``fgsm,pgd``).

Budgets are in the model's input units as recorded in its folder (``model.json``): fractions such
as ``8/255`` for [0, 1] images, plain numbers for Hounsfield units. Results go to ``--out``
(``results.json``, ``report.html``, ``figures/``, and ``results.sqlite``, which makes a rerun of
the same command continue where an interrupted one stopped). Existing results of another
configuration are never replaced without ``--overwrite``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from medrobust.cli import CLIError

DEFAULT_EPS = "0,0.5/255,1/255,2/255,4/255,8/255"  # for [0, 1] models; see default_budgets


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``evaluate`` on the ``medrobust`` parser."""
    p = sub.add_parser(
        "evaluate",
        help="robustness report card of a saved model on a data set",
        description=(
            "Attack a saved model at several budgets and write results.json, report.html and "
            "figures into the output folder. Budgets are in the model's input units."
        ),
    )
    p.add_argument("--model", required=True, help="a saved model folder (medrobust train)")
    p.add_argument("--data", required=True,
                   help="a data set name (pneumoniamnist, phantom, ...) or a file/folder")
    p.add_argument("--split", default="test", help="the split to evaluate on (default: test)")
    p.add_argument("--attacks", default="standard",
                   help="comma-separated attack names or ensembles (standard, standard-rand, "
                        "plus) (default: standard)")
    p.add_argument("--norm", default="linf", choices=["linf", "l2", "l1"],
                   help="the norm of the budgets (default: linf)")
    p.add_argument("--eps", default=None,
                   help=f"comma-separated budgets in the model's input units, fractions allowed "
                        f"(default: from the model's units: {DEFAULT_EPS} for [0, 1] images, "
                        "0,1,2,4,8,16 for HU)")
    p.add_argument("--out", default=None,
                   help="output folder (default: evaluations/<model>-<data>-<split>)")
    p.add_argument("--batch-size", type=int, default=64, help="samples per batch (default: 64)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N samples")
    p.add_argument("--seed", type=int, default=0, help="the run's seed (default: 0)")
    p.add_argument("--steps", type=int, default=None,
                   help="steps of the iterative attacks (default: each attack's own)")
    p.add_argument("--queries", type=int, default=None,
                   help="queries of the score-based attacks (Square) (default: 5000)")
    p.add_argument("--direction", choices=["pos2neg", "neg2pos"], default=None,
                   help="binary tasks: attack only the positive (pos2neg: hide a finding) or the "
                        "negative samples")
    p.add_argument("--positive-class", type=int, default=None,
                   help="the positive class of a binary task (default: the model's, else 1)")
    p.add_argument("--gallery", type=int, default=6, help="gallery examples (default: 6)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the results already in the output folder")
    p.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda:0")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--trust-code", action="store_true",
                   help="allow a model folder whose architecture names Python code "
                        "(package.module:function) to import and run it; only for folders whose "
                        "author you trust (default: off, only registered networks are built)")
    p.add_argument("--adaptive", action="store_true",
                   help="defended models: evaluate naively and adaptively (BPDA/EOT) side by side "
                        "and flag gradient masking (medrobust.evaluation.adaptive)")
    p.add_argument("--eot", type=int, default=8,
                   help="with --adaptive: EOT draws for randomized defenses (default: 8)")
    p.add_argument("--roi", default=None,
                   help="segmenters and detectors: confine the attacks to a box around each "
                        "case's foreground grown by M voxels ('box' or 'box:M', M default 4) "
                        "(default: off, the whole volume)")
    p.add_argument("--fp-rate", type=float, default=1.0,
                   help="detectors: the false positives per volume at which the sensitivity is "
                        "stated (default: 1.0)")
    return p  # type: ignore[no-any-return]


def _load_data(name: str, split: str, limit: int | None) -> Any:
    from medrobust.data import load_dataset
    from medrobust.data.errors import DataError

    try:
        if limit is not None:
            try:
                data = load_dataset(name, split=split, limit=limit)
            except TypeError:  # a loader without ``limit``: load, then cut
                data = load_dataset(name, split=split)
        else:
            data = load_dataset(name, split=split)
    except DataError as err:
        raise CLIError(str(err)) from None
    except (OSError, ValueError) as err:
        raise CLIError(f"{name}: cannot load the data ({err})") from None
    if limit is not None and len(data) > limit:
        data = data.subset(slice(0, limit))
    return data


def run(args: argparse.Namespace) -> int:
    """Run ``medrobust evaluate``; raise :class:`CLIError` for anything the user can fix."""
    from medrobust.evaluation import EvaluationError, evaluate, parse_budgets

    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be >= 1; got {args.batch_size}")
    if args.limit is not None and args.limit < 1:
        raise CLIError(f"--limit must be >= 1; got {args.limit}")
    if args.steps is not None and args.steps < 1:
        raise CLIError(f"--steps must be >= 1; got {args.steps}")
    if args.queries is not None and args.queries < 1:
        raise CLIError(f"--queries must be >= 1; got {args.queries}")
    try:
        budgets = None if args.eps is None else parse_budgets(args.eps)
    except EvaluationError as err:
        raise CLIError(str(err)) from None
    attacks = [a.strip() for a in args.attacks.split(",")]
    if not all(attacks):
        raise CLIError(f"malformed --attacks {args.attacks!r}: empty name")
    from medrobust.attacks import ATTACKS
    from medrobust.evaluation.families import PRESETS

    unknown = [a for a in attacks
               if a.lower().replace("-", "").replace("_", "") not in {**ATTACKS, **PRESETS}]
    if unknown:
        raise CLIError(
            f"unknown attack(s) {', '.join(unknown)}; available: {', '.join(sorted(ATTACKS))}; "
            f"ensembles: standard, standard-rand, plus"
        )

    model_dir = Path(args.model).expanduser()
    from medrobust.cli.evaluate_detection import is_detector_folder, run_detection

    if is_detector_folder(model_dir):  # a detector: FROC under attack (evaluation.detection)
        return run_detection(args, model_dir, attacks, budgets)
    from medrobust import distributed
    from medrobust.modelstore import ModelError, load_model

    dctx = distributed.current()  # under torchrun: each rank on its own device
    device = args.device if args.device is not None or dctx is None else str(dctx.device)
    try:
        loaded = load_model(model_dir, device=device, trust_code=args.trust_code)
    except ModelError as err:
        raise CLIError(str(err)) from None
    except RuntimeError as err:  # e.g. an unavailable device
        raise CLIError(f"{model_dir}: cannot load the model on {args.device!r} ({err})") from None
    if args.roi is not None and loaded.segmenter is None:
        raise CLIError("--roi applies to segmenters and detectors; this model is a classifier")
    data = _load_data(args.data, args.split, args.limit)
    from medrobust.compat import MismatchError, check_eps, check_evaluation
    from medrobust.evaluation.budgets import default_budgets

    if budgets is None:  # from the model's units: HU get HU, [0, 1] images fractions of 255
        budgets = (parse_budgets(DEFAULT_EPS) if loaded.bounds == (0.0, 1.0) and args.norm ==
                   "linf" else default_budgets(loaded.bounds, args.norm, loaded.units))
    try:
        check_evaluation(loaded, data)
    except MismatchError as err:
        raise CLIError(f"--model {model_dir} / --data {args.data}: {err}") from None
    try:
        for b in budgets:
            check_eps(b.value, args.norm, loaded.bounds, int(data.images[0].numel()),
                      flag="--eps")
    except MismatchError as err:
        raise CLIError(str(err)) from None

    if args.out is None:
        stem = Path(str(args.data)).name.split(".")[0] or "data"
        out = Path("evaluations") / f"{model_dir.resolve().name}-{stem}-{args.split}"
    else:
        out = Path(args.out).expanduser()
    units = loaded.units
    if loaded.segmenter is not None:  # a segmenter: Dice under attack (evaluation.segmentation)
        return _run_segmentation(args, loaded, data, attacks, budgets, out)
    if dctx is not None and (loaded.segmenter is not None or args.adaptive):
        raise CLIError("under torchrun, evaluate splits classifier evaluations only; run "
                       "segmentation and --adaptive evaluations in one process")
    if not args.quiet and (dctx is None or dctx.is_main):
        print(f"evaluating {model_dir} on {args.data} ({args.split}, n = {len(data)}); "
              f"{args.norm} budgets in {units}: {', '.join(b.label for b in budgets)}",
              file=sys.stderr)
    if args.adaptive:
        return _run_adaptive(args, loaded, data, attacks, budgets, out)
    try:
        result = evaluate(
            loaded, data, attacks=attacks, eps=budgets, norm=args.norm, out=out,
            batch_size=args.batch_size, seed=args.seed, direction=args.direction,
            progress=not args.quiet, overwrite=args.overwrite, positive_class=args.positive_class,
            gallery=args.gallery, steps=args.steps, queries=args.queries,
        )
    except EvaluationError as err:
        raise CLIError(str(err)) from None
    except OSError as err:  # a write outside the engine's own checks (disk full, permissions)
        raise CLIError(f"{out}: cannot write ({err.strerror or err})") from None
    if dctx is not None and not dctx.is_main:
        return 0  # rank 0 aggregates, writes and prints
    run_info = result.results["run"]
    print(result.summary_table())
    print(f"units computed: {run_info['units_computed']}, reused: {run_info['units_reused']}")
    print(f"report: {out / 'report.html'}")
    print(f"results: {out / 'results.json'}")
    return 0


def _run_segmentation(args: argparse.Namespace, loaded: Any, data: Any, attacks: list[str],
                      budgets: Any, out: Path) -> int:
    """``medrobust evaluate`` on a segmentation model (default attacks: pgd, cospgd, dag)."""
    from medrobust.evaluation import EvaluationError
    from medrobust.evaluation.segmentation import (
        REPORT_FILE,
        RESULTS_FILE,
        evaluate_segmentation,
        summary_lines,
    )

    names = ["pgd", "cospgd", "dag"] if args.attacks == "standard" else attacks
    try:
        doc = evaluate_segmentation(
            loaded, data, names, eps=budgets, norm=args.norm, out=out,
            batch_size=args.batch_size, seed=args.seed, steps=args.steps,
            progress=not args.quiet, resume=not args.overwrite, roi=args.roi,
        )
    except EvaluationError as err:
        raise CLIError(str(err)) from None
    except OSError as err:
        raise CLIError(f"{out}: cannot write ({err.strerror or err})") from None
    print("\n".join(summary_lines(doc)))
    print(f"report: {out / REPORT_FILE}")
    print(f"results: {out / RESULTS_FILE}")
    return 0


def _run_adaptive(args: argparse.Namespace, loaded: Any, data: Any, attacks: list[str],
                  budgets: Any, out: Path) -> int:
    from medrobust.evaluation import EvaluationError
    from medrobust.evaluation.adaptive import evaluate_adaptive, table

    try:
        summary = evaluate_adaptive(
            loaded, data, attacks=attacks, out=out, eot=args.eot, eps=budgets, norm=args.norm,
            batch_size=args.batch_size, seed=args.seed, direction=args.direction,
            progress=not args.quiet, overwrite=args.overwrite,
            positive_class=args.positive_class, gallery=args.gallery, steps=args.steps,
        )
    except EvaluationError as err:
        raise CLIError(str(err)) from None
    except OSError as err:
        raise CLIError(f"{out}: cannot write ({err.strerror or err})") from None
    print(table(summary["rows"]))
    print(f"naive: {out / 'naive'}; adaptive: {out / 'adaptive'}; "
          f"comparison: {out / 'adaptive.json'}")
    return 0
