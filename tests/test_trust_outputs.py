"""What ``medrobust attack`` writes (issue 8): adversarial files are recognisable as derived (DICOM
identity validated with pydicom, NIfTI ``descrip``, PNG text chunk); ``--out`` never touches the
input and ``--overwrite`` replaces only what medrobust wrote; broken DICOM inputs are refused up
front, naming the file."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

pydicom = pytest.importorskip("pydicom")
nib = pytest.importorskip("nibabel")

from PIL import Image  # noqa: E402
from pydicom.uid import UID, generate_uid  # noqa: E402

from medrobust.cli import main  # noqa: E402
from medrobust.data.dicom import load_dicom, mark_derived, write_dicom  # noqa: E402
from medrobust.modelstore import save_model  # noqa: E402
from medrobust.nets import build_network  # noqa: E402
from medrobust.preprocessing import Compose, IntensityWindow, Resize  # noqa: E402

DERIVED_KEYWORDS = ("SOPInstanceUID", "SeriesInstanceUID", "ImageType", "DerivationDescription",
                    "SourceImageSequence")


def _ct_small() -> Path:
    from pydicom.data import get_testdata_file

    return Path(get_testdata_file("CT_small.dcm"))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Untrained small CNNs (what is checked here does not need a good model): one taking HU
    (soft-tissue window and a resize in its folder), one taking [0, 1] images."""
    root = tmp_path_factory.mktemp("trust_models")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = build_network("smallcnn", in_channels=1, num_classes=2, spatial_dims=2, width=4)
        net3 = build_network("smallcnn", in_channels=1, num_classes=2, spatial_dims=3, width=4)
    hu = save_model(root / "hu", net, bounds=(-1024.0, 3071.0), units="HU",
                    preprocess=Compose([IntensityWindow(40, 400), Resize([16, 16])]),
                    class_names=["normal", "lesion"])
    unit = save_model(root / "unit", net, bounds=(0.0, 1.0), units="intensity",
                      preprocess=Resize([16, 16]), class_names=["normal", "lesion"])
    vol = save_model(root / "vol", net3, bounds=(-1024.0, 3071.0), units="HU",
                     mean=[40.0], std=[400.0], class_names=["normal", "lesion"])
    return {"hu": hu, "unit": unit, "vol": vol}


def _attack(model: Path, inp: Path, out: Path, eps: str, *extra: str) -> list[str]:
    return ["attack", "--model", str(model), "--input", str(inp), "--out", str(out),
            "--eps", eps, "--steps", "2", "--json", *extra]


# --------------------------------------------------------------------------- derived DICOM
def test_written_dicom_is_a_derived_instance(models: dict[str, Path], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "adv.dcm"
    assert main(_attack(models["hu"], _ct_small(), out, "20")) == 0
    summary = json.loads(capsys.readouterr().out)
    orig, new = pydicom.dcmread(_ct_small()), pydicom.dcmread(out)
    pydicom.dataset.validate_file_meta(new.file_meta, enforce_standard=True)
    for uid in (new.SOPInstanceUID, new.SeriesInstanceUID):
        assert UID(uid).is_valid
    assert new.SOPInstanceUID != orig.SOPInstanceUID
    assert new.SeriesInstanceUID != orig.SeriesInstanceUID
    assert new.file_meta.MediaStorageSOPInstanceUID == new.SOPInstanceUID
    assert list(new.ImageType) == ["DERIVED", "SECONDARY", *list(orig.ImageType)[2:]]
    assert new.DerivationDescription == summary["derivation"]
    assert "medrobust" in new.DerivationDescription and "pgd" in new.DerivationDescription
    assert "eps=20 HU" in new.DerivationDescription
    (src,) = new.SourceImageSequence
    assert src.ReferencedSOPInstanceUID == orig.SOPInstanceUID
    assert src.ReferencedSOPClassUID == orig.SOPClassUID
    # everything else unchanged (the file meta's group length follows the longer UID)
    for elem in orig:
        if elem.keyword not in DERIVED_KEYWORDS and elem.tag != 0x7FE00010:
            assert new[elem.tag] == elem, elem.keyword
    for elem in orig.file_meta:
        if elem.keyword not in ("MediaStorageSOPInstanceUID", "FileMetaInformationGroupLength"):
            assert new.file_meta[elem.tag].value == elem.value, elem.keyword


def test_keep_uids_keeps_the_identity(models: dict[str, Path], tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "adv.dcm"
    assert main(_attack(models["hu"], _ct_small(), out, "20", "--keep-uids")) == 0
    capsys.readouterr()
    orig, new = pydicom.dcmread(_ct_small()), pydicom.dcmread(out)
    assert new.SOPInstanceUID == orig.SOPInstanceUID
    assert new.SeriesInstanceUID == orig.SeriesInstanceUID
    assert new.file_meta.MediaStorageSOPInstanceUID == orig.file_meta.MediaStorageSOPInstanceUID
    assert "SourceImageSequence" not in new  # it would point to itself
    assert new.ImageType[0] == "DERIVED" and "medrobust" in new.DerivationDescription


def test_mark_derived_one_new_series_for_a_series() -> None:
    base = pydicom.dcmread(_ct_small())
    slices = []
    for _ in range(3):
        ds = copy.deepcopy(base)
        ds.SOPInstanceUID = generate_uid()
        slices.append(ds)
    before = [ds.SOPInstanceUID for ds in slices]
    marked = mark_derived(slices, "test")
    assert [ds.SOPInstanceUID for ds in slices] == before  # inputs untouched
    assert len({ds.SeriesInstanceUID for ds in marked}) == 1
    assert marked[0].SeriesInstanceUID != base.SeriesInstanceUID
    assert len({ds.SOPInstanceUID for ds in marked}) == 3
    assert len(set(before)) == 3
    assert [ds.SourceImageSequence[0].ReferencedSOPInstanceUID for ds in marked] == before


def test_nifti_and_png_say_they_were_changed(models: dict[str, Path], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    vol = np.linspace(-200, 300, 16 * 16, dtype=np.float32).reshape(16, 16, 1)
    nii = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(nii))
    assert main(_attack(models["hu"], nii, tmp_path / "adv.nii.gz", "10")) == 0
    capsys.readouterr()
    descrip = nib.load(str(tmp_path / "adv.nii.gz")).header["descrip"].item().decode()
    assert descrip.startswith("medrobust") and "pgd linf eps=10 HU" in descrip
    png = tmp_path / "img.png"
    Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16)).save(png)
    assert main(_attack(models["unit"], png, tmp_path / "adv2.png", "4/255")) == 0
    capsys.readouterr()
    with Image.open(tmp_path / "adv2.png") as im:
        assert "pgd linf eps=4/255 intensity" in im.info["medrobust"]


def test_compressed_dicom_written_back_uncompressed(tmp_path: Path) -> None:
    from pydicom.data import get_testdata_file

    data = load_dicom(get_testdata_file("MR_small_RLE.dcm"))
    files = write_dicom(tmp_path / "out.dcm", data.images, data.meta, derivation="test")
    back = pydicom.dcmread(files[0])
    assert not back.file_meta.TransferSyntaxUID.is_compressed
    np.testing.assert_array_equal(load_dicom(files[0]).images.numpy(), data.images.numpy())


# --------------------------------------------------------------------------- input and outputs
def _series(folder: Path, n: int = 3) -> Path:
    src = pydicom.dcmread(_ct_small())
    folder.mkdir(parents=True)
    for i in range(n):
        ds = copy.deepcopy(src)
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [-158.0, -179.0, -75.0 + 5.0 * i]
        ds.SOPInstanceUID = generate_uid()
        ds.save_as(folder / f"s{i}.dcm")
    return folder


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_out_never_is_contains_or_lies_inside_the_input(models: dict[str, Path], tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    scans = tmp_path / "scans"
    series = _series(scans / "series1")
    (scans / "notes.txt").write_text("unrelated")
    before = _snapshot(scans)
    for out in (scans, series, series / "adv", scans / "series1"):
        assert main(_attack(models["vol"], series, out, "10", "--overwrite")) == 2
        err = capsys.readouterr().err
        assert "is, contains or lies inside --input" in err, err
    one = series / "s0.dcm"
    assert main(_attack(models["hu"], one, one, "10", "--overwrite")) == 2
    assert "is, contains or lies inside --input" in capsys.readouterr().err
    assert _snapshot(scans) == before


def test_overwrite_replaces_only_files_medrobust_wrote(models: dict[str, Path], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    inp = tmp_path / "in" / "slice.npy"
    inp.parent.mkdir()
    np.save(inp, np.linspace(0, 1, 256, dtype=np.float32).reshape(16, 16))
    out = tmp_path / "out" / "adv.npy"
    out.parent.mkdir()
    out.write_bytes(b"the user's own file")
    argv = _attack(models["unit"], inp, out, "2/255", "--overwrite")
    assert main(argv) == 2
    assert "not written by medrobust" in capsys.readouterr().err
    assert out.read_bytes() == b"the user's own file"
    out.unlink()
    assert main(argv) == 0  # written, and recorded as medrobust's
    capsys.readouterr()
    assert main(argv) == 0  # so --overwrite may replace it
    capsys.readouterr()
    np.save(out, np.zeros((16, 16), dtype=np.float32))  # the user changed it since
    assert main(argv) == 2
    capsys.readouterr()
    # a series written earlier, with a file of the user's added into its folder
    series = _series(tmp_path / "series")
    adv = tmp_path / "adv-series"
    sargv = _attack(models["vol"], series, adv, "10", "--overwrite")
    assert main(sargv) == 0
    capsys.readouterr()
    assert main(sargv) == 0  # only medrobust's files in it: replaced
    capsys.readouterr()
    (adv / "report.txt").write_text("mine")
    assert main(sargv) == 2
    assert "report.txt" in capsys.readouterr().err
    assert (adv / "report.txt").read_text() == "mine"


@pytest.mark.parametrize("change, message", [
    (lambda ds: delattr(ds, "RescaleSlope"), "CT image without RescaleSlope"),
    (lambda ds: delattr(ds, "RescaleIntercept"), "CT image without RescaleIntercept"),
    (lambda ds: setattr(ds, "RescaleSlope", 0), "RescaleSlope is"),
])
def test_broken_dicom_rescale_refused_up_front(models: dict[str, Path], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str], change: object,
                                              message: str) -> None:
    ds = pydicom.dcmread(_ct_small())
    change(ds)  # type: ignore[operator]
    bad = tmp_path / "bad.dcm"
    ds.save_as(bad)
    assert main(_attack(models["hu"], bad, tmp_path / "adv.dcm", "10")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(bad) in err and message in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.dcm"]


def test_undecodable_compressed_dicom_refused_up_front(models: dict[str, Path], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGLSLossless

    ds = pydicom.dcmread(_ct_small())
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    ds.PixelData = encapsulate([b"\xff\xd8 not a real JPEG-LS stream \xff\xd9"])
    ds["PixelData"].VR = "OB"
    bad = tmp_path / "compressed.dcm"
    ds.save_as(bad, enforce_file_format=True)
    assert main(_attack(models["hu"], bad, tmp_path / "adv.dcm", "10")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(bad) in err and "cannot decode" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["compressed.dcm"]
