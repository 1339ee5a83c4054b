"""``medrobust transfer``: the transfer matrix between saved models, with its report.

::

    medrobust transfer --models A,B,C,D --data pneumoniamnist --attack pgd --eps 4/255 --out T/

Writes ``T/results.json`` (the matrix of each target's accuracy and transfer success on the
examples crafted on each proxy, the hold-one-out ensemble table) and ``T/report.html`` (one
self-contained page with the heatmaps). Models with different bounds or units are refused. An
existing output folder's files are replaced only with ``--overwrite``.

Under ``torchrun --nproc-per-node N -m medrobust transfer ...`` the (row, batch) jobs of the
matrix are dealt to the ranks (:func:`medrobust.transfer.transfer`); rank 0 writes the results,
which equal a single process's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from medrobust.cli import CLIError


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``medrobust transfer``."""
    p = sub.add_parser(
        "transfer",
        help="transfer matrix of an attack between saved models (results.json, report.html)",
        description=(
            "Craft adversarial examples on each model (the proxy) and evaluate them on every "
            "model (the target); also on an ensemble of all models but one, evaluated on the "
            "held-out one. Budgets are in the models' input units."
        ),
    )
    p.add_argument("--models", required=True, help="comma-separated saved model folders")
    p.add_argument("--data", required=True,
                   help="a MedMNIST name (pneumoniamnist) or an .npz/folder medrobust can load")
    p.add_argument("--split", default="test", help="data split (default test)")
    p.add_argument("--limit", type=int, default=256, help="samples used (default 256)")
    p.add_argument("--attack", default="pgd", help="a gradient attack name (default pgd)")
    p.add_argument("--eps", required=True, help="budget in the models' units, e.g. 4/255")
    p.add_argument("--norm", default="linf", choices=("linf", "l2", "l1"),
                   help="the budget's norm")
    p.add_argument("--steps", type=int, default=None, help="attack iterations (attack default)")
    p.add_argument("--combine", default="logits", choices=("logits", "loss"),
                   help="how the hold-one-out ensemble fuses its members (default logits)")
    p.add_argument("--no-ensemble", action="store_true", help="skip the ensemble table")
    p.add_argument("--seed", type=int, default=0, help="the attack's seed")
    p.add_argument("--batch-size", type=int, default=128, help="samples attacked at once")
    p.add_argument("--out", required=True, help="output folder (results.json, report.html)")
    p.add_argument("--overwrite", action="store_true", help="replace existing results")
    p.add_argument("--device", default=None,
                   help="torch device for the models (default: CPU; under torchrun each rank's "
                        "own device)")
    return p  # type: ignore[no-any-return]


def _write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def run(args: argparse.Namespace) -> int:
    """Run ``medrobust transfer``; raise :class:`CLIError` for anything the user can fix."""
    from medrobust.attacks import ATTACKS
    from medrobust.cli.attack import parse_eps
    from medrobust.cli.evaluate import _load_data
    from medrobust.modelstore import ModelError, load_model
    from medrobust.transfer import transfer
    from medrobust.transfer_report import render_transfer_report

    eps = parse_eps(args.eps)
    folders = [m.strip() for m in str(args.models).split(",")]
    if len(folders) < 2 or not all(folders):
        raise CLIError(f"--models needs at least two comma-separated folders; got {args.models!r}")
    key = args.attack.lower().replace("-", "").replace("_", "")
    if key not in ATTACKS:
        raise CLIError(f"unknown attack {args.attack!r}; available: {', '.join(sorted(ATTACKS))}")
    if args.limit is not None and args.limit < 1:
        raise CLIError(f"--limit must be >= 1; got {args.limit}")
    if args.steps is not None and args.steps < 1:
        raise CLIError(f"--steps must be >= 1; got {args.steps}")
    out = Path(args.out).expanduser()
    targets = [out / "results.json", out / "report.html"]
    if any(t.exists() for t in targets) and not args.overwrite:
        raise CLIError(f"{out} already holds results; pass --overwrite to replace them")
    from medrobust import distributed

    dctx = distributed.current()  # under torchrun: the jobs are dealt to the ranks
    main_rank = dctx is None or dctx.is_main
    device = args.device if args.device is not None or dctx is None else str(dctx.device)

    models: dict[str, Any] = {}
    for folder in folders:
        try:
            loaded = load_model(folder, device=device)
        except ModelError as err:
            raise CLIError(str(err)) from None
        if loaded.classifier is None:
            raise CLIError(f"{folder}: a segmentation model; transfer needs classifiers")
        name = Path(folder).resolve().name
        if name in models:
            name = folder
        models[name] = loaded
    data = _load_data(args.data, args.split, args.limit)
    kwargs: dict[str, Any] = {}
    if args.steps is not None:
        kwargs["steps"] = args.steps
    if main_rank:
        ranks = "" if dctx is None else f" on {dctx.world_size} ranks"
        print(f"transfer: {args.attack} at eps={eps:g} ({args.norm}) between {len(models)} models "
              f"on {len(data)} samples{ranks}", file=sys.stderr)
    data_units = getattr(data, "units", None)
    for name, m in models.items():
        if data_units is not None and m.units != data_units:
            raise CLIError(f"{name}: the model takes {m.units!r} but the data are in "
                           f"{data_units!r}")
    try:
        result = transfer(models, data, args.attack, eps, args.norm, ensemble=not args.no_ensemble,
                          combine=args.combine, attack_kwargs=kwargs, seed=args.seed,
                          batch_size=args.batch_size)
    except (TypeError, ValueError) as err:
        raise CLIError(str(err)) from None
    if not main_rank:
        return 0  # rank 0 writes and prints
    doc = result.to_dict()
    doc["data"] = f"{args.data} ({args.split})"
    doc["models"] = {n: str(Path(f)) for n, f in zip(models, folders, strict=True)}
    out.mkdir(parents=True, exist_ok=True)
    _write(targets[0], json.dumps(doc, indent=2))
    _write(targets[1], render_transfer_report(doc))
    print(result.to_markdown())
    print(f"wrote {targets[0]} and {targets[1]}", file=sys.stderr)
    return 0
