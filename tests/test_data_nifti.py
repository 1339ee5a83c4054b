"""NIfTI: affine and header kept, write-back, MSD hippocampus pairs, bad input."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

nib = pytest.importorskip("nibabel")
from nibabel.testing import data_path  # noqa: E402

from medrobust.data import DataError, load_dataset  # noqa: E402
from medrobust.data.nifti import (  # noqa: E402
    fit_shape,
    iter_msd,
    load_msd,
    load_nifti,
    msd_cases,
    write_nifti,
)

ANATOMICAL = Path(data_path) / "anatomical.nii"
EXAMPLE4D = Path(data_path) / "example4d.nii.gz"


@pytest.fixture
def hippo(data_dir: Path) -> Path:
    root = data_dir / "Task04_Hippocampus"
    if not (root / "dataset.json").is_file():
        pytest.skip(f"{root} not found")
    return root


def test_volume_affine_header() -> None:
    d = load_nifti(ANATOMICAL)
    ref = nib.load(str(ANATOMICAL))
    assert d.images.shape == (1, 1, 33, 41, 25) and d.images.dtype == torch.float32
    assert np.array_equal(d.images[0, 0].numpy(), np.asarray(ref.dataobj, dtype=np.float32))
    assert np.array_equal(d.meta["affine"], ref.affine)
    assert d.spacing == (2.0, 2.0, 2.0)
    assert d.bounds == (float(d.images.min()), float(d.images.max()))
    assert d.meta["on_disk_dtype"] == np.dtype(">i2").str


def test_4d_as_channels() -> None:
    d = load_nifti(EXAMPLE4D)
    assert d.images.shape == (1, 2, 128, 96, 24)
    raw = np.asarray(nib.load(str(EXAMPLE4D)).dataobj, dtype=np.float32)
    assert np.array_equal(d.images[0, 1].numpy(), raw[..., 1])


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_write_round_trip(tmp_path: Path, suffix: str) -> None:
    d = load_nifti(ANATOMICAL, units="MR signal (arbitrary units)")
    delta = torch.randn(d.images.shape, generator=torch.Generator().manual_seed(1)) * 5
    out = tmp_path / f"adv{suffix}"
    assert write_nifti(out, d.images + delta, d.meta) == out
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # nothing else left
    back = load_nifti(out)
    assert np.array_equal(back.meta["affine"], d.meta["affine"])
    assert back.meta["on_disk_dtype"] == d.meta["on_disk_dtype"]
    assert (back.images - (d.images + delta)).abs().max() <= 0.5 + 1e-3  # int16 rounding
    exact = write_nifti(tmp_path / f"f{suffix}", d.images + delta, d, dtype="float32")
    assert torch.allclose(load_nifti(exact).images, d.images + delta)
    hdr_a, hdr_b = nib.load(str(ANATOMICAL)).header, nib.load(str(out)).header
    for key in ("dim", "pixdim", "qform_code", "sform_code", "srow_x", "srow_y", "srow_z"):
        assert np.array_equal(hdr_a[key], hdr_b[key]), key


def test_hippocampus_pairs(hippo: Path) -> None:
    pairs, desc = msd_cases(hippo)
    assert len(pairs) == 260 and desc["name"] == "Hippocampus"
    cases = list(iter_msd(hippo, limit=3))
    assert len(cases) == 3
    for c in cases:
        assert c.task == "segmentation"
        assert c.class_names == ["background", "anterior", "posterior"]
        assert c.images.shape[2:] == c.labels.shape[1:] and c.labels.dtype == torch.int64
        assert set(torch.unique(c.labels).tolist()) <= {0, 1, 2}
        assert c.units == "MR signal (arbitrary units)" and c.spacing == (1.0, 1.0, 1.0)
    d = load_msd(hippo, limit=12)
    assert d.images.shape[:2] == (12, 1) and d.labels.shape == (12, *d.images.shape[2:])
    assert d.spatial_shape == tuple(max(s[a] for s in d.meta["shapes"]) for a in range(3))
    assert set(torch.unique(d.labels).tolist()) == {0, 1, 2}
    # padding is undone exactly by fit_shape with the original shape
    for i in range(3):
        lab, _ = fit_shape(d.labels[i], d.meta["shapes"][i])
        img, _ = fit_shape(d.images[i], d.meta["shapes"][i])
        assert torch.equal(lab, cases[i].labels[0]) and torch.equal(img, cases[i].images[0])
    n = load_msd(hippo, limit=4, shape=(32, 48, 32), normalize="percentile")
    assert n.images.shape == (4, 1, 32, 48, 32) and n.bounds == (0.0, 1.0)
    assert float(n.images.min()) >= 0 and float(n.images.max()) <= 1
    assert load_dataset(hippo, limit=2).task == "segmentation"


def test_fit_shape_round_trip() -> None:
    x = torch.arange(5 * 7 * 4, dtype=torch.float32).reshape(1, 5, 7, 4)
    y, off = fit_shape(x, (10, 6, 9), value=-1)
    assert y.shape == (1, 10, 6, 9) and off == (2, 0, 2)
    z, _ = fit_shape(y, (5, 7, 4))
    assert torch.equal(z[:, :, :6], x[:, :, :6]) and z.shape == x.shape


# ------------------------------------------------------------------------------ bad input


def test_missing_corrupt_truncated(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        load_nifti(tmp_path / "absent.nii.gz")
    junk = tmp_path / "junk.nii"
    junk.write_bytes(b"nonsense" * 10)
    with pytest.raises(DataError, match="junk.nii"):
        load_nifti(junk)
    raw = gzip.compress(ANATOMICAL.read_bytes())
    trunc = tmp_path / "trunc.nii.gz"
    trunc.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="trunc.nii.gz"):
        load_nifti(trunc)
    short = tmp_path / "short.nii"
    short.write_bytes(ANATOMICAL.read_bytes()[:2000])
    with pytest.raises(DataError, match="short.nii"):
        load_nifti(short)


def test_nan_voxels(tmp_path: Path) -> None:
    arr = np.zeros((4, 5, 6), np.float32)
    arr[1, 2, 3] = np.nan
    p = tmp_path / "nan.nii.gz"
    nib.save(nib.Nifti1Image(arr, np.eye(4)), str(p))
    with pytest.raises(DataError, match="NaN") as err:
        load_nifti(p)
    assert "nan.nii.gz" in str(err.value)
    ok = load_nifti(ANATOMICAL)
    bad = ok.images.clone()
    bad[0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(DataError, match="NaN"):
        write_nifti(tmp_path / "w.nii.gz", bad, ok.meta)
    assert not (tmp_path / "w.nii.gz").exists()


def test_mask_out_of_range_and_mismatch(hippo: Path, tmp_path: Path) -> None:
    root = tmp_path / "Task"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    img_p, lab_p = msd_cases(hippo)[0][0]
    shutil.copy(img_p, root / "imagesTr" / "case_001.nii.gz")
    lab = nib.load(str(lab_p))
    data = np.asarray(lab.dataobj).astype(np.uint8)
    data[0, 0, 0] = 7
    nib.save(nib.Nifti1Image(data, lab.affine), str(root / "labelsTr" / "case_001.nii.gz"))
    desc = {"name": "t", "modality": {"0": "MRI"}, "labels": {"0": "bg", "1": "a", "2": "b"},
            "training": [{"image": "./imagesTr/case_001.nii.gz",
                          "label": "./labelsTr/case_001.nii.gz"}]}
    (root / "dataset.json").write_text(json.dumps(desc))
    with pytest.raises(DataError, match="outside the class range"):
        load_msd(root)
    nib.save(nib.Nifti1Image(data[:-1], lab.affine), str(root / "labelsTr" / "case_001.nii.gz"))
    with pytest.raises(DataError, match="differs"):
        load_msd(root)
    (root / "labelsTr" / "case_001.nii.gz").unlink()
    with pytest.raises(DataError, match="not found"):
        load_msd(root)
