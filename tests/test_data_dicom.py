"""DICOM: HU on pydicom's CT_small, MR units, series volumes, write-back, windows, bad input."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

pydicom = pytest.importorskip("pydicom")
from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.pixels import apply_modality_lut  # noqa: E402

from medrobust.data import DataError, load_dataset  # noqa: E402
from medrobust.data.dicom import (  # noqa: E402
    CT_HU_RANGE,
    WINDOW_PRESETS,
    Window,
    apply_window,
    load_dicom,
    write_dicom,
)

PIXEL_DATA = 0x7FE00010


@pytest.fixture(scope="module")
def ct_path() -> Path:
    return Path(get_testdata_file("CT_small.dcm"))


@pytest.fixture(scope="module")
def mr_path() -> Path:
    return Path(get_testdata_file("MR_small.dcm"))


def _same_except_pixels(a: object, b: object) -> None:
    tags_a = {el.tag for el in a if el.tag != PIXEL_DATA}  # type: ignore[attr-defined]
    tags_b = {el.tag for el in b if el.tag != PIXEL_DATA}  # type: ignore[attr-defined]
    assert tags_a == tags_b
    for tag in tags_a:
        assert a[tag] == b[tag], tag  # type: ignore[index]
    assert a.file_meta == b.file_meta  # type: ignore[attr-defined]


def test_ct_hounsfield(ct_path: Path) -> None:
    d = load_dicom(ct_path)
    ds = pydicom.dcmread(ct_path)
    ref = apply_modality_lut(ds.pixel_array, ds)
    assert d.images.shape == (1, 1, 128, 128) and d.images.dtype == torch.float32
    assert np.array_equal(d.images[0, 0].numpy(), ref.astype(np.float32))
    assert d.units == "HU"
    assert d.bounds == CT_HU_RANGE
    lo, hi = d.bounds
    assert lo <= float(d.images.min()) and float(d.images.max()) <= hi
    # CT_small: stored 128..2191, intercept -1024
    assert float(d.images.min()) == -896.0 and float(d.images.max()) == 1167.0
    assert d.spacing == pytest.approx((0.661468, 0.661468))
    assert d.meta["modality"] == "CT" and d.meta["rescale"] == [(1.0, -1024.0)]
    assert d.labels.tolist() == [-1] and d.meta["labelled"] is False


def test_mr_units(mr_path: Path) -> None:
    d = load_dicom(mr_path, label=1, class_names=["normal", "abnormal"])
    assert d.images.shape == (1, 1, 64, 64)
    assert d.units == "MR signal (arbitrary units)"
    ds = pydicom.dcmread(mr_path)
    assert np.array_equal(d.images[0, 0].numpy(), ds.pixel_array.astype(np.float32))
    assert d.bounds == (-32768.0, 32767.0)  # int16 stored, no rescale
    assert d.labels.tolist() == [1] and d.num_classes == 2


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm"])
def test_round_trip(name: str, tmp_path: Path) -> None:
    src = Path(get_testdata_file(name))
    d = load_dicom(src)
    g = torch.Generator().manual_seed(0)
    delta = torch.empty_like(d.images).uniform_(-20, 20, generator=g)
    out = tmp_path / "adv.dcm"
    written = write_dicom(out, d.images + delta, d.meta)
    assert written == [out]
    assert [p.name for p in tmp_path.iterdir()] == ["adv.dcm"]  # no temp file left
    back = load_dicom(out)
    assert (back.images - (d.images + delta)).abs().max() <= 0.5 + 1e-4  # rounding only
    assert not torch.equal(back.images, d.images)
    _same_except_pixels(pydicom.dcmread(src), pydicom.dcmread(out))


def test_write_clips_to_stored_range(ct_path: Path, tmp_path: Path) -> None:
    d = load_dicom(ct_path)
    huge = torch.full_like(d.images, 1e9)
    write_dicom(tmp_path / "c.dcm", huge, d)
    back = load_dicom(tmp_path / "c.dcm")
    assert float(back.images.max()) == 32767 - 1024  # int16 max after the -1024 intercept


def _series(ct_path: Path, folder: Path, order: list[int]) -> None:
    base = pydicom.dcmread(ct_path)
    folder.mkdir()
    for k, z in enumerate(order):
        ds = copy.deepcopy(base)
        pos = [float(v) for v in base.ImagePositionPatient]
        ds.ImagePositionPatient = [pos[0], pos[1], pos[2] + 5.0 * z]
        ds.InstanceNumber = z + 1
        ds.PixelData = (base.pixel_array + 10 * z).astype(np.int16).tobytes()
        ds.save_as(folder / f"file{k}.dcm")
    (folder / "README.txt").write_text("not DICOM")


def test_series_volume_and_write_back(ct_path: Path, tmp_path: Path) -> None:
    folder = tmp_path / "series"
    _series(ct_path, folder, [3, 0, 2, 1])
    v = load_dicom(folder)
    assert v.images.shape == (1, 1, 4, 128, 128)
    assert v.spacing == pytest.approx((5.0, 0.661468, 0.661468))
    base = load_dicom(ct_path).images[0, 0]
    for z in range(4):  # sorted along the slice normal, not by file name
        assert torch.equal(v.images[0, 0, z], base + 10 * z)
    out = tmp_path / "out"
    files = write_dicom(out, v.images - 7, v.meta)
    assert sorted(f.name for f in files) == [f"file{k}.dcm" for k in range(4)]
    w = load_dicom(out)
    assert torch.equal(w.images, v.images - 7)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "series"]
    assert load_dataset(folder).images.shape == (1, 1, 4, 128, 128)


def test_windows() -> None:
    assert WINDOW_PRESETS["lung"] == (-600.0, 1500.0)
    assert WINDOW_PRESETS["brain"] == (40.0, 80.0)
    assert set(WINDOW_PRESETS) >= {"lung", "mediastinum", "bone", "brain", "soft_tissue"}
    hu = torch.tensor([-2000.0, -1400.0, -600.0, 200.0, 3000.0], requires_grad=True)
    y = apply_window(hu, "lung")
    assert torch.allclose(y, torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]))
    y.sum().backward()
    assert hu.grad is not None
    assert torch.allclose(hu.grad, torch.tensor([0.0, 0.0, 1 / 1500, 0.0, 0.0]))
    assert torch.allclose(apply_window(hu, 40, 400), apply_window(hu, "soft tissue"))
    assert torch.allclose(Window((50.0, 350.0))(hu), apply_window(hu, "mediastinum"))
    with pytest.raises(ValueError):
        apply_window(hu, "nosuch")
    with pytest.raises(ValueError):
        apply_window(hu, 0.0, -5.0)


# ------------------------------------------------------------------------------ bad input


def test_missing_and_not_dicom(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        load_dicom(tmp_path / "absent.dcm")
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"\x00" * 50)
    with pytest.raises(DataError, match="junk.dcm"):
        load_dicom(junk)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no DICOM"):
        load_dicom(tmp_path / "empty")


def test_truncated(ct_path: Path, tmp_path: Path) -> None:
    raw = ct_path.read_bytes()
    for cut in (len(raw) - 5000, 400):
        p = tmp_path / f"trunc{cut}.dcm"
        p.write_bytes(raw[:cut])
        with pytest.raises(DataError, match=p.name):
            load_dicom(p)


def test_no_pixel_data(ct_path: Path, tmp_path: Path) -> None:
    ds = pydicom.dcmread(ct_path)
    del ds.PixelData
    p = tmp_path / "nopix.dcm"
    ds.save_as(p)
    with pytest.raises(DataError, match="no pixel data") as err:
        load_dicom(p)
    assert "nopix.dcm" in str(err.value)


def test_write_rejects_nan_and_wrong_shape(ct_path: Path, tmp_path: Path) -> None:
    d = load_dicom(ct_path)
    bad = d.images.clone()
    bad[0, 0, 3, 3] = float("nan")
    with pytest.raises(DataError, match="NaN"):
        write_dicom(tmp_path / "n.dcm", bad, d.meta)
    with pytest.raises(DataError, match="does not fit"):
        write_dicom(tmp_path / "s.dcm", torch.zeros(1, 1, 64, 64), d.meta)
    with pytest.raises(DataError, match="template"):
        write_dicom(tmp_path / "m.dcm", d.images, {"nothing": 1})
    assert list(tmp_path.iterdir()) == []
