"""``medrobust attack``: attack one image or volume in its own pixels and units, write it back.

::

    medrobust attack --model runs/ct --input scan.dcm --attack pgd --eps 5 --units HU --out adv.dcm

The model folder's preprocessing (an intensity window, a resize) runs inside the wrapper, so the
attack works on the file's own values: Hounsfield units for CT DICOM, [0, 1] intensities for a PNG
(``level / 255``), the stored values for NIfTI and ``.npy`` (in the model's units, or mapped into
them by ``--rescale``).

The adversarial version is written in the input's format (``.dcm``, ``.nii``/``.nii.gz``,
``.png``, ``.npy``; a folder holding one DICOM series is attacked as a volume and written as a new
folder of slices) with everything but the pixel data and the derivation marks below kept (DICOM
elements, NIfTI affine and header, PNG mode and text chunks, ``.npy`` dtype and shape), in the
file's own storage type. The
attack runs in float; its result is then snapped to the values the file can store *and
re-projected onto the budget on that grid* (:meth:`medrobust.io.Grid.snap`), so that the file
written satisfies ``|change| <= eps`` exactly, in the file's units. The written file is read back
and evaluated again, and the summary says whether it is still adversarial after that rounding.

The written file says that it was changed: a DICOM gets a derived identity (new SOP Instance and
Series Instance UIDs, ``ImageType DERIVED\\SECONDARY``, a ``DerivationDescription`` naming
medrobust, the attack and eps, and a ``SourceImageSequence`` pointing to the original), so that a
PACS never takes it for the original; ``--keep-uids`` keeps the original UIDs (the file then
claims to be the original instance: only for experiments that need it, never for a file that may
reach a PACS). A NIfTI gets the same text as its ``descrip``, a PNG as a ``medrobust`` text chunk.

Before anything is computed, the model and the image are checked against each other
(:mod:`medrobust.compat`: channels, size recorded in the model folder, units, values, a pixel limit
read from the header) and the budget against the bounds (an L-inf eps at or above their span
contains every input). ``--units`` defaults to the model's; ``--rescale`` maps an integer image
stored in other units (a uint8 ``.npy`` from MedMNIST, a raw MR NIfTI) onto the model's bounds,
and the result is stored back in the file's own type and units.

Beside it goes a side-by-side PNG (``<out>_compare.png`` by default): the clean image, the
difference (amplified to full contrast) and the adversarial image, with the predicted class and its
probability; volumes show the slice with the largest change. Outputs are written to temporary files
and moved into place only when everything succeeded. ``--out`` never is, contains or lies inside
``--input``; an existing output is replaced only with ``--overwrite`` and only when medrobust wrote
it (listed unchanged in the folder's manifest, :data:`medrobust._files.MANIFEST`): nothing else is
ever deleted or overwritten.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import math
import os
import shutil
import tempfile
import time
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medrobust.cli import CLIError

NORMS = ("linf", "l2", "l1")


# --------------------------------------------------------------------------- parser
def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``medrobust attack``."""
    p = sub.add_parser(
        "attack",
        help="attack one image or volume (DICOM, NIfTI, PNG, .npy) and write it back",
        description=(
            "Attack one image or volume with a saved model and write the adversarial version in "
            "the same format, marked as derived (a DICOM gets new UIDs, ImageType "
            "DERIVED\\SECONDARY and a DerivationDescription; other elements kept), plus a "
            "side-by-side PNG. The budget --eps is in the model's input units (--units), e.g. HU "
            "for CT."
        ),
    )
    p.add_argument("--model", required=True, help="saved model folder (model.json + weights)")
    p.add_argument("--input", required=True,
                   help="the image: .dcm, .nii/.nii.gz, .png or .npy")
    p.add_argument("--out", required=True,
                   help="where to write the adversarial image (same format as --input)")
    p.add_argument("--attack", default="pgd",
                   help="a fixed-budget attack: " + ", ".join(_fixed_budget_names())
                   + " (default pgd)")
    p.add_argument("--eps", required=True,
                   help="the budget in the model's units: 5 (HU), 8/255 (for [0, 1] models)")
    p.add_argument("--units", default=None,
                   help="units of --eps and of the image (HU, intensity); must match the "
                   "model's (default: the model's units)")
    p.add_argument("--rescale", nargs="?", const="auto", default=None,
                   choices=("auto", "dtype", "minmax"),
                   help="map an integer image in other units onto the model's bounds: dtype (the "
                   "type's range, 0..255 for uint8), minmax (the image's own range) or auto "
                   "(dtype for 8-bit, else minmax; the value when given alone); the result is "
                   "stored back in the file's type (default: off)")
    p.add_argument("--norm", default="linf", choices=NORMS, help="the budget's norm (default linf)")
    p.add_argument("--steps", type=int, default=None,
                   help="iterations of iterative attacks (attack default)")
    p.add_argument("--loss", default="ce", choices=("ce", "margin"),
                   help="loss to ascend: ce (cross-entropy) or margin (C&W logit margin; use it "
                   "when the softmax saturates); default ce")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--label", default=None,
                   help="the true class (index or name); default: the model's clean prediction")
    p.add_argument("--target", default=None,
                   help="make the attack targeted: the class (index or name) to reach")
    p.add_argument("--figure", default=None,
                   help="side-by-side PNG to write (default <out>_compare.png)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--overwrite", action="store_true",
                   help="replace outputs an earlier medrobust run wrote (never other files)")
    p.add_argument("--keep-uids", action="store_true",
                   help="DICOM: keep the original SOP/Series Instance UIDs. RISK: the adversarial "
                   "file then claims to be the original instance and can replace or be mistaken "
                   "for it in a PACS; only for experiments that need it (default: new UIDs, "
                   "marked as derived)")
    p.add_argument("--trust-code", action="store_true",
                   help="allow a model folder whose architecture names Python code "
                   "(package.module:function) to import and run it (default: off)")
    p.set_defaults(command="attack")
    return p  # type: ignore[no-any-return]


# --------------------------------------------------------------------------- small helpers
def _fixed_budget_names() -> list[str]:
    from medrobust.attacks import ATTACKS, FixedBudgetAttack

    return sorted(k for k, c in ATTACKS.items() if issubclass(c, FixedBudgetAttack))


def parse_eps(text: str) -> float:
    """A positive budget: ``5``, ``0.5``, ``8/255``."""
    s = str(text).strip()
    try:
        value = float(Fraction(s)) if "/" in s else float(s)
    except (ValueError, ZeroDivisionError):
        raise CLIError(f"--eps {text!r} is not a number (examples: 5, 0.5, 8/255)") from None
    if not math.isfinite(value) or value <= 0:
        raise CLIError(f"--eps must be a positive finite number; got {text!r}")
    return value


_UNIT_ALIASES = {
    "hu": "HU", "hounsfield": "HU", "hounsfieldunits": "HU",
    "intensity": "intensity", "[0,1]": "intensity", "0-1": "intensity",
}


def canonical_units(units: str) -> str:
    """``"hu"`` -> ``"HU"``, ``"[0, 1]"`` -> ``"intensity"``; others compared case-insensitively."""
    s = str(units).strip()
    return _UNIT_ALIASES.get(s.lower().replace(" ", ""), s.lower())


def _class_index(value: str, names: list[str], k: int, flag: str) -> int:
    s = str(value).strip()
    lowered = [n.lower() for n in names]
    if s.lower() in lowered:
        return lowered.index(s.lower())
    try:
        i = int(s)
    except ValueError:
        raise CLIError(
            f"{flag} {value!r} is not a class index or name; classes: "
            + ", ".join(f"{j}={n}" for j, n in enumerate(names or [str(j) for j in range(k)]))
        ) from None
    if not 0 <= i < k:
        raise CLIError(f"{flag} {i} is out of range; the model has {k} classes (0..{k - 1})")
    return i


def _attack_class(name: str) -> type:
    from medrobust.attacks import ATTACKS, FixedBudgetAttack

    key = str(name).lower().replace("-", "").replace("_", "")
    if key not in ATTACKS:
        raise CLIError(f"unknown attack {name!r}; expected one of {', '.join(sorted(ATTACKS))}")
    cls = ATTACKS[key]
    if not issubclass(cls, FixedBudgetAttack):
        fixed = sorted(k for k, c in ATTACKS.items() if issubclass(c, FixedBudgetAttack))
        raise CLIError(
            f"attack {name!r} is a minimum-norm attack without a budget; --eps needs one of "
            + ", ".join(fixed)
        )
    return cls


def _build_attack(cls: type, name: str, eps: float, norm: str, steps: int | None,
                  seed: int, loss: str = "ce") -> Any:
    params = inspect.signature(cls).parameters
    kwargs: dict[str, Any] = {"eps": eps, "norm": norm}
    if loss != "ce":
        if "loss" not in params:
            raise CLIError(f"attack {name!r} takes no --loss")
        kwargs["loss"] = loss
    if steps is not None:
        if "steps" not in params:
            raise CLIError(f"attack {name!r} takes no --steps (it is single-step)")
        if steps < 1:
            raise CLIError(f"--steps must be a positive integer; got {steps}")
        kwargs["steps"] = steps
    if "seed" in params:
        kwargs["seed"] = seed
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise CLIError(f"attack {name!r}: {err}") from None


def default_figure_path(out: Path) -> Path:
    """``adv.dcm`` -> ``adv_compare.png``; ``adv.nii.gz`` -> ``adv_compare.png``."""
    name = out.name
    for ending in (".nii.gz", ".nii", ".dcm", ".dicom", ".png", ".npy"):
        if name.lower().endswith(ending):
            name = name[: -len(ending)]
            break
    else:
        name = out.stem
    return out.with_name(f"{name}_compare.png")


def _check_output(path: Path, overwrite: bool, what: str, folder: bool = False) -> None:
    from medrobust._files import few, file_written_by_medrobust, foreign_files, read_manifest

    if path.is_dir() and not folder:
        raise CLIError(f"{what} {path} is a folder; give a file name")
    if path.is_symlink():
        raise CLIError(f"{what} {path} is a symbolic link; give another name")
    if path.exists() and not overwrite:
        raise CLIError(f"{what} {path} exists; use --overwrite to replace it")
    if path.exists() and overwrite:
        if path.is_dir():
            foreign = foreign_files(path)
            if foreign or (any(path.iterdir()) and not read_manifest(path)):
                raise CLIError(
                    f"{what} {path} holds files medrobust did not write (or that changed since): "
                    f"{few(foreign) or 'no manifest'}; it is never replaced, even with "
                    "--overwrite: choose another name or remove it yourself"
                )
        elif not file_written_by_medrobust(path):
            raise CLIError(
                f"{what} {path} exists and was not written by medrobust (or changed since); it "
                "is never replaced, even with --overwrite: choose another name or remove it "
                "yourself"
            )
    parent = path.parent
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise CLIError(f"cannot write {what} {path}: {probe} is not a writable folder")


def _probabilities(clf: Any, x: torch.Tensor) -> torch.Tensor:
    with clf.attack_mode():
        return torch.softmax(clf.logits(x).double(), dim=1)[0].cpu()


def _norms(delta: np.ndarray) -> dict[str, float]:
    d = np.asarray(delta, dtype=np.float64).ravel()
    return {
        "linf": float(np.max(np.abs(d))) if d.size else 0.0,
        "l2": float(np.sqrt(np.sum(d * d))),
        "l1": float(np.sum(np.abs(d))),
        "changed": int(np.count_nonzero(d)),
        "changed_fraction": float(np.count_nonzero(d) / max(d.size, 1)),
    }


def _display_range(loaded: Any, values: np.ndarray, bounds: tuple[float, float]) -> tuple[
    float, float, str
]:
    """The intensity range to show: the model's window if it has one, else the data's range."""
    from medrobust.preprocessing import IntensityWindow

    pre = getattr(loaded, "preprocess", None)
    if pre is not None:
        for m in pre.modules():
            if isinstance(m, IntensityWindow):
                return float(m.lo), float(m.hi), f"window [{m.lo:g}, {m.hi:g}]"
    lo, hi = bounds
    if lo == 0.0 and hi == 1.0:
        return 0.0, 1.0, "[0, 1]"
    vmin, vmax = float(values.min()), float(values.max())
    if vmax <= vmin:
        vmax = vmin + 1.0
    return vmin, vmax, f"range [{vmin:g}, {vmax:g}]"


def _pick_slice(a: np.ndarray, d: np.ndarray, nifti: bool = False) -> tuple[
    np.ndarray, np.ndarray, str
]:
    """(C, *S) -> a 2D (H, W) or (H, W, 3) view, the slice with the largest change for volumes.

    Volumes are sliced along the first spatial axis (DICOM series, ``.npy``: slices first), or
    for NIfTI along the last one (``k``, axial in the usual RAS/LPS layouts), shown rotated so
    that ``j`` runs up the screen.
    """
    where = ""
    if nifti and a.ndim >= 3:  # (C, I, J[, K]) -> (C, K, J, I) / (C, J, I), j upwards
        a = np.flip(np.moveaxis(a, list(range(1, a.ndim)), list(range(a.ndim - 1, 0, -1))), -2)
        d = np.flip(np.moveaxis(d, list(range(1, d.ndim)), list(range(d.ndim - 1, 0, -1))), -2)
    if a.ndim == 4:  # (C, D, H, W)
        energy = np.abs(d).sum(axis=(0, 2, 3))
        k = int(np.argmax(energy)) if energy.max() > 0 else a.shape[1] // 2
        a, d = a[:, k], d[:, k]
        where = f" (slice {k} of {energy.shape[0]})"
    elif a.ndim == 2:  # (C, L): 1D signal, show as a strip
        a, d = a[:, None, :], d[:, None, :]
    if a.shape[0] == 3:
        return np.moveaxis(a, 0, -1), np.moveaxis(d, 0, -1).mean(-1), where
    return a[0], d[0], where


def write_figure(path: Path, clean: np.ndarray, adv: np.ndarray, *, lo: float, hi: float,
                 display: str, units: str, titles: tuple[str, str], note: str,
                 nifti: bool = False) -> None:
    """The side-by-side PNG: clean, amplified difference, adversarial (``(C, *S)`` arrays)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    c2, d2, where = _pick_slice(clean, adv - clean, nifti)
    a2, _, _ = _pick_slice(adv, adv - clean, nifti)
    span = float(np.max(np.abs(d2))) if d2.size else 0.0
    span = span if span > 0 else 1.0

    def show(img: np.ndarray) -> np.ndarray:
        return np.clip((img - lo) / (hi - lo), 0.0, 1.0)

    fig, axes = plt.subplots(1, 3, figsize=(11.5, 4.4), dpi=100)
    try:
        axes[0].imshow(show(c2), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        axes[0].set_title(titles[0], fontsize=10)
        im = axes[1].imshow(d2, cmap="seismic", vmin=-span, vmax=span, interpolation="nearest")
        amp = (hi - lo) / (2 * span)
        axes[1].set_title(f"difference (amplified x{amp:.3g})\nfull scale = ±{span:.4g} {units}",
                          fontsize=10)
        fig.colorbar(im, ax=axes[1], fraction=0.046, pad=0.04)
        axes[2].imshow(show(a2), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        axes[2].set_title(titles[1], fontsize=10)
        for ax in axes:
            ax.set_xticks([])
            ax.set_yticks([])
        fig.suptitle(f"{note}{where}; display {display}", fontsize=9)
        fig.tight_layout()
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)


# --------------------------------------------------------------------------- the command
def run(args: argparse.Namespace) -> int:
    """Run ``medrobust attack``; returns the exit code (errors raise :class:`CLIError`)."""
    t0 = time.perf_counter()
    from medrobust import io as mio
    from medrobust.data.errors import DataError

    # ---- arguments that need no file
    cls = _attack_class(args.attack)
    eps = parse_eps(args.eps)
    norm = str(args.norm).lower()
    if args.steps is not None and args.steps < 1:
        raise CLIError(f"--steps must be a positive integer; got {args.steps}")
    inp = Path(args.input).expanduser()
    out = Path(args.out).expanduser()
    if not inp.exists():
        raise CLIError(f"--input {inp}: file not found")
    series = inp.is_dir()  # a DICOM series: a folder of slices in, a folder out
    in_fmt = "dicom" if series else mio.format_of(inp)
    if in_fmt is None:
        raise CLIError(f"--input {inp}: unknown format; expected .dcm, .nii, .nii.gz, .png, .npy"
                       " or a folder holding one DICOM series")
    out_fmt = mio.format_of(out, sniff=False)
    if out_fmt is None and in_fmt == "dicom" and not out.suffix:
        out_fmt = "dicom"
    if series:
        if mio.format_of(out, sniff=False) is not None or out.is_file():
            raise CLIError(f"--out {out.name}: a DICOM series is written as a folder of slices;"
                           " give a folder name")
        out_fmt = "dicom"
    if out_fmt != in_fmt:
        raise CLIError(
            f"--out {out.name} must be in the input's format ({in_fmt}: "
            f"{' or '.join(mio.FORMATS[in_fmt])})"
        )
    from medrobust._files import overlaps

    if overlaps(out, inp):
        raise CLIError(
            f"--out {out} is, contains or lies inside --input {inp}; write the adversarial image "
            "elsewhere (the input is never replaced or written into)"
        )
    fig_path = Path(args.figure).expanduser() if args.figure else default_figure_path(out)
    if fig_path.suffix.lower() != ".png":
        raise CLIError(f"--figure {fig_path} must end in .png")
    if overlaps(fig_path, inp) or overlaps(fig_path, out):
        raise CLIError(f"--figure {fig_path} collides with --input/--out")
    _check_output(out, args.overwrite, "--out", folder=series)
    _check_output(fig_path, args.overwrite, "--figure")

    # ---- the model
    from medrobust.compat import MismatchError, check_eps, check_model_data, check_pixel_limit
    from medrobust.modelstore import ModelError, load_model

    try:
        loaded = load_model(args.model, trust_code=bool(args.trust_code))
    except ModelError as err:
        raise CLIError(f"--model: {err}") from None
    if loaded.classifier is None or loaded.task not in ("binary", "multi-class", "ordinal"):
        raise CLIError(f"--model {args.model}: a {loaded.task} model; attack supports "
                       "classifiers (binary, multi-class) only")
    model_units = loaded.units
    if args.units is not None and canonical_units(args.units) != canonical_units(model_units):
        raise CLIError(
            f"--units {args.units} does not match the model's units {model_units!r} "
            f"(recorded in {Path(args.model) / 'model.json'}); give the budget in {model_units}"
        )
    inp_meta = loaded.metadata.get("input") or {}
    spatial_dims = inp_meta.get("spatial_dims")
    channels = inp_meta.get("channels")

    # ---- the image: its size from the header first, then the pixels
    try:
        check_pixel_limit(mio.peek_size(inp)[0], f"--input {inp.name}")
    except (DataError, MismatchError) as err:
        raise CLIError(str(err)) from None
    try:
        image = mio.read_image(inp, units=model_units, spatial_dims=spatial_dims)
    except DataError as err:
        raise CLIError(str(err)) from None
    if image.units is not None and canonical_units(image.units) != canonical_units(model_units):
        raise CLIError(
            f"--input {inp.name} holds {image.units} values ({image.description}) but the model "
            f"takes {model_units}"
        )
    x = image.values
    shape = list(x.shape)
    if isinstance(spatial_dims, int):
        while len(shape) - 2 > spatial_dims and 1 in shape[2:]:
            shape.pop(2 + shape[2:].index(1))
        if len(shape) - 2 != spatial_dims:
            raise CLIError(
                f"--input {inp.name} is {len(x.shape) - 2}D ({image.description}) but the model "
                f"takes {spatial_dims}D inputs"
            )
    if isinstance(channels, int) and shape[1] != channels:
        raise CLIError(
            f"--input {inp.name} has {shape[1]} channel(s) but the model takes {channels}"
        )
    mlo, mhi = loaded.bounds
    rescale = None
    grid = image.grid
    clean64 = image.exact_values()
    if args.rescale is not None:
        try:
            rescale = mio.rescale_for(image, (mlo, mhi), str(args.rescale))
            grid = rescale.grid(image.grid)
        except DataError as err:
            raise CLIError(f"--rescale: {err}") from None
        clean64 = grid.exact(rescale.to_model(clean64))
        x = torch.from_numpy(clean64.astype(np.float32))
    xm = x.reshape(shape)
    xmin, xmax = float(clean64.min()), float(clean64.max())
    try:
        check_model_data(
            loaded.metadata, spatial_shape=shape[2:],
            value_range=(xmin, xmax), where=f"--input {inp.name}",
        )
    except MismatchError as err:
        hint = "" if rescale is not None or grid.float_dtype is not None else (
            " (an integer image in other units: try --rescale)")
        raise CLIError(f"{err}{hint}") from None
    try:
        check_eps(eps, norm, (mlo, mhi), int(np.prod(shape)), flag="--eps")
    except MismatchError as err:
        raise CLIError(str(err)) from None

    # ---- bounds: the model's, widened to hold the scan, within what the file can store
    rlo, rhi = grid.value_range()
    # the float32 tensor the model sees may round an extreme value outward by an ulp
    lo32, hi32 = float(xm.min()), float(xm.max())
    lo = max(min(mlo, xmin, lo32), min(rlo, lo32))
    hi = min(max(mhi, xmax, hi32), max(rhi, hi32))
    notes: list[str] = []
    if rescale is not None:
        notes.append(f"--rescale {rescale.description} ({model_units}); written back in the "
                     "file's own values")
    below, above = xmin < mlo, xmax > mhi
    if below or above:
        side = "below" if below and not above else "above" if above else "below and above"
        notes.append(
            f"the image spans [{xmin:.6g}, {xmax:.6g}], {side} the model's bounds "
            f"[{mlo:.6g}, {mhi:.6g}]; the attack keeps values within [{lo:.6g}, {hi:.6g}]"
        )
    clf = copy.copy(loaded.classifier)
    clf.bounds = (lo, hi)

    # ---- labels
    k = int(clf.num_classes or 2)
    names = loaded.class_names or [str(i) for i in range(k)]
    if len(names) != k:
        names = [str(i) for i in range(k)]
    try:
        p_clean = _probabilities(clf, xm)
    except (RuntimeError, ValueError) as err:
        raise CLIError(f"the model cannot take --input {inp.name} ({err})") from None
    k = int(p_clean.shape[0])
    if len(names) != k:
        names = [str(i) for i in range(k)]
    pred_clean = int(p_clean.argmax())
    if args.label is not None:
        label, label_source = _class_index(args.label, names, k, "--label"), "given"
    else:
        label, label_source = pred_clean, "the model's clean prediction"
    target = None
    if args.target is not None:
        target = _class_index(args.target, names, k, "--target")
        if target == label:
            raise CLIError(f"--target {names[target]} equals the label; a targeted attack needs "
                           "another class")

    # ---- attack
    attack = _build_attack(cls, args.attack, eps, norm, args.steps, int(args.seed),
                           str(args.loss))
    y = torch.tensor([label])
    t = None if target is None else torch.tensor([target])
    try:
        res = attack(clf, xm, y, target=t)
    except (ValueError, TypeError) as err:
        raise CLIError(f"the attack failed: {err}") from None
    adv = res.adversarial.detach().to(torch.float64).reshape(x.shape).numpy()
    p_adv = _probabilities(clf, res.adversarial)

    def success_of(p: torch.Tensor) -> bool:
        pred = int(p.argmax())
        return pred == target if target is not None else pred != label

    # ---- snap to the file's grid, within the budget, write to temp, re-read, verify
    written = grid.snap(clean64, adv, eps, norm, bounds=(lo, hi))
    from medrobust import __version__
    from medrobust._files import mark_file_written, mark_folder_written

    derivation = (f"medrobust {__version__} adversarial example: {attack.name} {norm} "
                  f"eps={args.eps} {model_units} (an attack changed the pixel data)")
    tmp_out: Path | None = None
    tmp_fig: Path | None = None
    created_dirs: list[Path] = []
    tmp_parent: Path | None = None
    done = False
    try:
        for parent in (out.parent, fig_path.parent):
            missing = []
            probe = parent
            while not probe.exists():
                missing.append(probe)
                probe = probe.parent
            for d in reversed(missing):
                d.mkdir()
                created_dirs.append(d)
        if series:
            tmp_parent = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp",
                                               dir=out.parent))
            tmp_out = tmp_parent / out.name
        else:
            tmp_out = mio.temp_path(out)
        to_file = written if rescale is None else rescale.to_file(written)
        mio.write_image(tmp_out, to_file, image, derivation=derivation,
                        keep_uids=bool(args.keep_uids))
        if series:
            mark_folder_written(tmp_out)
        back = mio.read_image(tmp_out, units=model_units, spatial_dims=spatial_dims)
        back64 = back.exact_values()
        if rescale is not None:
            back64 = grid.exact(rescale.to_model(back64))
        delta = back64 - clean64
        # |change| <= eps, up to the float rounding of the unit conversion: with 8-bit PNG
        # levels 8 * (1/255) may print as 1 ulp above 8/255 (relative slack 1e-9)
        within = float(_norms(delta)[norm]) <= eps * (1 + 1e-9)
        if not within or not np.array_equal(back64, written):
            raise CLIError(
                "internal check failed: the written file does not hold the snapped image "
                f"within the budget (max |change| {np.max(np.abs(delta)):g}); nothing written"
            )
        p_back = _probabilities(clf, torch.from_numpy(back64.astype(np.float32)).reshape(shape))
        still = success_of(p_back)

        # ---- figure
        lo_d, hi_d, display = _display_range(loaded, clean64, (mlo, mhi))
        pc, pa = int(p_clean.argmax()), int(p_back.argmax())
        titles = (
            f"clean: {names[pc]} (p={float(p_clean[pc]):.3f})",
            f"adversarial, as written: {names[pa]} (p={float(p_back[pa]):.3f})",
        )
        goal = f"target {names[target]}" if target is not None else f"label {names[label]}"
        note = (f"{attack.name} {norm} eps={args.eps} {model_units}, {goal}; "
                f"{'still adversarial' if still else 'NOT adversarial'} after rounding")
        tmp_fig = mio.temp_path(fig_path)
        write_figure(tmp_fig, clean64[0], back64[0], lo=lo_d, hi=hi_d, display=display,
                     units=model_units, titles=titles, note=note,
                     nifti=image.format == "nifti")

        # ---- commit: both or neither
        try:
            if series:
                mio.commit_dir(tmp_out, out, args.overwrite)
            else:
                mio.commit(tmp_out, out, args.overwrite)
        except FileExistsError:
            raise CLIError(f"--out {out} appeared while writing; use --overwrite") from None
        tmp_out = None
        if not series:
            mark_file_written(out)
        try:
            mio.commit(tmp_fig, fig_path, args.overwrite)
        except FileExistsError:
            if series:
                shutil.rmtree(out, ignore_errors=True)
            else:
                os.unlink(out)
            raise CLIError(f"--figure {fig_path} appeared while writing; use --overwrite") \
                from None
        tmp_fig = None
        mark_file_written(fig_path)
        done = True
    except DataError as err:
        raise CLIError(str(err)) from None
    except OSError as err:
        raise CLIError(f"cannot write the outputs: {err.strerror or err} "
                       f"({err.filename or out})") from None
    finally:
        for tmp in (tmp_out, tmp_fig):
            if tmp is not None and tmp.is_file():
                tmp.unlink()
        if tmp_parent is not None and tmp_parent.exists():
            shutil.rmtree(tmp_parent, ignore_errors=True)
        if not done:
            for d in reversed(created_dirs):
                if d.exists() and not any(d.iterdir()):
                    d.rmdir()

    # ---- summary
    step = grid.step
    if norm == "linf" and step > 0 and eps < step:
        notes.append(f"eps {eps:g} is below one storage step ({step:g} {model_units}): "
                     "the file cannot change")

    def pred_info(p: torch.Tensor) -> dict[str, Any]:
        i = int(p.argmax())
        return {"prediction": i, "class": names[i], "probability": float(p[i]),
                "probabilities": [float(v) for v in p]}

    summary: dict[str, Any] = {
        "input": str(inp),
        "output": str(out),
        "figure": str(fig_path),
        "format": in_fmt,
        "image": image.description,
        "model": str(args.model),
        "attack": attack.config(),
        "norm": norm,
        "eps": eps,
        "units": model_units,
        "label": label,
        "label_name": names[label],
        "label_source": label_source,
        "target": target,
        "target_name": None if target is None else names[target],
        "bounds": [lo, hi],
        "clean": pred_info(p_clean),
        "adversarial": {**pred_info(p_adv), "success": bool(res.success[0])},
        "written": {**pred_info(p_back), "success": bool(still)},
        "still_adversarial_after_rounding": bool(still),
        "norms_before_rounding": _norms(adv - clean64),
        "norms": _norms(back64 - clean64),
        "within_budget": bool(within),
        "storage": grid.description,
        "derivation": derivation,
        "keep_uids": bool(args.keep_uids),
        "storage_step": step,
        "forward_passes": res.forward_passes,
        "backward_passes": res.backward_passes,
        "notes": notes,
        "time_s": round(time.perf_counter() - t0, 3),
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(format_summary(summary))
    return 0


def format_summary(s: dict[str, Any]) -> str:
    """The human-readable summary printed by ``medrobust attack``."""
    u = s["units"]

    def pred(d: dict[str, Any]) -> str:
        return f"{d['class']} (p={d['probability']:.3f})"

    steps = s["attack"].get("steps")
    goal = (f"target {s['target_name']}" if s["target"] is not None
            else f"label {s['label_name']} ({s['label_source']})")
    n, n0 = s["norms"], s["norms_before_rounding"]
    total = n["changed"] / n["changed_fraction"] if n["changed_fraction"] else 0
    lines = [
        f"attack   {s['attack']['name']}, {s['norm']} eps={s['eps']:g} {u}"
        + (f", {steps} steps" if steps and s["attack"]["name"] != "fgsm" else "")
        + f", seed {s['attack'].get('seed')}; {goal}",
        f"input    {s['input']}  [{s['image']}]",
        f"before   {pred(s['clean'])}",
        f"after    {pred(s['adversarial'])}  success: "
        f"{'yes' if s['adversarial']['success'] else 'no'}",
        f"change   linf {n0['linf']:.4g}, l2 {n0['l2']:.4g} {u} before rounding; written: linf "
        f"{n['linf']:.4g}, l2 {n['l2']:.4g} {u}, {n['changed']} of {int(round(total))} values "
        f"changed; within eps: {'yes' if s['within_budget'] else 'NO'}",
        f"rounded  to {s['storage']}: {pred(s['written'])}  still adversarial after rounding: "
        f"{'yes' if s['still_adversarial_after_rounding'] else 'no'}",
        f"wrote    {s['output']}",
        f"         {s['figure']}",
    ]
    lines += [f"note     {m}" for m in s["notes"]]
    return "\n".join(lines)
