"""``medrobust tamper``: inject or remove a lesion in a CT series, as CT-GAN does.

Examples::

    medrobust tamper --write-phantom phantom/ --phantom-size 64            # a CT series to try
    medrobust tamper --input phantom/ --generator G/ --inject --at 32,30,34 --cube 32 \\
        --refine-model detector/ --refine-eps 20 --out tampered/

The output folder (which must not exist or be empty, and must not be or contain the input) gets
the tampered series (new UIDs, DERIVED\\SECONDARY, a DerivationDescription, a SourceImageSequence),
``tamper.json`` (what was done) and ``report.png`` (before/after slices through the location with
the detector's boxes and the segmenter's contour when given).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from medrobust.cli import CLIError


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "tamper",
        help="inject or remove a lesion in a CT series (CT-GAN)",
        description="Cut a cube around a location of a CT series, in-paint it with a trained "
                    "conditional generator (with or without a lesion), paste it back, optionally "
                    "refine it adversarially against a detector or segmenter, and write a "
                    "derived DICOM series with a report.",
    )
    p.add_argument("--input", help="the CT series folder (DICOM)")
    p.add_argument("--generator", help="the in-painting generator folder (medrobust train "
                                       "--task inpaint)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--inject", action="store_true", help="in-paint a lesion")
    mode.add_argument("--remove", action="store_true", help="in-paint healthy tissue")
    p.add_argument("--at", help="z,y,x voxel indices (z in the series' slice order)")
    p.add_argument("--cube", type=int, default=None,
                   help="cube side in voxels (must be the generator's; default: the generator's)")
    p.add_argument("--refine-model", default=None,
                   help="a detector or segmenter folder that must agree with the tampering")
    p.add_argument("--refine-eps", type=float, default=20.0,
                   help="L-inf budget of the refinement in HU (default: %(default)s)")
    p.add_argument("--refine-steps", type=int, default=10, help="default: %(default)s")
    p.add_argument("--detector", default=None, help="a detector folder shown in the report")
    p.add_argument("--segmenter", default=None, help="a segmenter folder shown in the report")
    p.add_argument("--seed", type=int, default=0, help="touch-up noise seed")
    p.add_argument("--out", help="output folder (new or empty)")
    p.add_argument("--write-phantom", metavar="FOLDER", default=None,
                   help="instead: write a CT phantom series into FOLDER and exit")
    p.add_argument("--phantom-size", type=int, default=64, help="default: %(default)s")
    p.add_argument("--phantom-seed", type=int, default=0, help="default: %(default)s")
    p.add_argument("--no-lesion", action="store_true", help="the phantom has no lesion")
    p.set_defaults(command="tamper")
    return p


def _parse_at(text: str | None) -> list[int]:
    if not text:
        raise CLIError("--at z,y,x is required (voxel indices)")
    try:
        vals = [int(v) for v in text.split(",")]
    except ValueError:
        raise CLIError(f"--at must be three integers z,y,x; got {text!r}") from None
    if len(vals) != 3:
        raise CLIError(f"--at must be three integers z,y,x; got {text!r}")
    return vals


def _check_out(out: Path, inp: Path | None) -> None:
    o = out.expanduser().resolve()
    if inp is not None:
        i = inp.expanduser().resolve()
        if o == i or i in o.parents or o in i.parents:
            raise CLIError(f"--out {out} must not be, contain or lie inside the input {inp}")
    if o.exists() and (not o.is_dir() or any(o.iterdir())):
        raise CLIError(f"--out {out}: exists and is not an empty folder; medrobust never "
                       "overwrites files it did not write")


def _model_kind(folder: str) -> str:
    j = Path(folder).expanduser() / "model.json"
    try:
        doc = json.loads(j.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CLIError(f"{folder}: not a medrobust model folder ({err})") from None
    if doc.get("kind"):
        return str(doc["kind"])
    return "segmenter" if doc.get("task") == "segmentation" else "classifier"


def _segment_fn(folder: str) -> Any:
    """A differentiable HU -> logits function for a segmentation model folder."""
    import torch

    from medrobust.modelstore import ModelError, load_model

    try:
        loaded = load_model(folder)
    except ModelError as err:
        raise CLIError(str(err)) from None
    pre = loaded.preprocess
    p = loaded.metadata.get("preprocessing") or {}
    mean = None if p.get("mean") is None else torch.tensor(p["mean"]).view(1, -1, 1, 1, 1)
    std = None if p.get("std") is None else torch.tensor(p["std"]).view(1, -1, 1, 1, 1)
    net = loaded.module.eval()

    def segment(x: torch.Tensor) -> torch.Tensor:
        z = pre(x) if pre is not None else x
        if mean is not None:
            z = z - mean
        if std is not None:
            z = z / std
        return net(z)

    return segment


def run(args: argparse.Namespace) -> int:
    import torch

    from medrobust.data.errors import DataError
    from medrobust.modelstore import ModelError

    torch.set_num_threads(1)
    if args.write_phantom:
        from medrobust.data.phantoms import write_phantom_series

        try:
            data = write_phantom_series(args.write_phantom, size=args.phantom_size,
                                        seed=args.phantom_seed, lesion=not args.no_lesion)
        except (ModelError, ValueError) as err:
            raise CLIError(str(err)) from None
        where = ""
        if not args.no_lesion:
            c = data.labels[0].nonzero().float().mean(0).round().long().tolist()
            where = f"; lesion centre at z,y,x = {c[0]},{c[1]},{c[2]}"
        print(f"medrobust tamper: wrote a {tuple(data.images.shape[2:])} CT phantom series to "
              f"{args.write_phantom}{where}")
        return 0
    for name in ("input", "generator", "out"):
        if not getattr(args, name):
            raise CLIError(f"--{name} is required")
    if not (args.inject or args.remove):
        raise CLIError("give --inject or --remove")
    at = _parse_at(args.at)
    inp, out = Path(args.input), Path(args.out)
    if not inp.is_dir():
        raise CLIError(f"--input {inp}: not a folder (a CT series is a folder of DICOM slices)")
    _check_out(out, inp)
    if not (args.refine_eps > 0) or args.refine_steps < 1:
        raise CLIError("--refine-eps must be > 0 and --refine-steps >= 1")

    from medrobust.data.dicom import load_dicom
    from medrobust.tamper import load_generator, refine, tamper_volume
    from medrobust.tamper.dicom_out import write_tampered_series
    from medrobust.tamper.report import write_report_png

    try:
        series = load_dicom(inp)
    except DataError as err:
        raise CLIError(f"--input {inp}: {err}") from None
    modality = str(series.meta.get("modality", ""))
    if modality != "CT" or series.units != "HU":
        raise CLIError(f"--input {inp}: a {modality or 'non-CT'} series; tamper needs a CT "
                       "series in Hounsfield units (Modality CT)")
    if series.images.dim() != 5 or series.images.shape[2] < 2:
        raise CLIError(f"--input {inp}: a single slice; tamper needs a 3D series")
    try:
        gen = load_generator(args.generator)
    except ModelError as err:
        raise CLIError(f"--generator: {err}") from None
    if args.cube is not None and args.cube != gen.cube:
        raise CLIError(f"--cube {args.cube}: the generator in-paints {gen.cube}^3 cubes")
    vol = series.images[0, 0]
    mode = "inject" if args.inject else "remove"
    sp = series.spacing
    if sp is not None and max(sp) > 1.5 * min(sp):
        print(f"medrobust tamper: note: the series' voxels are {tuple(round(v, 2) for v in sp)} "
              "mm (not isotropic); the cube is cut in voxels, without CT-GAN's resampling to "
              "1 mm", flush=True)
    try:
        res = tamper_volume(vol, at, gen, mode, seed=args.seed, bounds=series.bounds)
    except ValueError as err:
        raise CLIError(str(err)) from None

    detector = None
    seg_fn = None
    if args.refine_model:
        kind = _model_kind(args.refine_model)
        if kind == "detector":
            from medrobust.models.detector import load_detector

            try:
                detector = load_detector(args.refine_model)
            except ModelError as err:
                raise CLIError(f"--refine-model: {err}") from None
            res = refine(res, detector, eps=args.refine_eps, steps=args.refine_steps,
                         bounds=series.bounds)
        elif kind == "segmenter":
            seg_fn = _segment_fn(args.refine_model)
            res = refine(res, None, eps=args.refine_eps, steps=args.refine_steps,
                         segment=seg_fn, bounds=series.bounds)
        else:
            raise CLIError(f"--refine-model {args.refine_model}: a {kind}; refinement needs a "
                           "detector or a segmenter")
    if args.detector and detector is None:
        from medrobust.models.detector import load_detector

        try:
            detector = load_detector(args.detector)
        except ModelError as err:
            raise CLIError(f"--detector: {err}") from None
    if args.segmenter and seg_fn is None:
        seg_fn = _segment_fn(args.segmenter)

    desc = (f"medrobust tamper: CT-GAN {mode} at z,y,x={at[0]},{at[1]},{at[2]}, cube "
            f"{gen.cube}, generator {Path(args.generator).name}"
            + (f", refined against {Path(args.refine_model).name} within "
               f"{args.refine_eps:g} HU" if args.refine_model else ""))
    try:
        write_tampered_series(out, res.volume, series.meta, desc)
    except DataError as err:
        raise CLIError(str(err)) from None

    reread = load_dicom(out).images[0, 0]
    boxes_b = boxes_a = None
    seg_b = seg_a = None
    with torch.no_grad():
        if detector is not None:
            boxes_b = detector.detect(vol[None, None])
            boxes_a = detector.detect(reread[None, None])
        if seg_fn is not None:
            seg_b = seg_fn(vol[None, None]).argmax(1)[0]
            seg_a = seg_fn(reread[None, None]).argmax(1)[0]
    write_report_png(out / "report.png", vol, reread, res.location, boxes_before=boxes_b,
                     boxes_after=boxes_a, seg_before=seg_b, seg_after=seg_a, title=desc)
    record = {"mode": mode, "location": list(res.location), "cube": res.cube, "hole": res.hole,
              "input": str(inp), "generator": str(args.generator), "info": res.info,
              "description": desc}
    (out / "tamper.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(f"medrobust tamper: {mode} at {res.location}; wrote {out} (series, report.png, "
          "tamper.json)")
    return 0
