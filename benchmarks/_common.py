"""What the benchmark scripts share: the PneumoniaMNIST file and a short, seeded training loop."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MEDROBUST_DATA", REPO.parent / "shared" / "data"))
PNEUMONIA = DATA / "pneumoniamnist.npz"


def load_pneumonia(split: str, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """PneumoniaMNIST ``split`` as float (N, 1, 28, 28) in [0, 1] and int64 labels (N,)."""
    if not PNEUMONIA.is_file():
        raise FileNotFoundError(f"{PNEUMONIA} not found (set MEDROBUST_DATA)")
    with np.load(PNEUMONIA) as f:
        x = torch.from_numpy(f[f"{split}_images"][:n]).float().div(255.0).unsqueeze(1)
        y = torch.from_numpy(f[f"{split}_labels"][:n, 0].astype(np.int64))
    return x.contiguous(), y


def fit(build: Callable[[], torch.nn.Module], x: torch.Tensor, y: torch.Tensor, *,
        epochs: int, lr: float, seed: int = 0) -> torch.nn.Module:
    """Build (``build()``) and train a classifier with Adam and cross-entropy, batches of 64, all
    randomness from ``seed`` inside ``fork_rng`` (the caller's global state is untouched)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = build()
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        net.train()
        for _ in range(epochs):
            perm = torch.randperm(len(x))
            for i in range(0, len(x), 64):
                b = perm[i:i + 64]
                loss = F.cross_entropy(net(x[b]), y[b])
                opt.zero_grad()
                loss.backward()
                opt.step()
    return net.eval()
