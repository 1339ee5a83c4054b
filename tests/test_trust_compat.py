"""A model and data that do not match (issue 8), checked up front by :mod:`medrobust.compat` in
``medrobust attack``, ``medrobust evaluate`` and :func:`medrobust.evaluate`: one line each, with
the fix. Also: budgets that contain every input, default budgets from the model's units, ``attack
--units`` / ``--rescale`` and its note about the input's range."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import medrobust as mr
from medrobust import compat
from medrobust.cli import main
from medrobust.data import load_dataset
from medrobust.evaluation.budgets import default_budgets
from medrobust.modelstore import load_model, save_model
from medrobust.nets import build_network
from medrobust.preprocessing import Resize


def _net(dims: int = 2, channels: int = 1, k: int = 2) -> torch.nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return build_network("smallcnn", in_channels=channels, num_classes=k, spatial_dims=dims,
                             width=4)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("compat_models")
    names = ["normal", "lesion"]
    return {
        # a 28-px [0, 1] model (size recorded, no resize), the same with a resize
        "px28": save_model(root / "px28", _net(), input_size=[28, 28], class_names=names),
        "resize": save_model(root / "resize", _net(), preprocess=Resize([28, 28]),
                             class_names=names),
        "vol28": save_model(root / "vol28", _net(dims=3), input_size=[28, 28, 28],
                            class_names=names),
        "hu": save_model(root / "hu", _net(), bounds=(-1024.0, 3071.0), units="HU",
                         mean=[40.0], std=[400.0], input_size=[16, 16], class_names=names),
        "pneu": save_model(root / "pneu", _net(), input_size=[16, 16],
                           class_names=["normal", "pneumonia"]),
        "u16": save_model(root / "u16", _net(), input_size=[16, 16], class_names=names),
    }


def _err(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def _attack(model: Path, inp: Path, tmp: Path, eps: str = "2/255", *extra: str) -> list[str]:
    out = tmp / f"adv{''.join(inp.suffixes)}"
    return ["attack", "--model", str(model), "--input", str(inp), "--out", str(out),
            "--eps", eps, "--steps", "1", "--json", *extra]


# --------------------------------------------------------------------------- input size
def test_input_size_recorded_in_the_folder(models: dict[str, Path], tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "big.png"
    Image.fromarray(np.full((64, 64), 100, dtype=np.uint8)).save(png)
    assert main(_attack(models["px28"], png, tmp_path)) == 2
    err = _err(capsys)
    assert "takes 28x28 inputs but --input big.png is 64x64" in err and "resize" in err
    vol = tmp_path / "vol.npy"
    np.save(vol, np.full((35, 51, 35), 0.5, dtype=np.float32))
    assert main(_attack(models["vol28"], vol, tmp_path)) == 2
    assert "takes 28x28x28 inputs but --input vol.npy is 35x51x35" in _err(capsys)
    # a folder that declares a resize: the resize applies
    assert main(_attack(models["resize"], png, tmp_path)) == 0
    assert json.loads(capsys.readouterr().out)["within_budget"] is True


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims width x height gray pixels, with (almost) no pixel data: only a
    reader that goes beyond the header would notice."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                     + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


def test_pixel_limit_from_the_header(models: dict[str, Path], tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    huge = tmp_path / "huge.png"
    _png_header_only(huge, 12000, 12000)  # 144 M pixels: GBs as float, if it were read

    def never(*a: object, **k: object) -> None:
        raise AssertionError("the image was read")

    monkeypatch.setattr("medrobust.io.read_image", never)
    assert main(_attack(models["resize"], huge, tmp_path)) == 2
    err = _err(capsys)
    assert "huge.png holds 144,000,000 values, over the limit of 134,217,728" in err
    assert not (tmp_path / "adv.png").exists()


# --------------------------------------------------------------------------- units and values
def test_units_mismatch(models: dict[str, Path], tmp_path: Path,
                        capsys: pytest.CaptureFixture[str]) -> None:
    # [0, 1] values on a model that takes HU
    x01 = tmp_path / "x01.npy"
    np.save(x01, np.linspace(0, 1, 256, dtype=np.float32).reshape(16, 16))
    assert main(_attack(models["hu"], x01, tmp_path, "5")) == 2
    err = _err(capsys)
    assert "takes HU in [-1024, 3071] but --input x01.npy lies in [0, 1]" in err
    # HU values on a [0, 1] model
    xhu = tmp_path / "xhu.npy"
    np.save(xhu, np.linspace(-1000, 1500, 256, dtype=np.float32).reshape(16, 16))
    assert main(_attack(models["u16"], xhu, tmp_path)) == 2
    assert "far outside the model's bounds [0, 1]" in _err(capsys)
    # units given that differ from the model's
    assert main(_attack(models["u16"], x01, tmp_path, "2/255", "--units", "HU")) == 2
    assert "does not match the model's units" in _err(capsys)
    # evaluate: [0, 1] phantoms on the HU model (the CLI and the Python API)
    assert main(["evaluate", "--model", str(models["hu"]), "--data", "phantom-16", "--limit",
                 "4", "--out", str(tmp_path / "ev"), "--quiet"]) == 2
    assert "the model takes inputs in HU but the data is in intensity" in _err(capsys)


def test_class_names_and_counts(models: dict[str, Path], tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    # a PneumoniaMNIST model's classes on data with other classes: never relabelled silently
    assert main(["evaluate", "--model", str(models["pneu"]), "--data", "phantom-16", "--limit",
                 "4", "--out", str(tmp_path / "ev"), "--quiet"]) == 2
    err = _err(capsys)
    assert "classes (normal, pneumonia) differ from the data's (normal, lesion)" in err
    data = load_dataset("phantom-16", split="test", n=4)
    with pytest.raises(ValueError, match=r"classes \(normal, pneumonia\) differ"):
        mr.evaluate(load_model(models["pneu"]), data, attacks="fgsm", eps=[0.01])
    with pytest.raises(ValueError, match=r"classes \(normal, pneumonia\) differ"):
        mr.evaluate(models["pneu"], data, attacks="fgsm", eps=[0.01])  # a folder's path
    meta = load_model(models["u16"]).metadata
    with pytest.raises(compat.MismatchError, match="the model has 2 classes but the data has 5"):
        compat.check_model_data(meta, class_names=[str(i) for i in range(5)])
    with pytest.raises(compat.MismatchError, match="has 3 channel.*convert the images to gray"):
        compat.check_model_data(meta, channels=3)
    compat.check_model_data(meta, class_names=["0", "1"], channels=1)  # index names: fine


def test_real_data_mismatch(models: dict[str, Path], data_dir: Path,
                            monkeypatch: pytest.MonkeyPatch) -> None:
    # PneumoniaMNIST's class names on BreastMNIST (today: results labelled normal / pneumonia)
    monkeypatch.setenv("MEDROBUST_DATA", str(data_dir))
    breast = load_dataset("breastmnist", split="test", limit=4)
    meta = dict(load_model(models["pneu"]).metadata)
    meta["input"] = {**meta["input"], "size": [28, 28]}
    with pytest.raises(compat.MismatchError, match=r"differ from the data's \(malignant"):
        compat.check_evaluation(type("M", (), {"metadata": meta})(), breast)


# --------------------------------------------------------------------------- budgets
def test_eps_that_contains_every_input_is_an_error(models: dict[str, Path], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    x = tmp_path / "x.npy"
    np.save(x, np.linspace(0, 1, 256, dtype=np.float32).reshape(16, 16))
    assert main(_attack(models["u16"], x, tmp_path, "1")) == 2
    assert "--eps 1 is at or above 1, the linf size of the whole input range [0, 1]" in _err(
        capsys)
    assert main(_attack(models["u16"], x, tmp_path, "16.5", "--norm", "l2")) == 2
    assert "above 16, the l2 size" in _err(capsys)  # sqrt(256) * span
    assert main(_attack(models["u16"], x, tmp_path, "16", "--norm", "l2")) == 0  # at the limit
    capsys.readouterr()
    assert main(["evaluate", "--model", str(models["u16"]), "--data", "phantom-16", "--limit",
                 "4", "--eps", "0,2", "--out", str(tmp_path / "ev"), "--quiet"]) == 2
    assert "--eps 2 is at or above 1" in _err(capsys)
    with pytest.raises(compat.MismatchError):
        compat.check_eps(300.0, "l1", (0.0, 1.0), 256)
    compat.check_eps(256.0, "l1", (0.0, 1.0), 256)


def test_default_budgets_follow_the_units(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    hu = default_budgets((-1024.0, 3071.0), "linf", "HU")
    assert [b.value for b in hu] == [0, 1, 2, 4, 8, 16]
    assert [b.label for b in default_budgets((0.0, 1.0), "linf")] == [
        "0", "1/255", "2/255", "4/255", "8/255"]
    # evaluate without --eps on a model taking HU: budgets in HU, not 0.5/255 HU
    data = load_dataset("phantom-ct", split="train", n=64, size=16)
    model = save_model(tmp_path / "ct", _net(), bounds=data.bounds, units="HU", mean=[40.0],
                       std=[400.0], class_names=data.class_names)
    assert main(["evaluate", "--model", str(model), "--data", "phantom-ct", "--limit", "4",
                 "--attacks", "fgsm", "--out", str(tmp_path / "ev"), "--quiet",
                 "--gallery", "0"]) in (0,), capsys.readouterr().err
    res = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert res["config"]["eps_labels"] == ["0", "1", "2", "4", "8", "16"]


# --------------------------------------------------------------------------- --units, --rescale
def test_rescale_uint8_npy_and_raw_mr_nifti(models: dict[str, Path], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    nib = pytest.importorskip("nibabel")
    levels = (np.arange(256).reshape(16, 16) % 251).astype(np.uint8)  # as MedMNIST stores them
    raw = tmp_path / "raw.npy"
    np.save(raw, levels)
    assert main(_attack(models["u16"], raw, tmp_path, "4/255")) == 2
    assert "try --rescale" in _err(capsys)
    assert main(_attack(models["u16"], raw, tmp_path, "4/255", "--rescale")) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["units"] == "intensity"  # --units defaulted to the model's
    written = np.load(tmp_path / "adv.npy")
    assert written.dtype == np.uint8 and written.shape == levels.shape
    assert np.abs(written.astype(int) - levels.astype(int)).max() <= 4  # 4/255 = 4 levels
    assert any("rescale dtype: [0, 255] -> [0, 1]" in n for n in s["notes"])
    # a raw MR volume slice, int16 signal 0..800: minmax onto [0, 1]
    mr_raw = (np.arange(256).reshape(16, 16, 1) * 800 // 255).astype(np.int16)
    nii = tmp_path / "mr.nii.gz"
    nib.save(nib.Nifti1Image(mr_raw, np.eye(4)), str(nii))
    (tmp_path / "adv_compare.png").unlink()  # the figure of the run above
    assert main(_attack(models["u16"], nii, tmp_path, "8/255", "--rescale", "minmax")) == 0
    capsys.readouterr()
    out = nib.load(str(tmp_path / "adv.nii.gz"))
    back = np.asarray(out.dataobj)
    assert back.dtype == np.int16
    # |change| <= eps in model units = 8/255 of the 0..800 range, in the file's own values
    assert np.abs(back.astype(float) - mr_raw).max() <= 8 / 255 * 800 + 1e-9


def test_range_note_only_when_truly_outside(models: dict[str, Path], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    x = tmp_path / "x.npy"
    np.save(x, np.linspace(0.014, 1.0, 256).reshape(16, 16))  # float64, inside [0, 1]
    assert main(_attack(models["u16"], x, tmp_path)) == 0
    assert json.loads(capsys.readouterr().out)["notes"] == []
    y = tmp_path / "y.npy"
    np.save(y, np.linspace(-0.2, 1.0, 256).reshape(16, 16))
    (tmp_path / "adv.npy").unlink()
    (tmp_path / "adv_compare.png").unlink()
    assert main(_attack(models["u16"], y, tmp_path)) == 0
    (note,) = json.loads(capsys.readouterr().out)["notes"]
    assert "spans [-0.2, 1], below the model's bounds [0, 1]" in note
