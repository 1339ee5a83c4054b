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

DEFAULT_EPS = "0,0.5/255,1/255,2/255,4/255,8/255"


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
    p.add_argument("--eps", default=DEFAULT_EPS,
                   help=f"comma-separated budgets in the model's input units, fractions allowed "
                        f"(default: {DEFAULT_EPS})")
    p.add_argument("--out", default=None,
                   help="output folder (default: evaluations/<model>-<data>-<split>)")
    p.add_argument("--batch-size", type=int, default=64, help="samples per batch (default: 64)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N samples")
    p.add_argument("--seed", type=int, default=0, help="the run's seed (default: 0)")
    p.add_argument("--steps", type=int, default=None,
                   help="steps of the iterative attacks (default: each attack's own)")
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
    try:
        budgets = parse_budgets(args.eps)
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
    from medrobust.modelstore import ModelError, load_model

    try:
        loaded = load_model(model_dir, device=args.device)
    except ModelError as err:
        raise CLIError(str(err)) from None
    except RuntimeError as err:  # e.g. an unavailable device
        raise CLIError(f"{model_dir}: cannot load the model on {args.device!r} ({err})") from None
    data = _load_data(args.data, args.split, args.limit)

    if args.out is None:
        stem = Path(str(args.data)).name.split(".")[0] or "data"
        out = Path("evaluations") / f"{model_dir.resolve().name}-{stem}-{args.split}"
    else:
        out = Path(args.out).expanduser()
    units = loaded.units
    if not args.quiet:
        print(f"evaluating {model_dir} on {args.data} ({args.split}, n = {len(data)}); "
              f"{args.norm} budgets in {units}: {', '.join(b.label for b in budgets)}",
              file=sys.stderr)
    try:
        result = evaluate(
            loaded, data, attacks=attacks, eps=budgets, norm=args.norm, out=out,
            batch_size=args.batch_size, seed=args.seed, direction=args.direction,
            progress=not args.quiet, overwrite=args.overwrite, positive_class=args.positive_class,
            gallery=args.gallery, steps=args.steps,
        )
    except EvaluationError as err:
        raise CLIError(str(err)) from None
    except OSError as err:  # a write outside the engine's own checks (disk full, permissions)
        raise CLIError(f"{out}: cannot write ({err.strerror or err})") from None
    run_info = result.results["run"]
    print(result.summary_table())
    print(f"units computed: {run_info['units_computed']}, reused: {run_info['units_reused']}")
    print(f"report: {out / 'report.html'}")
    print(f"results: {out / 'results.json'}")
    return 0
