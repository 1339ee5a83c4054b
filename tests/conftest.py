"""Shared fixtures: where the real data lives, and small CNNs trained on it once per session.

The real MedMNIST files are found through one setting, the environment variable ``MEDROBUST_DATA``
(default: ``../shared/data`` beside the repository). Tests that need them skip, with that reason,
when the folder is absent; CI always has it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import settings

import medrobust as mr
from medrobust.nets import smallcnn

# CI runs the property tests on a fixed set of examples (reproducible verdicts); elsewhere
# hypothesis explores new random examples on every run.
settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("MEDROBUST_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA_DIR / "pneumoniamnist.npz").is_file():
        pytest.skip(
            f"real MedMNIST data not found in {DATA_DIR} (set MEDROBUST_DATA to the folder "
            "holding pneumoniamnist.npz)"
        )
    return DATA_DIR


def load_npz_split(path: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images as float (N, C, H, W) in [0, 1] and labels (N,), straight from a MedMNIST file."""
    with np.load(path) as f:
        images = f[f"{split}_images"]
        labels = f[f"{split}_labels"]
    x = torch.from_numpy(images).float() / 255.0
    x = x.permute(0, 3, 1, 2) if x.dim() == 4 else x.unsqueeze(1)
    return x.contiguous(), torch.from_numpy(labels[:, 0].astype(np.int64))


@dataclass
class TrainedModel:
    model: mr.Classifier
    x: torch.Tensor  # held-out evaluation inputs
    y: torch.Tensor
    clean_accuracy: float
    majority_rate: float
    num_classes: int


def train_small_cnn(x: torch.Tensor, y: torch.Tensor, num_classes: int, *, epochs: int,
                    width: int, seed: int, flips: bool = False,
                    balanced: bool = False) -> torch.nn.Module:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same float summation order, hence the same model, everywhere
    try:
        return _train(x, y, num_classes, epochs=epochs, width=width, seed=seed, flips=flips,
                      balanced=balanced)
    finally:
        torch.set_num_threads(threads)


def _train(x: torch.Tensor, y: torch.Tensor, num_classes: int, *, epochs: int, width: int,
           seed: int, flips: bool, balanced: bool) -> torch.nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = smallcnn(in_channels=x.shape[1], num_classes=num_classes, width=width)
        opt = torch.optim.Adam(net.parameters(), lr=2e-3, weight_decay=1e-4)
        counts = torch.bincount(y, minlength=num_classes).float()
        weight = counts.sum() / (num_classes * counts.clamp_min(1)) if balanced else None
        net.train()
        for _ in range(epochs):
            perm = torch.randperm(len(x))
            for i in range(0, len(x), 64):
                b = perm[i:i + 64]
                xb = x[b]
                if flips:
                    flip = torch.rand(len(b), 1, 1, 1) < 0.5
                    xb = torch.where(flip, xb.flip(3), xb)
                loss = F.cross_entropy(net(xb), y[b], weight=weight)
                opt.zero_grad()
                loss.backward()
                opt.step()
    net.eval()
    return net


def _evaluate(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, k: int) -> TrainedModel:
    model = mr.Classifier(net, bounds=(0.0, 1.0), num_classes=k)
    acc = float((model.predict(x) == y).float().mean())
    majority = float(torch.bincount(y, minlength=k).max()) / len(y)
    return TrainedModel(model, x, y, acc, majority, k)


@pytest.fixture(scope="session")
def pneumonia_model(data_dir: Path) -> TrainedModel:
    """A small CNN trained on PneumoniaMNIST (binary), evaluated on 256 test images."""
    x, y = load_npz_split(data_dir / "pneumoniamnist.npz", "train")
    net = train_small_cnn(x, y, 2, epochs=2, width=8, seed=0)
    xt, yt = load_npz_split(data_dir / "pneumoniamnist.npz", "test")
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(xt), generator=g)[:256]
    return _evaluate(net, xt[idx], yt[idx], 2)


@pytest.fixture(scope="session")
def retina_model(data_dir: Path) -> TrainedModel:
    """A small CNN trained on RetinaMNIST (5 grades) with class-balanced cross-entropy (so that
    every grade, including the rare grade 4, can be predicted and thus targeted), evaluated on a
    class-balanced test subset (20 images per grade, so the majority-class rate is 20%)."""
    x, y = load_npz_split(data_dir / "retinamnist.npz", "train")
    net = train_small_cnn(x, y, 5, epochs=12, width=16, seed=0, flips=True, balanced=True)
    xt, yt = load_npz_split(data_dir / "retinamnist.npz", "test")
    idx = torch.cat([(yt == c).nonzero().flatten()[:20] for c in range(5)])
    return _evaluate(net, xt[idx], yt[idx], 5)


@pytest.fixture(scope="session")
def pneumonia_proxies(data_dir: Path) -> list[mr.Classifier]:
    """Two more small CNNs trained on PneumoniaMNIST independently of ``pneumonia_model`` (other
    seeds, disjoint sets of 2000 training images each, class-balanced loss), for transfer tests."""
    x, y = load_npz_split(data_dir / "pneumoniamnist.npz", "train")
    out = []
    for seed, part in ((1, slice(0, 2000)), (2, slice(2000, 4000))):
        net = train_small_cnn(x[part], y[part], 2, epochs=3, width=8, seed=seed, balanced=True)
        out.append(mr.Classifier(net, bounds=(0.0, 1.0), num_classes=2))
    return out
