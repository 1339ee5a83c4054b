"""Phantoms: determinism per seed, balance, masks consistent with labels, units, speed, names."""

from __future__ import annotations

import time

import pytest
import torch

from medrobust.data import load_dataset, make_phantoms
from medrobust.data.phantoms import CT_BOUNDS


def test_deterministic_per_seed_and_global_state_untouched() -> None:
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = make_phantoms(n=40, size=32, seed=5)
    assert torch.equal(torch.get_rng_state(), before)
    b = make_phantoms(n=40, size=32, seed=5)
    c = make_phantoms(n=40, size=32, seed=6)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images)
    tr = make_phantoms(n=40, size=32, seed=5, split="train")
    te = make_phantoms(n=40, size=32, seed=5, split="test")
    assert not torch.equal(tr.images, te.images)


@pytest.mark.parametrize("dim", [2, 3])
def test_shapes_balance_masks(dim: int) -> None:
    d = make_phantoms(n=50, size=24, dim=dim, seed=1)
    assert d.images.shape == (50, 1) + (24,) * dim and d.images.dtype == torch.float32
    assert d.labels.dtype == torch.int64 and d.task == "binary"
    assert d.class_names == ["normal", "lesion"]
    assert int(d.labels.sum()) == 25  # exactly lesion_fraction * n positives
    masks = d.meta["masks"]
    area = masks.flatten(1).sum(1)
    assert bool((area[d.labels == 1] > 0).all()) and bool((area[d.labels == 0] == 0).all())
    assert float(d.images.min()) >= 0 and float(d.images.max()) <= 1 and d.bounds == (0.0, 1.0)
    assert d.spacing == (1.0,) * dim


def test_segmentation_and_lesion_contrast() -> None:
    hu = make_phantoms(n=32, size=48, seed=2, units="HU", task="segmentation",
                       lesion_fraction=1.0, noise=0.0, texture=0.0, n_organs=0,
                       lesion_contrast=50.0)
    assert hu.task == "segmentation" and hu.labels.shape == (32, 48, 48)
    assert hu.units == "HU" and hu.bounds == CT_BOUNDS
    assert bool(hu.meta["has_lesion"].all())
    x = hu.images[:, 0]
    lesion = hu.labels.bool()
    # without noise or texture: tissue is 40 HU and the mask marks >= half the contrast
    assert float(x[lesion].min()) >= 40 + 25 - 1e-3
    assert float(x.min()) >= -1024 and float(x.max()) <= 3071
    assert float(x.min()) < -900  # air outside the body
    neg = make_phantoms(n=4, size=48, seed=2, units="HU", task="segmentation",
                        lesion_fraction=0.0)
    assert int(neg.labels.sum()) == 0


def test_lesion_visible_in_data() -> None:
    d = make_phantoms(n=200, size=32, seed=3, units="HU")
    x, m, y = d.images[:, 0], d.meta["masks"], d.labels
    inside = x[m].mean()
    ring = x[y == 1].mean()
    assert float(inside) > float(ring) + 20  # the lesion is brighter than the image on average


def test_fast_enough() -> None:
    t = time.perf_counter()
    make_phantoms(n=512, size=32, seed=0)
    make_phantoms(n=64, size=24, dim=3, seed=0)
    assert time.perf_counter() - t < 10.0


def test_names() -> None:
    d = load_dataset("phantom-ct", "val", n=8)
    assert d.units == "HU" and d.images.shape == (8, 1, 64, 64)
    v = load_dataset("phantom3d-seg", n=3, size=16)
    assert v.images.shape == (3, 1, 16, 16, 16) and v.task == "segmentation"
    assert load_dataset("phantom3d", "train", n=2).images.shape == (2, 1, 32, 32, 32)
    with pytest.raises(ValueError):
        make_phantoms(n=2, size=4)
