"""``medrobust attack`` end to end: a model trained here on HU phantoms (CT window inside the model
folder) attacks pydicom's ``CT_small.dcm`` and the same slice as NIfTI, PNG and ``.npy``; every
written file is re-read independently (pydicom, nibabel, Pillow, numpy) and checked: everything but
the pixels unchanged, the original storage type, ``|change| <= eps`` after rounding, and the
reported still-adversarial flag equal to a fresh evaluation of the written file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pydicom = pytest.importorskip("pydicom")
nib = pytest.importorskip("nibabel")

from PIL import Image, PngImagePlugin  # noqa: E402

from medrobust.cli import main  # noqa: E402
from medrobust.io import Grid  # noqa: E402
from medrobust.modelstore import load_model, save_model  # noqa: E402

EPS_HU = 20.0
WINDOW = (40.0, 400.0)  # soft-tissue window, centre / width in HU


def _ct_small() -> Path:
    from pydicom.data import get_testdata_file

    return Path(get_testdata_file("CT_small.dcm"))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One small CNN trained on 32-px HU phantoms, saved twice: with a CT window (HU model) and
    without it (a [0, 1] model for windowed PNGs)."""
    from medrobust.data.phantoms import make_phantoms
    from medrobust.nets import build_network
    from medrobust.preprocessing import Compose, IntensityWindow, Resize
    from medrobust.training import train

    root = tmp_path_factory.mktemp("attack_models")
    kw = dict(lesion_contrast=200.0, lesion_radius=(0.1, 0.2), lesion_polarity="dark")
    tr = make_phantoms(256, 32, units="HU", split="train", seed=0, **kw)  # type: ignore[arg-type]
    va = make_phantoms(64, 32, units="HU", split="val", seed=0, **kw)  # type: ignore[arg-type]
    pre = Compose([IntensityWindow(center=WINDOW[0], width=WINDOW[1]), Resize([32, 32])])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: one thread is faster on a busy machine
    try:
        net = build_network("smallcnn", in_channels=1, num_classes=2, spatial_dims=2, width=8)
        res = train(net, tr, va, epochs=6, batch_size=16, lr=3e-3, seed=0, preprocess=pre,
                    progress=False, schedule="none")
    finally:
        torch.set_num_threads(threads)
    hu = save_model(root / "ct-hu", res.module, bounds=tr.bounds, units="HU", preprocess=pre,
                    class_names=tr.class_names)
    unit = save_model(root / "ct-intensity", res.module, bounds=(0.0, 1.0), units="intensity",
                      preprocess=Resize([32, 32]), class_names=tr.class_names)
    return {"hu": Path(hu), "intensity": Path(unit)}


def _run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "medrobust.cli", "attack", *map(str, args)],
        capture_output=True, text=True, timeout=300, env=env,
    )


def _attack_json(model: Path, inp: Path, out: Path, eps: str, units: str,
                 *extra: str) -> dict:
    r = _run("--model", model, "--input", inp, "--out", out, "--attack", "pgd", "--eps", eps,
             "--units", units, "--steps", "10", "--json", *extra)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert Path(summary["figure"]).is_file()
    with Image.open(summary["figure"]) as fig:
        assert fig.size[0] > 300 and fig.size[1] > 100
    return summary


def _predict(model: Path, values: np.ndarray) -> int:
    """The saved model's prediction on an image (H, W) in its units, evaluated from scratch."""
    clf = load_model(model).classifier
    assert clf is not None
    x = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(
        1, 1, *values.shape[-2:])
    return int(clf.predict(x)[0])


def _check_flag(summary: dict, model: Path, written: np.ndarray, clean: np.ndarray) -> None:
    label = summary["label"]
    assert label == summary["clean"]["prediction"] == _predict(model, clean)
    pred = _predict(model, written)
    assert summary["written"]["prediction"] == pred
    assert summary["still_adversarial_after_rounding"] is (pred != label)
    assert summary["within_budget"] is True


def test_dicom_roundtrip(models: dict[str, Path], tmp_path: Path) -> None:
    src = _ct_small()
    out = tmp_path / "adv.dcm"
    s = _attack_json(models["hu"], src, out, str(EPS_HU), "HU")
    assert Path(s["figure"]) == tmp_path / "adv_compare.png"
    orig = pydicom.dcmread(src)
    new = pydicom.dcmread(out)
    # a derived image with its own identity (see test_trust_outputs.py for every detail) ...
    derived = {"SOPInstanceUID", "SeriesInstanceUID", "ImageType", "DerivationDescription",
               "SourceImageSequence"}
    assert set(new.keys()) - set(orig.keys()) == {
        pydicom.datadict.tag_for_keyword(k) for k in ("DerivationDescription",
                                                      "SourceImageSequence")}
    assert new.SOPInstanceUID != orig.SOPInstanceUID
    assert new.SourceImageSequence[0].ReferencedSOPInstanceUID == orig.SOPInstanceUID
    # ... and every other element but the pixel data unchanged (file meta included)
    for elem in orig:
        if elem.tag == 0x7FE00010 or elem.keyword in derived:
            continue
        assert new[elem.tag] == elem, f"{elem.tag} {elem.keyword} changed"
    for elem in orig.file_meta:
        if elem.keyword == "FileMetaInformationGroupLength":
            continue  # the group's length follows the new, longer UID
        if elem.keyword == "MediaStorageSOPInstanceUID":
            assert new.file_meta[elem.tag].value == new.SOPInstanceUID
            continue
        assert new.file_meta[elem.tag].value == elem.value, f"file meta {elem.keyword} changed"
    # the original storage type, and |change| <= eps in HU after rounding
    a0, a1 = orig.pixel_array, new.pixel_array
    assert a1.dtype == a0.dtype and a1.shape == a0.shape
    assert len(new.PixelData) == len(orig.PixelData)
    slope, inter = float(orig.RescaleSlope), float(orig.RescaleIntercept)
    hu0 = a0.astype(np.float64) * slope + inter
    hu1 = a1.astype(np.float64) * slope + inter
    change = np.abs(hu1 - hu0)
    assert change.max() <= EPS_HU
    assert change.max() > 0
    assert s["norms"]["linf"] == pytest.approx(change.max())
    _check_flag(s, models["hu"], hu1, hu0)


def test_nifti_roundtrip(models: dict[str, Path], tmp_path: Path) -> None:
    ds = pydicom.dcmread(_ct_small())
    hu = (ds.pixel_array.astype(np.int32) * int(ds.RescaleSlope) + int(ds.RescaleIntercept))
    affine = np.array([[0.66, 0, 0, -40.0], [0, 0.66, 0, 12.5], [0, 0, 5.0, 70.0], [0, 0, 0, 1]])
    img = nib.Nifti1Image(hu.astype(np.int16)[:, :, None], affine)
    img.header["descrip"] = b"medrobust test slice"
    img.header.set_xyzt_units("mm", "sec")
    src = tmp_path / "slice.nii.gz"
    nib.save(img, src)
    out = tmp_path / "adv.nii.gz"
    s = _attack_json(models["hu"], src, out, str(EPS_HU), "hu")  # units are case-insensitive
    a = nib.load(src)
    b = nib.load(out)
    np.testing.assert_array_equal(b.affine, a.affine)
    assert b.get_data_dtype() == np.int16
    assert b.shape == a.shape
    for key in ("pixdim", "qform_code", "sform_code", "xyzt_units", "dim"):
        np.testing.assert_array_equal(b.header[key], a.header[key])
    assert b.header["descrip"].item().startswith(b"medrobust 0.1.0 adversarial example: pgd")
    v0 = np.asarray(a.dataobj, dtype=np.float64)[:, :, 0]
    v1 = np.asarray(b.dataobj, dtype=np.float64)[:, :, 0]
    assert np.abs(v1 - v0).max() <= EPS_HU
    _check_flag(s, models["hu"], v1, v0)


def test_png_roundtrip(models: dict[str, Path], tmp_path: Path) -> None:
    ds = pydicom.dcmread(_ct_small())
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    lo = WINDOW[0] - WINDOW[1] / 2
    levels = np.clip(np.rint((hu - lo) / WINDOW[1] * 255), 0, 255).astype(np.uint8)
    src = tmp_path / "slice.png"
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "CT_small, soft-tissue window")
    Image.fromarray(levels, mode="L").save(src, pnginfo=info)
    out = tmp_path / "adv.png"
    s = _attack_json(models["intensity"], src, out, "8/255", "intensity")
    with Image.open(out) as im:
        assert im.mode == "L"
        assert im.info.get("Comment") == "CT_small, soft-tissue window"
        new = np.asarray(im)
    assert new.dtype == np.uint8 and new.shape == levels.shape
    assert np.abs(new.astype(int) - levels.astype(int)).max() <= 8
    _check_flag(s, models["intensity"], new / 255.0, levels / 255.0)


def test_npy_roundtrip_and_overwrite(models: dict[str, Path], tmp_path: Path) -> None:
    ds = pydicom.dcmread(_ct_small())
    hu = (ds.pixel_array.astype(np.int32) + int(ds.RescaleIntercept)).astype(np.int16)
    src = tmp_path / "slice.npy"
    np.save(src, hu)
    out = tmp_path / "adv.npy"
    other = ["normal", "lesion"][1 - _predict(models["hu"], hu.astype(np.float64))]
    s = _attack_json(models["hu"], src, out, "5", "HU", "--target", other)
    new = np.load(out)
    assert new.dtype == np.int16 and new.shape == hu.shape
    assert np.abs(new.astype(int) - hu.astype(int)).max() <= 5
    clf_pred = _predict(models["hu"], new.astype(np.float64))
    assert s["target_name"] == other
    assert s["still_adversarial_after_rounding"] is (clf_pred == s["target"])
    # an existing output is kept without --overwrite, replaced with it (in-process: no import)
    before = out.read_bytes()
    argv = ["attack", "--model", str(models["hu"]), "--input", str(src), "--out", str(out),
            "--eps", "5", "--units", "HU", "--steps", "2", "--seed", "1"]
    assert main(argv) == 2
    assert out.read_bytes() == before
    assert main(argv + ["--overwrite"]) == 0
    assert np.abs(np.load(out).astype(int) - hu.astype(int)).max() <= 5
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".medrobust-written.json", "adv.npy", "adv_compare.png", "slice.npy"]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"--attack": "nosuch"}, "unknown attack"),
        ({"--units": "intensity"}, "does not match the model's units"),
        ({"--input": "missing.dcm"}, "not found"),
        ({"--eps": "8/0"}, "--eps"),
        ({"--out": "adv.png"}, "input's format"),
        ({"--label": "tumour"}, "not a class index or name"),
        ({"--attack": "fgsm", "--steps": "3"}, "takes no --steps"),
    ],
)
def test_bad_input(models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
                   change: dict[str, str], message: str) -> None:
    args = {"--model": str(models["hu"]), "--input": str(_ct_small()),
            "--out": str(tmp_path / "adv.dcm"), "--attack": "pgd", "--eps": "5", "--units": "HU"}
    args.update({k: (str(tmp_path / v) if k in ("--input", "--out") else v)
                 for k, v in change.items()})
    argv = ["attack"] + [a for kv in args.items() for a in kv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert err.startswith("medrobust attack: error:")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing half-written


def test_bad_input_subprocess_one_line(models: dict[str, Path], tmp_path: Path) -> None:
    r = _run("--model", models["hu"], "--input", _ct_small(), "--out", tmp_path / "a.dcm",
             "--eps", "5", "--units", "intensity")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())


def test_grid_snap_guarantees() -> None:
    g = torch.Generator().manual_seed(0)
    clean_int = torch.randint(-50, 50, (400,), generator=g).double().numpy()
    adv = clean_int + (torch.rand(400, generator=g).double().numpy() - 0.5) * 7.3
    # integer storage with a slope of 0.5: a linf budget of 1.3 allows 2 steps (1.0)
    grid = Grid(slope=0.5, intercept=-10.0, stored_min=-1000, stored_max=1000)
    c = clean_int * 0.5 - 10.0
    a = c + (adv - clean_int) * 0.5
    out = grid.snap(c, a, 1.3, "linf")
    assert np.abs(out - c).max() <= 1.0 + 1e-12
    assert np.allclose(((out + 10.0) / 0.5) % 1, 0)
    for norm in ("l2", "l1"):
        d = a - c
        scale = 3.0 / (np.sqrt((d * d).sum()) if norm == "l2" else np.abs(d).sum())
        out = grid.snap(c, c + d * scale, 3.0, norm)
        n = np.sqrt(((out - c) ** 2).sum()) if norm == "l2" else np.abs(out - c).sum()
        assert n <= 3.0
    # bounds are respected on the grid
    out = grid.snap(c, c + 5, 5.0, "linf", bounds=(-60.0, c.max()))
    assert out.max() <= c.max()
    # float storage: the float32 value written never exceeds the budget
    fg = Grid(float_dtype=np.dtype("float32"))
    c32 = (np.linspace(-3, 3, 1000) * np.pi).astype(np.float32).astype(np.float64)
    out = fg.snap(c32, c32 + 0.1, 0.1, "linf")
    assert (np.abs(out.astype(np.float32).astype(np.float64) - c32) <= 0.1).all()


def test_dicom_series_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A folder of slices (each with its own rescale intercept) is attacked as one volume by a 3D
    model and written as a new folder of slices: elements kept, int16, |change| <= eps in HU."""
    from pydicom.uid import generate_uid

    from medrobust.nets import build_network

    src = pydicom.dcmread(_ct_small())
    series = tmp_path / "series"
    series.mkdir()
    for i in range(3):
        ds = src.copy()
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [-158.0, -179.0, -75.0 + 5.0 * i]
        ds.SOPInstanceUID = generate_uid()
        ds.RescaleIntercept = -1024 if i % 2 == 0 else -1000
        ds.save_as(series / f"s{2 - i}.dcm")  # file names in reverse slice order
    torch.manual_seed(0)
    net = build_network("smallcnn", in_channels=1, num_classes=2, spatial_dims=3, width=4)
    model = save_model(tmp_path / "m3d", net, bounds=(-1024.0, 3071.0), units="HU",
                       mean=[40.0], std=[400.0], class_names=["normal", "lesion"])
    out = tmp_path / "adv-series"
    argv = ["attack", "--model", str(model), "--input", str(series), "--out", str(out),
            "--eps", "10", "--units", "HU", "--steps", "2", "--json"]
    assert main(argv) == 0
    s = json.loads(capsys.readouterr().out)
    assert sorted(p.name for p in out.iterdir()) == [
        ".medrobust-written.json", "s0.dcm", "s1.dcm", "s2.dcm"]
    series_uids = set()
    vols = []
    for name in ("s2.dcm", "s1.dcm", "s0.dcm"):  # slice order along the normal
        a, b = pydicom.dcmread(series / name), pydicom.dcmread(out / name)
        # a derived series: one new Series UID for all its slices, new SOP UIDs
        assert b.SOPInstanceUID != a.SOPInstanceUID and b.SeriesInstanceUID != a.SeriesInstanceUID
        assert b.file_meta.MediaStorageSOPInstanceUID == b.SOPInstanceUID
        assert b.SourceImageSequence[0].ReferencedSOPInstanceUID == a.SOPInstanceUID
        series_uids.add(b.SeriesInstanceUID)
        for elem in a:
            if elem.tag != 0x7FE00010 and elem.keyword not in (
                    "SOPInstanceUID", "SeriesInstanceUID", "ImageType"):
                assert b[elem.tag] == elem
        assert b.pixel_array.dtype == a.pixel_array.dtype
        ha = a.pixel_array * 1.0 + float(a.RescaleIntercept)
        hb = b.pixel_array * 1.0 + float(b.RescaleIntercept)
        assert np.abs(hb - ha).max() <= 10
        vols.append(hb)
    clf = load_model(model).classifier
    assert clf is not None
    assert len(series_uids) == 1
    x = torch.from_numpy(np.stack(vols)).float().reshape(1, 1, 3, 128, 128)
    pred = int(clf.predict(x)[0])
    assert s["written"]["prediction"] == pred
    assert s["still_adversarial_after_rounding"] is (pred != s["label"])
    # the folder is not replaced without --overwrite
    assert main(argv) == 2
    assert "exists" in capsys.readouterr().err


def test_model_that_does_not_match_the_image(models: dict[str, Path], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    rgb = tmp_path / "rgb.png"
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(rgb)
    base = ["attack", "--model", str(models["intensity"]), "--out", str(tmp_path / "a.png"),
            "--eps", "2/255", "--units", "intensity"]
    assert main(base + ["--input", str(rgb)]) == 2
    assert "3 channel(s) but the model takes 1" in capsys.readouterr().err
    # a PNG holds [0, 1] intensities; an HU model cannot take it
    base[2] = str(models["hu"])
    base[base.index("intensity")] = "HU"
    gray = tmp_path / "gray.png"
    Image.fromarray(np.zeros((16, 16), dtype=np.uint8)).save(gray)
    assert main(base + ["--input", str(gray), "--eps", "5"]) == 2
    assert "holds intensity values" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gray.png", "rgb.png"]
