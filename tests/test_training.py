"""The training API: MedMNIST metrics, learning on real data, reproducibility, RNG hygiene."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from medrobust.data.base import ImageData
from medrobust.models import Classifier
from medrobust.nets import build_network
from medrobust.training import (
    medmnist_acc,
    medmnist_auc,
    roc_auc,
    seeded,
    train,
)


def _pairwise_auc(y: np.ndarray, s: np.ndarray) -> float:
    pos, neg = s[y == 1], s[y == 0]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


def test_roc_auc_equals_the_pairwise_definition_with_ties() -> None:
    rng = np.random.default_rng(0)
    for _ in range(5):
        y = rng.integers(0, 2, 60)
        s = rng.integers(0, 6, 60).astype(float)  # many ties
        assert roc_auc(y, s) == pytest.approx(_pairwise_auc(y, s), abs=1e-12)
    assert roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert np.isnan(roc_auc([1, 1], [0.2, 0.3]))


def test_medmnist_metrics() -> None:
    y = np.array([0, 1, 1, 0])
    p1 = np.array([0.2, 0.7, 0.4, 0.6])
    score = np.stack([1 - p1, p1], 1)
    assert medmnist_auc(y, score, "binary") == pytest.approx(0.75)
    assert medmnist_acc(y, score, "binary") == pytest.approx(0.5)
    y3 = np.array([0, 1, 2, 2])
    s3 = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7], [0.5, 0.3, 0.2]])
    expected = np.mean([_pairwise_auc((y3 == k).astype(int), s3[:, k]) for k in range(3)])
    assert medmnist_auc(y3, s3, "multi-class") == pytest.approx(expected)
    assert medmnist_acc(y3, s3, "multi-class") == pytest.approx(0.75)
    yl = np.array([[1, 0], [0, 1], [1, 1], [0, 0]])
    sl = np.array([[0.9, 0.2], [0.4, 0.6], [0.7, 0.4], [0.1, 0.3]])
    assert medmnist_acc(yl, sl, "multi-label") == pytest.approx((1.0 + 0.75) / 2)
    assert medmnist_auc(yl, sl, "multi-label") == pytest.approx(1.0)


def _synthetic(n: int, seed: int, task: str = "binary") -> ImageData:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.rand(n, 1, 12, 12, generator=g) * 0.5
    x[:, :, 4:8, 4:8] += 0.5 * y.view(-1, 1, 1, 1)  # a bright square means class 1
    if task == "multi-label":
        labels = torch.stack([y, 1 - y], 1)
        return ImageData(x, labels, (0.0, 1.0), "intensity", "multi-label", ["a", "b"])
    if task == "segmentation":
        mask = torch.zeros(n, 12, 12, dtype=torch.int64)
        mask[:, 4:8, 4:8] = y.view(-1, 1, 1)
        return ImageData(x, mask, (0.0, 1.0), "intensity", "segmentation", ["bg", "square"])
    return ImageData(x, y, (0.0, 1.0), "intensity", "binary", ["no", "yes"])


def _tiny_net(seed: int, **kw: object) -> torch.nn.Module:
    with seeded(seed):
        return build_network("smallcnn", in_channels=1, num_classes=2, width=4, **kw)


def test_learns_pneumoniamnist_subset_beyond_the_majority_class(
    data_dir: Path, tmp_path: Path
) -> None:
    from medrobust.data.medmnist import load_npz

    tr = load_npz(data_dir / "pneumoniamnist.npz", "train", limit=384)
    va = load_npz(data_dir / "pneumoniamnist.npz", "val", limit=256)
    majority = max(float(va.labels.float().mean()), 1 - float(va.labels.float().mean()))
    rng_before = torch.get_rng_state()
    with seeded(0):
        net = build_network("smallcnn", in_channels=1, num_classes=2, width=8)
    seen: list[dict] = []
    res = train(net, tr, va, epochs=3, batch_size=16, lr=1e-3, schedule="none", seed=0,
                mean=0.5, std=0.25, progress=False, log_path=tmp_path / "metrics.jsonl",
                on_epoch_end=seen.append)
    assert torch.equal(rng_before, torch.get_rng_state())
    assert res.best_metrics["acc"] > majority + 0.05
    assert res.best_metrics["auc"] > 0.9
    aucs = [h["val_auc"] for h in res.history]
    assert res.best_epoch == int(np.argmax(aucs)) + 1
    lines = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3] and len(seen) == 3
    assert {"train_loss", "val_acc", "val_auc", "lr", "best"} <= set(lines[0])
    # the kept state is the best one, and the wrapper evaluates to the logged figure
    assert res.classifier is not None
    from medrobust.training import evaluate

    assert evaluate(res.classifier, va)["auc"] == pytest.approx(res.best_metrics["auc"])


def test_same_seed_is_bit_identical_and_global_rng_untouched() -> None:
    tr, va = _synthetic(32, 1), _synthetic(16, 2)
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    runs = []
    for seed in (7, 7, 8):
        net = _tiny_net(0, dropout=0.3)  # dropout draws random numbers during training
        res = train(net, tr, va, epochs=2, batch_size=8, seed=seed, progress=False)
        runs.append(res.best_state)
        assert torch.equal(state, torch.get_rng_state())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not all(torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


def test_example_generator_replaces_each_batch() -> None:
    tr = _synthetic(20, 3)
    calls: list[tuple[int, bool]] = []

    def generator(wrapper: Classifier, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        assert isinstance(wrapper, Classifier) and wrapper.bounds == (0.0, 1.0)
        calls.append((x.shape[0], wrapper.module.training))
        return torch.zeros_like(x)  # train on blank images only

    net = _tiny_net(0)
    res = train(net, tr, None, epochs=2, batch_size=8, seed=0, progress=False,
                example_generator=generator)
    assert [c[0] for c in calls] == [8, 8, 4, 8, 8, 4]
    assert res.best_epoch == 2 and res.best_metrics == {}


def test_multilabel_and_segmentation_train() -> None:
    ml = _synthetic(24, 4, "multi-label")
    res = train(_tiny_net(0), ml, ml, epochs=1, batch_size=8, progress=False)
    assert 0.0 <= res.best_metrics["acc"] <= 1.0 and "auc" in res.best_metrics
    seg = _synthetic(8, 5, "segmentation")
    with seeded(0):
        unet = build_network("unet", in_channels=1, num_classes=2, channels=[4, 8])
    res = train(unet, seg, seg, epochs=1, batch_size=8, progress=False)
    assert res.classifier is None and "dice" in res.best_metrics


def test_bad_arguments() -> None:
    tr = _synthetic(8, 6)
    with pytest.raises(ValueError, match="epochs"):
        train(_tiny_net(0), tr, epochs=0)
    with pytest.raises(ValueError, match="optimizer"):
        train(_tiny_net(0), tr, optimizer="lbfgs")
    with pytest.raises(ValueError, match="schedule"):
        train(_tiny_net(0), tr, schedule="step")
    with pytest.raises(ValueError, match="does not match"):
        train(_tiny_net(0), tr, _synthetic(8, 7, "multi-label"))
