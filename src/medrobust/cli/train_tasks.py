"""``medrobust train --task detection|inpaint``: the detector and the CT-GAN generator.

* ``--task detection --data phantom3d`` (or ``phantom`` for 2D): a RetinaNet on CT phantoms with
  lesions (boxes from their masks, :mod:`medrobust.detection_training`); the folder states the
  validation and test sensitivity at 1 false positive per volume.
* ``--task inpaint --data phantom3d`` or ``--data series1/,series2/`` (CT DICOM series, with
  ``--lesions lesions.csv`` rows ``folder,z,y,x`` for the injection cubes; series without rows give
  healthy cubes): the conditional in-painting generator (:mod:`medrobust.tamper.training`).
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Any

from medrobust.cli import CLIError

_DEFAULT_BATCH = 128  # cli.train's default, meant for 2D classifiers


def _phantom_dims(name: str) -> int | None:
    n = name.strip().lower()
    if not n.startswith("phantom"):
        return None
    return 3 if n.startswith("phantom3d") else 2


def run_detection(args: argparse.Namespace) -> int:
    import torch

    from medrobust.data.streamed import materialize
    from medrobust.detection_training import (
        detection_phantoms,
        evaluate_detector,
        train_detector,
    )
    from medrobust.models.detector import save_detector
    from medrobust.modelstore import ModelError

    dims = _phantom_dims(args.data)
    if dims is None:
        raise CLIError(f"--task detection: --data must be a phantom (phantom, phantom3d); "
                       f"{args.data!r} has no boxes")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    size = args.size or 32
    n = args.limit or (512 if dims == 2 else 256)
    batch = 8 if args.batch_size == _DEFAULT_BATCH else args.batch_size
    tr, trb = detection_phantoms(n, size, dim=dims, seed=args.seed, split="train")
    va, vab = detection_phantoms(max(n // 4, 16), size, dim=dims, seed=args.seed, split="val")
    te, teb = detection_phantoms(max(n // 4, 16), size, dim=dims, seed=args.seed, split="test")
    print(f"medrobust train: detection on {n} {dims}D CT phantoms of {size} voxels "
          f"({sum(len(b['boxes']) for b in trb)} lesions)", flush=True)
    log: list[dict[str, float]] = []

    def show(rec: dict[str, float]) -> None:
        log.append(rec)
        print(f"epoch {int(rec['epoch']):>3}/{args.epochs}  loss {rec['train_loss']:.4f}  "
              f"{rec['time_s']:.1f} s", flush=True)

    try:
        res = train_detector(materialize(tr.images), trb, epochs=args.epochs, batch_size=batch,
                             lr=args.lr, seed=args.seed, on_epoch_end=show)
    except (ValueError, FloatingPointError) as err:
        raise CLIError(str(err)) from None
    val = evaluate_detector(res.detector, materialize(va.images), vab)
    test = evaluate_detector(res.detector, materialize(te.images), teb)
    print(f"sensitivity at 1 FP/volume: val {val['sensitivity']:.3f}, test "
          f"{test['sensitivity']:.3f} (score >= {test['threshold']:.3f})", flush=True)
    try:
        save_detector(
            args.out, res.detector, arch_args=res.arch_args, units="HU",
            class_names=["lesion"], overwrite=args.overwrite,
            data={"name": args.data, "n_train": n, "size": size, "source": tr.source},
            training={"epochs": args.epochs, "batch_size": batch, "lr": args.lr,
                      "seed": args.seed, "history": log,
                      "val_sensitivity_at_1fp": val, "test_sensitivity_at_1fp": test},
        )
    except ModelError as err:
        raise CLIError(str(err)) from None
    print(f"saved {args.out}")
    return 0


def _read_lesions(path: str, folders: list[str]) -> list[list[list[int]]]:
    rows: dict[str, list[list[int]]] = {str(Path(f).resolve()): [] for f in folders}
    try:
        with open(path, newline="", encoding="utf-8") as f:
            for i, row in enumerate(csv.reader(f), 1):
                if not row or row[0].startswith("#"):
                    continue
                if len(row) != 4:
                    raise CLIError(f"--lesions {path}:{i}: expected folder,z,y,x")
                key = str(Path(row[0]).resolve())
                if key not in rows:
                    raise CLIError(f"--lesions {path}:{i}: {row[0]} is not one of --data")
                try:
                    rows[key].append([int(v) for v in row[1:]])
                except ValueError:
                    raise CLIError(f"--lesions {path}:{i}: z,y,x must be integers") from None
    except OSError as err:
        raise CLIError(f"--lesions: {err}") from None
    return [rows[str(Path(f).resolve())] for f in folders]


def run_inpaint(args: argparse.Namespace) -> int:
    import torch

    from medrobust.data.dicom import load_dicom
    from medrobust.data.errors import DataError
    from medrobust.modelstore import ModelError
    from medrobust.tamper.cubes import check_location
    from medrobust.tamper.generator import save_generator
    from medrobust.tamper.training import phantom_cubes, series_cubes, train_inpainter

    cube = 32
    batch = 8 if args.batch_size == _DEFAULT_BATCH else args.batch_size
    if _phantom_dims(args.data) is not None:
        n = args.limit or 128
        cubes, cond = phantom_cubes(n, size=args.size or 48, cube=cube, seed=args.seed)
        source: dict[str, Any] = {"name": args.data, "n_volumes": n, "size": args.size or 48}
    else:
        folders = [f for f in args.data.split(",") if f]
        vols = []
        for f in folders:
            try:
                s = load_dicom(f)
            except DataError as err:
                raise CLIError(f"--data {f}: {err}") from None
            if s.meta.get("modality") != "CT" or s.images.dim() != 5:
                raise CLIError(f"--data {f}: not a CT series (3D, Modality CT)")
            vols.append(s.images[0, 0])
        lesions = _read_lesions(args.lesions, folders) if args.lesions else None
        if lesions is not None:
            for f, v, les in zip(folders, vols, lesions, strict=True):
                for loc in les:
                    try:
                        check_location(loc, v.shape)
                    except ValueError as err:
                        raise CLIError(f"--lesions ({f}): {err}") from None
        try:
            cubes, cond = series_cubes(vols, lesions, cube, seed=args.seed)
        except ValueError as err:
            raise CLIError(str(err)) from None
        source = {"name": "dicom series", "folders": folders, "lesions": args.lesions}
    steps = max(1, args.epochs * max(1, cubes.shape[0] // batch))
    print(f"medrobust train: in-painting generator on {cubes.shape[0]} cubes of {cube}^3 "
          f"({int(cond.sum())} with a lesion), {steps} steps", flush=True)
    lr = 2e-4 if args.lr == 1e-3 else args.lr  # pix2pix's rate unless one was given
    res = train_inpainter(cubes, cond, steps=steps, batch_size=batch, lr=lr, seed=args.seed,
                          log_every=max(1, steps // 10),
                          on_log=lambda r: print(json.dumps({k: round(v, 4)
                                                             for k, v in r.items()}), flush=True))
    try:
        save_generator(args.out, res.generator, arch_args=res.arch_args, data=source,
                       training={"steps": steps, "batch_size": batch, "lr": lr,
                                 "seed": args.seed, "history": res.history},
                       overwrite=args.overwrite)
    except ModelError as err:
        raise CLIError(str(err)) from None
    del torch
    print(f"saved {args.out}")
    return 0
