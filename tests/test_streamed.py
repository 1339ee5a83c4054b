"""Streamed data (medrobust.data.streamed): sources read per batch give the rows the eager loaders
give, whole-data statistics never read the data, the cache never overwrites a foreign file, and an
evaluation of streamed data has the numbers of the same data held in memory."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from medrobust.data import load_dataset, load_image_folder, load_medmnist
from medrobust.data.errors import DataError
from medrobust.data.extract import RECORD_SUFFIX
from medrobust.data.phantoms import PhantomSource, make_phantoms
from medrobust.data.streamed import (
    ArraySource,
    ImageSource,
    IndexedSource,
    iter_chunks,
    materialize,
    value_range,
)
from medrobust.evaluation.util import tensor_sha256


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Counting(ImageSource):
    """A source over a tensor that records every row it was asked for (and knows no range)."""

    def __init__(self, t: torch.Tensor) -> None:
        super().__init__(t.shape, t.dtype)
        self.t = t
        self.read: list[int] = []

    def rows(self, start: int, stop: int) -> torch.Tensor:
        self.read += list(range(start, stop))
        return self.t[start:stop].clone()

    def fingerprint(self) -> str:
        return "counting"


# ------------------------------------------------------------------ the source's tensor face
def test_a_source_indexes_like_the_tensor_it_stands_for():
    t = torch.randn(23, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    src = Counting(t)
    assert src.shape == t.shape and len(src) == 23 and src.dim() == 4 and src.numel() == t.numel()
    for index in (slice(3, 11), slice(None, None, 4), slice(20, 40), 5, -1,
                  torch.tensor([7, 2, 7, 22]), torch.tensor(3), [0, 1, 2, 9],
                  t[:, 0, 0, 0] > 0, (4, 1),
                  (slice(2, 5), 0)):
        assert torch.equal(src[index], t[index]), index
    with pytest.raises(IndexError):
        src[23]
    with pytest.raises(IndexError):
        src[torch.tensor([0, 23])]
    assert torch.equal(torch.stack(list(src)), t)
    assert torch.equal(torch.cat(list(iter_chunks(src, 5))), t)
    # a subset stays lazy and reads only its rows
    src.read.clear()
    sub = IndexedSource(src, torch.tensor([4, 5, 6, 12]))
    assert set(src.read) == set()  # nothing read by building it
    assert torch.equal(sub[1:3], t[[5, 6]]) and set(src.read) == {5, 6}
    assert torch.equal(materialize(sub), t[[4, 5, 6, 12]])


def test_whole_data_statistics_are_computed_chunk_by_chunk():
    t = torch.rand(40, 1, 4, 4, generator=torch.Generator().manual_seed(1)) * 3 - 1
    src = Counting(t)
    import medrobust.data.streamed as streamed

    old = streamed.CHUNK_BYTES
    streamed.CHUNK_BYTES = 7 * 16 * 4  # 7 rows a chunk
    try:
        assert value_range(src) == (float(t.min()), float(t.max()))
        assert sorted(src.read) == list(range(40))  # every row once, in chunks
    finally:
        streamed.CHUNK_BYTES = old
    bad = t.clone()
    bad[17, 0, 1, 1] = float("nan")
    lo, hi = value_range(Counting(bad))
    assert np.isnan(lo) and np.isnan(hi)
    # the chunked hash is the hash of the bytes in one piece (the format did not change)
    y = torch.arange(40)
    h = hashlib.sha256()
    for a in (t, y):
        h.update(f"{a.dtype}|{tuple(a.shape)}|".encode())
        h.update(a.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    assert tensor_sha256(t, y) == h.hexdigest()
    # a source enters the hash with its fingerprint: no row is read
    src.read.clear()
    assert tensor_sha256(src, y) != tensor_sha256(t, y) and src.read == []


# ------------------------------------------------------------------ phantoms
def test_streamed_phantoms_are_generated_when_read_and_reproduce_from_the_seed():
    big = make_phantoms(n=10**6, size=16, seed=3, split="test", stream=True)
    src = big.images
    assert isinstance(src, PhantomSource) and src._cache == {}  # nothing generated yet
    assert big.labels.shape == (10**6,) and int(big.labels.sum()) == 500_000
    a = src[999_900:1_000_000]
    assert len(src._cache) <= 2  # at most two blocks held
    again = make_phantoms(n=10**6, size=16, seed=3, split="test", stream=True).images
    assert torch.equal(again[999_900:1_000_000], a)  # from the seed alone, any batch
    assert not torch.equal(make_phantoms(n=10**6, size=16, seed=4, stream=True).images[0:64],
                           src[0:64])
    # batches of any size and order give the same rows
    small = make_phantoms(n=300, size=16, seed=2, stream=True)
    whole = materialize(small.images)
    parts = torch.cat([small.images[s:s + 37] for s in range(0, 300, 37)])
    assert torch.equal(parts, whole)
    idx = torch.tensor([299, 0, 64, 63, 64])
    assert torch.equal(small.images[idx], whole[idx])
    # the labels are those of the eager generator; values within the known range
    eager = make_phantoms(n=300, size=16, seed=2)
    assert torch.equal(small.labels, eager.labels)
    assert small.images.known_range() == (0.0, 1.0)
    assert float(whole.min()) >= 0.0 and float(whole.max()) <= 1.0
    # the lesions are where the label says: positives are brighter inside their mask
    m = small.images.masks(0, 300)
    pos = small.labels.bool()
    assert bool((m.flatten(1).any(1) == pos).all())
    # names: n<count>, stream
    d = load_dataset("phantom-16-n500-stream", split="val")
    assert d.streamed and len(d) == 500 and d.subset(slice(0, 10)).streamed
    with pytest.raises(ValueError, match="segmentation"):
        make_phantoms(n=8, size=16, task="segmentation", stream=True)


# ------------------------------------------------------------------ MedMNIST, memory-mapped
def test_streamed_medmnist_split_equals_the_loaded_one(data_dir, tmp_path):
    cache = tmp_path / "cache"
    eager = load_medmnist("retinamnist", "test", root=data_dir, download=False)
    lazy = load_medmnist("retinamnist", "test", root=data_dir, download=False, stream=True,
                         cache_dir=cache)
    assert isinstance(lazy.images, ArraySource) and lazy.meta["stream"] is True
    assert lazy.images.shape == eager.images.shape
    assert torch.equal(lazy.images[:], eager.images)
    assert torch.equal(lazy.images[[5, 1, 5]], eager.images[[5, 1, 5]])
    assert torch.equal(lazy.labels, eager.labels)
    npy = next(cache.rglob("test_images.npy"))
    record = json.loads(npy.with_name(npy.name + RECORD_SUFFIX).read_text())
    assert record["source_sha256"] == eager.meta["sha256"]
    assert isinstance(np.load(npy, mmap_mode="r"), np.memmap)
    stamp = npy.stat().st_mtime_ns
    limited = load_medmnist("retinamnist", "test", root=data_dir, download=False, stream=True,
                            cache_dir=cache, limit=30)
    assert npy.stat().st_mtime_ns == stamp  # extracted once, then reused
    assert torch.equal(limited.images[:], eager.images[:30]) and len(limited.labels) == 30
    assert tensor_sha256(limited.images) != tensor_sha256(lazy.images)


def test_the_cache_never_overwrites_a_file_medrobust_did_not_write(data_dir, tmp_path,
                                                                  monkeypatch):
    cache = tmp_path / "cache"
    first = load_medmnist("breastmnist", "test", root=data_dir, download=False, stream=True,
                          cache_dir=cache)
    npy = next(cache.rglob("test_images.npy"))
    other = tmp_path / "cache2" / npy.relative_to(cache)
    other.parent.mkdir(parents=True)
    other.write_bytes(b"the user's own file")
    with pytest.raises(DataError, match="not written by medrobust"):
        load_medmnist("breastmnist", "test", root=data_dir, download=False, stream=True,
                      cache_dir=tmp_path / "cache2")
    assert other.read_bytes() == b"the user's own file"
    # the size threshold turns streaming on by itself
    monkeypatch.setenv("MEDROBUST_CACHE", str(cache))
    monkeypatch.setenv("MEDROBUST_STREAM_BYTES", "1000")
    auto = load_medmnist("breastmnist", "test", root=data_dir, download=False)
    assert auto.streamed and torch.equal(auto.images[:], first.images[:])
    monkeypatch.setenv("MEDROBUST_STREAM_BYTES", "lots")
    with pytest.raises(DataError, match="MEDROBUST_STREAM_BYTES"):
        load_medmnist("breastmnist", "test", root=data_dir, download=False)


# ------------------------------------------------------------------ image folders
def test_streamed_image_folder_reads_per_batch_and_names_a_bad_file(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for k in ("a", "b"):
        (tmp_path / k).mkdir()
        for i in range(5):
            Image.fromarray(rng.integers(0, 255, (12, 10), dtype=np.uint8)).save(
                tmp_path / k / f"{i}.png")
    eager = load_image_folder(tmp_path)
    lazy = load_image_folder(tmp_path, stream=True)
    assert lazy.streamed and torch.equal(lazy.images[:], eager.images)
    assert torch.equal(lazy.labels, eager.labels)
    Image.fromarray(np.zeros((9, 9), dtype=np.uint8)).save(tmp_path / "b" / "9.png")
    odd = load_image_folder(tmp_path, stream=True)
    assert torch.equal(odd.images[0:4], eager.images[0:4])  # other batches still read
    with pytest.raises(DataError, match="9.png"):
        odd.images[8:11]


# ------------------------------------------------------------------ evaluation
def test_evaluating_streamed_data_gives_the_numbers_of_the_data_in_memory(tmp_path):
    from medrobust.evaluation import evaluate, stable_view
    from medrobust.modelstore import save_model
    from medrobust.nets import build_network

    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = build_network("smallcnn", in_channels=1, num_classes=2, width=2)
    net.eval()
    model = save_model(tmp_path / "m", net, bounds=(0.0, 1.0), units="intensity",
                       class_names=["normal", "lesion"], task="binary")
    data = make_phantoms(n=40, size=16, seed=5, stream=True)
    held = make_phantoms(n=40, size=16, seed=5, stream=True)
    held.images = materialize(held.images)
    kw = dict(attacks="fgsm,pgd", eps=[0, 2 / 255], steps=2, batch_size=16, progress=False,
              large_eps=False, gallery=2)
    a = evaluate(model, data, out=tmp_path / "a", **kw).results
    b = evaluate(model, held, out=tmp_path / "b", **kw).results
    va, vb = stable_view(a), stable_view(b)
    assert va["data"].pop("content_sha256") != vb["data"].pop("content_sha256")
    va.pop("config_hash"), vb.pop("config_hash")
    assert va == vb
    # a source of unknown range is scanned chunk by chunk: values outside the bounds are named
    arr = np.linspace(-0.5, 1.0, 8 * 256, dtype=np.float32).reshape(8, 1, 16, 16)
    bad = make_phantoms(n=8, size=16, stream=True)
    bad.images = ArraySource(arr, torch.from_numpy, "linspace")
    with pytest.raises(ValueError, match="-0.5"):
        evaluate(model, bad, **kw)


def test_file_fingerprint_follows_the_files(tmp_path):
    from medrobust.data.streamed import FileSource

    files = []
    for i in range(3):
        f = tmp_path / f"{i}.npy"
        np.save(f, np.full((1, 2, 2), i, dtype=np.float32))
        files.append(f)

    def read(p: Path) -> torch.Tensor:
        return torch.from_numpy(np.load(p))

    src = FileSource(files, read)
    fp = src.fingerprint()
    assert torch.equal(src[1:3][:, 0, 0, 0], torch.tensor([1.0, 2.0]))
    assert FileSource(files, read).fingerprint() == fp
    np.save(files[2], np.full((1, 2, 2), 7, dtype=np.float32))
    os.utime(files[2], ns=(1, 1))
    assert FileSource(files, read).fingerprint() != fp


def test_transfer_of_streamed_data_equals_the_data_in_memory():
    import medrobust as mr
    from medrobust.nets import build_network

    models = {}
    for s in range(3):
        with torch.random.fork_rng():
            torch.manual_seed(s)
            models[f"m{s}"] = mr.Classifier(
                build_network("smallcnn", in_channels=1, num_classes=2, width=2).eval())
    data = make_phantoms(n=40, size=16, seed=7, stream=True)
    x = materialize(data.images)
    kw = dict(attack="pgd", eps=8 / 255, attack_kwargs={"steps": 2}, batch_size=16)
    lazy = mr.transfer(models, data, **kw)
    held = mr.transfer(models, (x, data.labels), **kw)
    assert lazy.to_dict() == held.to_dict()
    assert lazy.n == 40 and lazy.ensemble_success is not None
    # a streamed source is checked batch by batch like a tensor: out-of-bounds values are named
    bad = make_phantoms(n=40, size=16, seed=7, stream=True)
    bad.images = ArraySource(np.full((40, 1, 16, 16), 2.0, dtype=np.float32), torch.from_numpy,
                             "twos")
    with pytest.raises(ValueError, match="bounds"):
        mr.transfer(models, bad, **kw)
