"""MedMNIST loading on the genuine files, the download path against a loopback server, bad input."""

from __future__ import annotations

import hashlib
import shutil
import threading
import zipfile
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

from medrobust.data import DataError, ImageData, load_dataset
from medrobust.data.medmnist import (
    MEDMNIST_INFO,
    download_medmnist,
    file_sha256,
    find_medmnist,
    load_medmnist,
    load_npz,
    medmnist_filename,
    medmnist_md5,
    medmnist_url,
    parse_medmnist_name,
)

# (name, split) -> (shape, class counts), from shared/data/README.md
EXPECTED = {
    ("pneumoniamnist", "train"): ((4708, 1, 28, 28), [1214, 3494]),
    ("pneumoniamnist", "val"): ((524, 1, 28, 28), [135, 389]),
    ("pneumoniamnist", "test"): ((624, 1, 28, 28), [234, 390]),
    ("breastmnist", "train"): ((546, 1, 28, 28), [147, 399]),
    ("breastmnist", "test"): ((156, 1, 28, 28), [42, 114]),
    ("retinamnist", "train"): ((1080, 3, 28, 28), [486, 128, 206, 194, 66]),
    ("retinamnist", "test"): ((400, 3, 28, 28), [174, 46, 92, 68, 20]),
    ("adrenalmnist3d", "train"): ((1188, 1, 28, 28, 28), [929, 259]),
    ("adrenalmnist3d", "test"): ((298, 1, 28, 28, 28), [229, 69]),
    ("adrenalmnist3d_64", "val"): ((98, 1, 64, 64, 64), [76, 22]),
}


@pytest.fixture
def no_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No MEDROBUST_DATA/URL in the environment; the cache is an empty tmp folder."""
    monkeypatch.delenv("MEDROBUST_DATA", raising=False)
    monkeypatch.delenv("MEDROBUST_MEDMNIST_URL", raising=False)
    cache = tmp_path / "cache"
    monkeypatch.setenv("MEDROBUST_CACHE", str(cache))
    return cache


@pytest.mark.parametrize(("name", "split"), sorted(EXPECTED))
def test_genuine_files(data_dir: Path, name: str, split: str) -> None:
    shape, counts = EXPECTED[(name, split)]
    d = load_medmnist(name, split, root=data_dir, download=False)
    assert isinstance(d, ImageData)
    assert tuple(d.images.shape) == shape
    assert d.images.dtype == torch.float32 and d.labels.dtype == torch.int64
    assert d.labels.shape == (shape[0],)
    assert float(d.images.min()) >= 0.0 and float(d.images.max()) <= 1.0
    assert float(d.images.max()) > 0.9  # really scaled by 1/255, not left in 0..1/255
    assert torch.bincount(d.labels, minlength=len(counts)).tolist() == counts
    assert d.bounds == (0.0, 1.0) and d.units == "intensity"
    flag = name.split("_")[0]
    assert d.class_names == list(MEDMNIST_INFO[flag].labels)
    assert d.meta["split"] == split and d.meta["dataset"] == flag
    assert d.meta["sha256"] == file_sha256(data_dir / medmnist_filename(name))


def test_values_match_raw_npz(data_dir: Path) -> None:
    raw = np.load(data_dir / "retinamnist.npz")
    d = load_medmnist("retinamnist", "val", root=data_dir, download=False)
    ref = torch.from_numpy(raw["val_images"]).permute(0, 3, 1, 2).float() / 255
    assert torch.equal(d.images, ref)
    assert torch.equal(d.labels, torch.from_numpy(raw["val_labels"][:, 0]).long())
    sha = hashlib.sha256((data_dir / "retinamnist.npz").read_bytes()).hexdigest()
    assert d.meta["sha256"] == sha == (
        "254915f5f0a2074665c4676356824cf4ef4a3bcab233894b4bafcaf48962bd69"
    )


def test_tasks_and_names() -> None:
    assert MEDMNIST_INFO["chestmnist"].task == "multi-label"
    assert len(MEDMNIST_INFO["chestmnist"].labels) == 14
    assert MEDMNIST_INFO["retinamnist"].task == "ordinal"
    assert MEDMNIST_INFO["pneumoniamnist"].task == "binary"
    assert MEDMNIST_INFO["pathmnist"].task == "multi-class"
    assert len(MEDMNIST_INFO) == 18
    for info in MEDMNIST_INFO.values():
        assert info.sizes == ((28, 64) if info.is_3d else (28, 64, 128, 224))
        assert all(len(m) == 32 for m in info.md5.values())
    assert parse_medmnist_name("adrenalmnist3d_64") == ("adrenalmnist3d", 64)
    assert parse_medmnist_name("PathMNIST", size=224) == ("pathmnist", 224)
    assert medmnist_filename("bloodmnist", 128) == "bloodmnist_128.npz"
    assert medmnist_filename("bloodmnist") == "bloodmnist.npz"
    assert medmnist_md5("adrenalmnist3d_64") == "17721accfe9fb005146a47d33bc54b2f"
    assert medmnist_url("pneumoniamnist_224") == (
        "https://zenodo.org/records/10519652/files/pneumoniamnist_224.npz?download=1"
    )
    for bad in ("fooMNIST", "adrenalmnist3d_128", "pathmnist_32"):
        with pytest.raises(DataError):
            parse_medmnist_name(bad)


def test_limit_and_indices(data_dir: Path) -> None:
    full = load_medmnist("adrenalmnist3d", "test", root=data_dir, download=False)
    part = load_medmnist("adrenalmnist3d", "test", root=data_dir, download=False, limit=7)
    assert len(part) == 7 and torch.equal(part.images, full.images[:7])
    idx = [250, 3, 3, 100]
    sel = load_medmnist("adrenalmnist3d", "test", root=data_dir, download=False, indices=idx)
    assert torch.equal(sel.images, full.images[idx])
    assert torch.equal(sel.labels, full.labels[idx])
    assert sel.meta["indices"] == idx
    big = load_medmnist("adrenalmnist3d_64", "train", root=data_dir, download=False, limit=4)
    assert big.images.shape == (4, 1, 64, 64, 64)
    with pytest.raises(DataError, match="indices outside"):
        load_medmnist("breastmnist", "test", root=data_dir, download=False, indices=[156])


def test_search_order(data_dir: Path, no_env: Path, monkeypatch: pytest.MonkeyPatch,
                      tmp_path: Path) -> None:
    assert find_medmnist("breastmnist") is None
    monkeypatch.setenv("MEDROBUST_DATA", str(data_dir))
    assert find_medmnist("breastmnist") == data_dir / "breastmnist.npz"
    mine = tmp_path / "mine"
    mine.mkdir()
    shutil.copy(data_dir / "breastmnist.npz", mine / "breastmnist.npz")
    assert find_medmnist("breastmnist", root=mine) == mine / "breastmnist.npz"
    d = load_dataset("breastmnist", "val")
    assert len(d) == 78 and d.source == str(data_dir / "breastmnist.npz")


# ------------------------------------------------------------------------- download path


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


@pytest.fixture
def server(tmp_path: Path, data_dir: Path) -> Iterator[str]:
    """A loopback HTTP server: /good/breastmnist.npz (a real copy), /bad/ (one byte flipped)."""
    root = tmp_path / "www"
    (root / "good").mkdir(parents=True)
    (root / "bad").mkdir()
    shutil.copy(data_dir / "breastmnist.npz", root / "good" / "breastmnist.npz")
    raw = bytearray((data_dir / "breastmnist.npz").read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (root / "bad" / "breastmnist.npz").write_bytes(bytes(raw))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Quiet, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def test_download_good(server: str, no_env: Path, data_dir: Path) -> None:
    d = load_medmnist("breastmnist", "test", base_url=server + "/good/")
    target = no_env / "breastmnist.npz"
    assert target.is_file()
    assert hashlib.md5(target.read_bytes()).hexdigest() == "750601b1f35ba3300ea97c75c52ff8f6"
    assert sorted(p.name for p in no_env.iterdir()) == ["breastmnist.npz"]
    assert len(d) == 156 and d.source == str(target)
    ref = load_medmnist("breastmnist", "test", root=data_dir, download=False)
    assert torch.equal(d.images, ref.images)
    # the second call finds the cached file and downloads nothing (the server is not asked)
    again = load_medmnist("breastmnist", "test", base_url="http://127.0.0.1:9/none/")
    assert torch.equal(again.labels, ref.labels)


def test_download_env_url_template(server: str, no_env: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDROBUST_MEDMNIST_URL", server + "/good/{file}")
    path = download_medmnist("breastmnist")
    assert path == no_env / "breastmnist.npz" and path.is_file()


def test_download_corrupt_rejected(server: str, no_env: Path, tmp_path: Path) -> None:
    cache = tmp_path / "other-cache"
    with pytest.raises(DataError, match="MD5") as err:
        load_medmnist("breastmnist", "test", cache_dir=cache, base_url=server + "/bad/")
    assert "breastmnist.npz" in str(err.value)
    assert list(cache.iterdir()) == []  # no partial or corrupt file left behind


def test_download_missing_on_server(server: str, no_env: Path) -> None:
    with pytest.raises(DataError, match="pneumoniamnist.npz"):
        download_medmnist("pneumoniamnist", base_url=server + "/good/")
    assert not no_env.exists() or list(no_env.iterdir()) == []


def test_absent_without_download(no_env: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        load_medmnist("pneumoniamnist", download=False)


# ------------------------------------------------------------------------------ bad input


def _save(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found") as err:
        load_npz(tmp_path / "nope.npz")
    assert "nope.npz" in str(err.value)
    with pytest.raises(DataError, match="no such file"):
        load_dataset(str(tmp_path / "nope.npz"))


def test_truncated_and_corrupt_npz(data_dir: Path, tmp_path: Path) -> None:
    raw = (data_dir / "breastmnist.npz").read_bytes()
    trunc = tmp_path / "trunc.npz"
    trunc.write_bytes(raw[: len(raw) // 3])
    with pytest.raises(DataError, match="trunc.npz"):
        load_npz(trunc)
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"this is not a zip archive" * 10)
    with pytest.raises(DataError, match="corrupt"):
        load_npz(junk)
    # damage the deflate stream of test_images inside an otherwise valid archive
    with zipfile.ZipFile(data_dir / "breastmnist.npz") as zf:
        info = zf.getinfo("test_images.npy")
    start = info.header_offset + 30 + len(info.filename) + len(info.extra) + 200
    bad = bytearray(raw)
    bad[start : start + 64] = bytes(64)
    damaged = tmp_path / "damaged.npz"
    damaged.write_bytes(bytes(bad))
    with pytest.raises(DataError, match="damaged.npz"):
        load_npz(damaged, "test")


def test_npz_without_arrays(tmp_path: Path) -> None:
    p = _save(tmp_path / "x.npz", images=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(DataError, match="test_images") as err:
        load_npz(p)
    assert "x.npz" in str(err.value)


def test_labels_out_of_range(tmp_path: Path) -> None:
    imgs = np.zeros((3, 28, 28), np.uint8)
    p = _save(tmp_path / "breastmnist.npz", test_images=imgs,
              test_labels=np.array([[0], [1], [2]], np.uint8))
    with pytest.raises(DataError, match="outside the class range"):
        load_npz(p)
    q = _save(tmp_path / "chestmnist.npz", test_images=imgs,
              test_labels=np.full((3, 14), 2, np.uint8))
    with pytest.raises(DataError, match="0 or 1"):
        load_npz(q)


def test_nan_images(tmp_path: Path) -> None:
    imgs = np.zeros((2, 8, 8), np.float32)
    imgs[1, 3, 3] = np.nan
    p = _save(tmp_path / "custom.npz", test_images=imgs, test_labels=np.zeros((2, 1), np.uint8))
    with pytest.raises(DataError, match="NaN"):
        load_npz(p)


def test_custom_npz_and_pickles(tmp_path: Path) -> None:
    imgs = (np.arange(2 * 5 * 6 * 3) % 256).astype(np.uint8).reshape(2, 5, 6, 3)
    p = _save(tmp_path / "mine.npz", train_images=imgs, train_labels=np.array([[0], [2]]))
    d = load_npz(p, "train")
    assert d.images.shape == (2, 3, 5, 6) and d.class_names == ["0", "1", "2"]
    assert d.task == "multi-class"
    obj = np.empty(2, dtype=object)
    q = _save(tmp_path / "pickled.npz", test_images=obj, test_labels=np.zeros((2, 1)))
    with pytest.raises(DataError, match="pickled.npz"):
        load_npz(q)
