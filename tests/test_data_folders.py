"""Image folders: classes from subfolders, gray/RGB, resizing, splits, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medrobust.data import DataError, load_dataset
from medrobust.data.folders import load_image_folder


def _write(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


@pytest.fixture
def gray_folder(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    for c, n in (("benign", 3), ("malignant", 2)):
        for i in range(n):
            _write(tmp_path / "ds" / c / f"{i}.png", rng.integers(0, 256, (9, 11), dtype=np.uint8))
    return tmp_path / "ds"


def test_gray_png(gray_folder: Path) -> None:
    d = load_image_folder(gray_folder)
    assert d.images.shape == (5, 1, 9, 11) and d.images.dtype == torch.float32
    assert d.labels.tolist() == [0, 0, 0, 1, 1]
    assert d.class_names == ["benign", "malignant"] and d.task == "binary"
    raw = np.asarray(Image.open(gray_folder / "malignant" / "1.png"), dtype=np.float32) / 255
    assert np.array_equal(d.images[4, 0].numpy(), raw)
    assert d.bounds == (0.0, 1.0) and d.units == "intensity"
    assert load_dataset(gray_folder).labels.tolist() == [0, 0, 0, 1, 1]


def test_rgb_jpeg_resize_and_split(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    for split in ("train", "test"):
        for k, c in enumerate(("a", "b", "c")):
            size = (20, 30, 3) if k else (10, 12, 3)
            _write(tmp_path / split / c / "x.jpg", rng.integers(0, 256, size, dtype=np.uint8))
    with pytest.raises(DataError, match="size="):
        load_image_folder(tmp_path, "train")
    d = load_image_folder(tmp_path, "train", size=16)
    assert d.images.shape == (3, 3, 16, 16) and d.task == "multi-class"
    assert d.class_names == ["a", "b", "c"] and d.meta["split"] == "train"
    assert float(d.images.min()) >= 0 and float(d.images.max()) <= 1
    g = load_image_folder(tmp_path, "test", size=(8, 10), mode="L")
    assert g.images.shape == (3, 1, 8, 10)
    assert load_dataset(tmp_path, "test", size=8).images.shape == (3, 3, 8, 8)


def test_16bit_gray(tmp_path: Path) -> None:
    arr = np.array([[0, 65535], [32768, 1000]], dtype=np.uint16)
    _write(tmp_path / "x" / "only" / "a.png", arr)
    d = load_image_folder(tmp_path / "x")
    assert d.images.shape == (1, 1, 2, 2)
    assert torch.allclose(d.images[0, 0], torch.from_numpy(arr / 65535.0).float())


def test_bad_input(tmp_path: Path, gray_folder: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        load_image_folder(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class subfolders"):
        load_image_folder(tmp_path / "empty")
    (tmp_path / "noimg" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="no image files"):
        load_image_folder(tmp_path / "noimg")
    broken = gray_folder / "benign" / "broken.png"
    broken.write_bytes(Image.open(gray_folder / "benign" / "0.png").tobytes()[:20])
    with pytest.raises(DataError, match="broken.png"):
        load_image_folder(gray_folder)
