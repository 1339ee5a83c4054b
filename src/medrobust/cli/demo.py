"""``medrobust demo``: train a small model and write a robustness report, with no files needed.

::

    medrobust demo                      # built-in CT phantoms, about a minute on 2 CPU cores
    medrobust demo --data pneumoniamnist  # PneumoniaMNIST, if pneumoniamnist.npz is found locally

What it does: generates (or loads) data, trains a small CNN (:func:`medrobust.training.train`),
saves it as a model folder, evaluates it with FGSM and PGD over a range of budgets with
:func:`medrobust.evaluate`, and prints the report's path and a summary table.

Data (``--data``):

* ``phantoms`` (the default): the built-in CT phantoms of :mod:`medrobust.data.phantoms` in
  Hounsfield units (lesion present or not), 2D, 48 px. The model folder holds a soft-tissue window
  (centre 40 HU, width 400 HU) as preprocessing, so the model takes HU and the budgets are in HU:
  0, 2, 4, 8, 16, 32 HU. The report displays the images in that window.
  Generated from a seed: the same numbers on every machine, offline, nothing downloaded.
* ``pneumoniamnist``: MedMNIST's PneumoniaMNIST (28 px, [0, 1]; budgets 0 to 8/255), used only
  when ``pneumoniamnist.npz`` is found locally (in ``$MEDROBUST_DATA``, then the medrobust cache);
  it is never downloaded by the demo.
* ``auto``: PneumoniaMNIST when its file is found, else the phantoms.

The phantoms are the default because the demo is the README's first command: it must give
everyone the same result, offline, in about a minute.

Output folder (``--out``, default ``medrobust-demo/``): ``report.html``, ``results.json``,
``figures/``, the trained ``model/`` folder and ``demo.json`` (the marker that makes it a demo
folder). A folder that is not a demo folder is never touched; an earlier demo folder is replaced
only with ``--overwrite``, and only when it holds nothing but the files the demo wrote (listed in
its manifest, unchanged). The folder is built in place and removed again if the run fails (an
earlier demo folder is restored).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medrobust.cli import CLIError

MARKER = "demo.json"
DATA_CHOICES = ("phantoms", "pneumoniamnist", "auto")


@dataclass
class DemoConfig:
    """The sizes and settings of one demo run."""

    data: str
    n_train: int
    n_val: int
    n_test: int
    size: int
    epochs: int
    width: int
    batch_size: int
    lr: float
    pgd_steps: int
    eps: list[str]
    units: str
    extra: dict[str, Any] = field(default_factory=dict)


def demo_config(data: str, quick: bool) -> DemoConfig:
    """The demo's settings for ``data`` (``"phantoms"`` or ``"pneumoniamnist"``); ``quick`` is a
    reduced run for tests and smoke checks (a few seconds of compute)."""
    if data == "phantoms":
        cfg = DemoConfig(
            data="phantoms", n_train=512, n_val=128, n_test=200, size=48, epochs=6, width=8,
            batch_size=32, lr=3e-3, pgd_steps=10, eps=["0", "2", "4", "8", "16", "32"],
            units="HU",
            extra={"lesion_contrast": 120.0, "lesion_radius": (0.08, 0.16),
                   "window": (40.0, 400.0)},
        )
        if quick:
            cfg.n_train, cfg.n_val, cfg.n_test, cfg.size, cfg.epochs = 256, 64, 64, 32, 4
            cfg.batch_size, cfg.pgd_steps, cfg.eps = 16, 3, ["0", "4", "16"]
        return cfg
    cfg = DemoConfig(
        data="pneumoniamnist", n_train=1500, n_val=200, n_test=200, size=28, epochs=4, width=8,
        batch_size=64, lr=3e-3, pgd_steps=10, eps=["0", "1/255", "2/255", "4/255", "8/255"],
        units="intensity",
    )
    if quick:
        cfg.n_train, cfg.n_val, cfg.n_test, cfg.epochs = 256, 64, 48, 1
        cfg.pgd_steps, cfg.eps = 3, ["0", "2/255", "8/255"]
    return cfg


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``medrobust demo``."""
    p = sub.add_parser(
        "demo",
        help="train a small model and write a robustness report (no files needed)",
        description=(
            "Train a small CNN on built-in CT phantoms (or PneumoniaMNIST found locally), "
            "evaluate it with FGSM and PGD over a range of budgets and write report.html."
        ),
    )
    p.add_argument("--out", default="medrobust-demo",
                   help="output folder (default medrobust-demo/)")
    p.add_argument("--data", default="phantoms", choices=DATA_CHOICES,
                   help="phantoms (default, offline, the same everywhere), pneumoniamnist (needs "
                   "pneumoniamnist.npz in $MEDROBUST_DATA or the cache) or auto")
    p.add_argument("--quick", action="store_true",
                   help="a reduced run (fewer samples, epochs and budgets): seconds, for checks")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for torch (default 1: the network is so small that more "
                   "threads mostly add overhead, and one thread keeps the timing steady on a "
                   "busy machine)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier demo folder holding only what the demo wrote (other "
                   "folders and files are never replaced)")
    p.set_defaults(command="demo")
    return p  # type: ignore[no-any-return]


# --------------------------------------------------------------------------- the folder
def is_demo_folder(path: Path) -> bool:
    """Whether ``path`` was written by ``medrobust demo`` (it holds the marker ``demo.json``)."""
    marker = path / MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text(encoding="utf-8")).get("kind") == "medrobust-demo"
    except (OSError, ValueError, AttributeError):
        return False


def _check_out(out: Path, overwrite: bool) -> bool:
    """Raise unless ``out`` may be written; return whether an earlier demo is to be replaced."""
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not is_demo_folder(out):
            raise CLIError(
                f"--out {out} is a non-empty folder that medrobust demo did not write; choose "
                "another --out (it is never replaced, even with --overwrite)"
            )
        if not overwrite:
            raise CLIError(f"--out {out} holds an earlier demo; use --overwrite to replace it")
        from medrobust._files import few, foreign_files, read_manifest

        foreign = foreign_files(out)
        if foreign or not read_manifest(out):
            raise CLIError(
                f"--out {out} holds files medrobust demo did not write (or that changed since): "
                f"{few(foreign) or 'no manifest'}; it is never replaced, even with --overwrite: "
                "move them away or choose another --out"
            )
        return True
    probe = out if out.exists() else out.parent
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK | os.X_OK):
        raise CLIError(f"cannot write --out {out}: {probe} is not writable")
    return False


# --------------------------------------------------------------------------- the run
def _data(cfg: DemoConfig, seed: int) -> tuple[Any, Any, Any, str]:
    """(train, val, test, description)."""
    if cfg.data == "phantoms":
        from medrobust.data.phantoms import make_phantoms

        kw: dict[str, Any] = dict(size=cfg.size, units="HU", seed=seed,
                                  lesion_contrast=cfg.extra["lesion_contrast"],
                                  lesion_radius=cfg.extra["lesion_radius"])
        tr = make_phantoms(cfg.n_train, split="train", **kw)
        va = make_phantoms(cfg.n_val, split="val", **kw)
        te = make_phantoms(cfg.n_test, split="test", **kw)
        te.meta["split"] = "test"
        desc = (f"built-in CT phantoms in HU, {cfg.size}x{cfg.size}, lesion vs none "
                f"({cfg.n_train} train / {cfg.n_test} test)")
        return tr, va, te, desc
    import torch

    from medrobust.data.errors import DataError
    from medrobust.data.medmnist import load_medmnist

    try:
        tr = load_medmnist("pneumoniamnist", "train", download=False)
        va = load_medmnist("pneumoniamnist", "val", download=False)
        te = load_medmnist("pneumoniamnist", "test", download=False)
    except DataError as err:
        raise CLIError(f"{err} (set MEDROBUST_DATA to the folder holding it)") from None
    g = torch.Generator().manual_seed(seed)

    def pick(d: Any, n: int) -> Any:
        if len(d) <= n:
            return d
        return d.subset(torch.randperm(len(d), generator=g)[:n].sort().values)

    tr, va, te = pick(tr, cfg.n_train), pick(va, cfg.n_val), pick(te, cfg.n_test)
    desc = (f"PneumoniaMNIST 28x28 from {te.source} ({len(tr)} train / {len(te)} test "
            "images, random subsets)")
    return tr, va, te, desc


def _resolve_data(choice: str) -> str:
    if choice != "auto":
        return choice
    from medrobust.data.medmnist import find_medmnist

    return "pneumoniamnist" if find_medmnist("pneumoniamnist") is not None else "phantoms"


def run(args: argparse.Namespace) -> int:
    """Run ``medrobust demo``."""
    t0 = time.perf_counter()
    out = Path(args.out).expanduser()
    replace = _check_out(out, bool(args.overwrite))
    data_name = _resolve_data(str(args.data))
    if data_name == "pneumoniamnist":
        from medrobust.data.medmnist import find_medmnist

        if find_medmnist("pneumoniamnist") is None:
            raise CLIError(
                "pneumoniamnist.npz not found in $MEDROBUST_DATA or the medrobust cache (the "
                "demo never downloads); set MEDROBUST_DATA, or use --data phantoms"
            )
    cfg = demo_config(data_name, bool(args.quick))
    seed = int(args.seed)
    if args.threads < 1:
        raise CLIError(f"--threads must be a positive integer; got {args.threads}")
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(int(args.threads))
    try:
        return _run_in(out, replace, cfg, seed, bool(args.quick), t0)
    finally:
        torch.set_num_threads(threads)


def _run_in(out: Path, replace: bool, cfg: DemoConfig, seed: int, quick: bool,
            t0: float) -> int:

    old: Path | None = None
    created = False
    was_empty = out.is_dir()  # an empty folder (a non-empty one is refused or replaced)
    try:
        if replace:
            was_empty = False
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent)) / "d"
            os.rename(out, old)
        if not out.exists():
            out.mkdir(parents=True)
            created = True
        marker = {"kind": "medrobust-demo", "complete": False, "data": cfg.data,
                  "quick": quick, "seed": seed}
        (out / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        summary = _run_demo(cfg, seed, out, t0)
        marker.update({"complete": True, "config": _cfg_json(cfg), "summary": summary})
        (out / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        from medrobust._files import mark_folder_written

        mark_folder_written(out)  # what --overwrite may replace next time
    except BaseException:
        if created or was_empty:
            shutil.rmtree(out, ignore_errors=True)
            if was_empty:
                out.mkdir(exist_ok=True)  # leave the empty folder as it was
        if old is not None:
            if out.exists():
                shutil.rmtree(out, ignore_errors=True)
            os.rename(old, out)
            shutil.rmtree(old.parent, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old.parent, ignore_errors=True)
    print(format_summary(summary))
    return 0


def _cfg_json(cfg: DemoConfig) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(cfg).items()}


def _run_demo(cfg: DemoConfig, seed: int, out: Path, t0: float) -> dict[str, Any]:
    from medrobust.evaluation import EvaluationError, evaluate
    from medrobust.modelstore import load_model, save_model
    from medrobust.nets import build_network
    from medrobust.training import evaluate as evaluate_classifier
    from medrobust.training import train

    show = sys.stderr.isatty()

    def say(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:5.1f}s] {msg}", file=sys.stderr, flush=True)

    tr, va, te, desc = _data(cfg, seed)
    say(f"data: {desc}")
    pre = None
    if cfg.data == "phantoms":
        # HU in; the soft-tissue window inside the model maps them to [0, 1], so the attacks and
        # their budgets stay in HU
        from medrobust.preprocessing import IntensityWindow

        c, w = cfg.extra["window"]
        pre = IntensityWindow(center=c, width=w)
    import torch

    with torch.random.fork_rng():  # the initial weights come from the seed too
        torch.manual_seed(seed)
        net = build_network("smallcnn", in_channels=tr.channels, num_classes=tr.num_classes,
                            spatial_dims=2, width=cfg.width)
    # no validation data in train(): keep the last epoch (the cosine schedule ends calibrated;
    # the best-AUC epoch of a few can have a badly placed threshold), then report validation
    res = train(net, tr, None, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                seed=seed, preprocess=pre, progress=show, schedule="cosine")
    assert res.classifier is not None
    val = evaluate_classifier(res.classifier, va)
    say(f"trained smallcnn (width {cfg.width}) for {cfg.epochs} epochs: validation ACC "
        f"{val.get('acc', float('nan')):.3f}, AUC {val.get('auc', float('nan')):.3f}")
    model_dir = out / "model"
    save_model(model_dir, res.module, bounds=tr.bounds, units=cfg.units, preprocess=pre,
               class_names=tr.class_names, task=tr.task,
               data={"dataset": cfg.data, "source": tr.source, "n": len(tr)},
               training={"epochs": cfg.epochs, "seed": seed, "best_epoch": res.best_epoch,
                         "val": val})
    loaded = load_model(model_dir)
    say(f"evaluating FGSM and PGD ({cfg.pgd_steps} steps) at eps = {', '.join(cfg.eps)} "
        f"{cfg.units} on {len(te)} test images")
    try:
        ev = evaluate(loaded, te, attacks=("fgsm", "pgd"), eps=cfg.eps, norm="linf", out=out,
                      batch_size=100, seed=seed, progress=show, steps=cfg.pgd_steps,
                      gallery=4 if cfg.n_test < 100 else 6)
    except EvaluationError as err:
        raise CLIError(f"evaluation failed: {err}") from None
    r = ev.results
    fgsm = ev.attack_accuracy("fgsm")
    pgd = ev.attack_accuracy("pgd")
    worst = ev.robust_accuracy
    labels = r["config"].get("eps_labels") or [f"{e:g}" for e in ev.eps]
    rows = []
    for label, e in zip(labels, ev.eps, strict=False):
        rows.append({"eps": e, "eps_label": str(label), "fgsm": fgsm.get(e),
                     "pgd": pgd.get(e), "worst_case": worst.get(e)})
    failed = [f"{c.get('id')}: {c.get('detail')}" for c in r["sanity"].get("checks", [])
              if c.get("status") == "fail"]
    return {
        "data": desc,
        "units": cfg.units,
        "report": str((out / "report.html").resolve()),
        "results": str((out / "results.json").resolve()),
        "model": str(model_dir.resolve()),
        "clean_accuracy": ev.clean_accuracy,
        "clean_auc": ev.clean_auc,
        "table": rows,
        "sanity_passed": ev.sanity_passed,
        "sanity_failed": failed,
        "wall_time_s": round(time.perf_counter() - t0, 1),
    }


def format_summary(s: dict[str, Any]) -> str:
    """The table ``medrobust demo`` prints."""

    def pct(v: float | None) -> str:
        return "   -  " if v is None else f"{100 * v:5.1f}%"

    auc = "" if s["clean_auc"] is None else f", AUC {s['clean_auc']:.3f}"
    lines = [
        f"medrobust demo: {s['data']}",
        f"clean accuracy {100 * s['clean_accuracy']:.1f}%{auc}",
        "",
    ]
    head = f"eps ({s['units']})"
    w = max([len(head)] + [len(str(row["eps_label"])) for row in s["table"]])
    lines.append(f"{head:>{w}}  {'FGSM':>6}  {'PGD':>6}  {'worst case':>10}")
    for row in s["table"]:
        lines.append(f"{row['eps_label']:>{w}}  {pct(row['fgsm'])}  {pct(row['pgd'])}  "
                     f"{pct(row['worst_case']):>10}")
    lines.append("(robust accuracy; worst case = per image, over both attacks)")
    if s["sanity_passed"]:
        lines.append("sanity checks: all passed")
    else:
        lines.append(f"sanity checks: {len(s['sanity_failed'])} failed (see the report):")
        lines += [f"  - {f}" for f in s["sanity_failed"]]
    lines += [
        "",
        f"report:  {s['report']}",
        f"results: {s['results']}",
        f"model:   {s['model']}",
        "try:     medrobust attack --model " + s["model"] + (
            " --input scan.dcm --eps 5 --units HU --out adv.dcm" if s["units"] == "HU"
            else " --input image.png --eps 2/255 --units intensity --out adv.png"),
        f"done in {s['wall_time_s']:.0f} s",
    ]
    return "\n".join(lines)
