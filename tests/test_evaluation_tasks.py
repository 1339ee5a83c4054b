"""Task types end to end: multi-label findings (phantoms with several findings each), ordinal
grades (mean absolute grade shift under attack)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import medrobust as mr
from medrobust.data import ImageData
from medrobust.data.phantoms import make_phantoms


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


FINDINGS = ["lesion", "lesion on the left", "large lesion"]


def finding_phantoms(n: int, split: str) -> ImageData:
    """Phantoms with three findings each, read off the lesion masks: a lesion; a lesion whose
    centre lies in the left half; a lesion larger than the median lesion."""
    ph = make_phantoms(n, 16, seed=3, split=split, lesion_contrast=200.0,
                       lesion_radius=(0.1, 0.3))
    masks = ph.meta["masks"].float()
    area = masks.flatten(1).sum(1)
    cols = torch.arange(16).float()
    centre = (masks.sum(1) * cols).sum(1) / area.clamp_min(1)
    lesion = area > 0
    left = lesion & (centre < 7.5)
    large = lesion & (area > float(area[lesion].median()))
    labels = torch.stack([lesion, left, large], 1).long()
    return ImageData(ph.images, labels, ph.bounds, ph.units, "multi-label", list(FINDINGS))


def train_multilabel(data: ImageData) -> mr.Classifier:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(),
                                  torch.nn.AvgPool2d(2), torch.nn.Flatten(),
                                  torch.nn.Linear(4 * 64, 3))
        opt = torch.optim.Adam(net.parameters(), lr=1e-2)
        for _ in range(60):
            loss = F.binary_cross_entropy_with_logits(net(data.images), data.labels.float())
            opt.zero_grad()
            loss.backward()
            opt.step()
    return mr.Classifier(net.eval(), bounds=(0.0, 1.0), num_classes=3, task="multilabel")


def test_multilabel_end_to_end(tmp_path: object) -> None:
    train = finding_phantoms(192, "train")
    test = finding_phantoms(48, "test")
    model = train_multilabel(train)
    res = mr.evaluate(model, test, ["pgd"], eps="0,2/255,8/255,32/255", batch_size=24,
                      progress=False, attack_kwargs={"pgd": {"steps": 5}}, gallery=0,
                      out=tmp_path)  # type: ignore[arg-type]
    doc = res.results
    clean = doc["clean"]
    with torch.no_grad():
        pred = (model.module(test.images) > 0).long()
    exact = (pred == test.labels).all(1)
    assert clean["accuracy"]["k"] == int(exact.sum()) > 0
    assert [c["name"] for c in clean["per_class"]] == FINDINGS
    assert [c["k"] for c in clean["per_class"]] == (pred == test.labels).sum(0).tolist()
    e0, *rest = doc["attacks"]["pgd"]["per_eps"]
    assert e0["robust_accuracy"]["k"] == clean["accuracy"]["k"]  # eps 0 changes nothing
    prev = e0
    for e in rest:
        # per finding: never above its clean accuracy; the whole report robust only if each
        # finding survived the attack on all findings
        for c, c0 in zip(e["per_class"], clean["per_class"], strict=True):
            assert c["k"] <= c0["k"]
        assert e["robust_accuracy"]["k"] <= prev["robust_accuracy"]["k"] + 1
        prev = e
    assert rest[-1]["robust_accuracy"]["k"] < clean["accuracy"]["k"]
    assert rest[-1]["success_on_correct"]["n"] == clean["accuracy"]["k"]
    assert doc["attacks"]["pgd"]["kind"] == "multilabel"
    assert (tmp_path / "report.html").is_file()  # type: ignore[operator]


def test_ordinal_grade_shift() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, generator=g)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 5))
    with torch.no_grad():  # grades along one direction: an ordinal model
        net[1].weight.copy_(torch.outer(torch.arange(5.0) - 2, w) * 3)
        net[1].bias.copy_(-(torch.arange(5.0) - 2) ** 2 * 0.5)
    x = 0.3 + 0.4 * torch.rand(50, 1, 4, 4, generator=g)
    with torch.no_grad():
        y = net(x).argmax(1)
    data = ImageData(x, y, (0.0, 1.0), "intensity", "ordinal", [f"grade {i}" for i in range(5)])
    model = mr.Classifier(net, num_classes=5)
    res = mr.evaluate(model, data, ["fgsm"], eps="0,0.02,0.1", batch_size=25, progress=False,
                      gallery=0)
    doc = res.results
    assert doc["clean"]["grade_error"]["mean"] == 0.0
    per = doc["attacks"]["fgsm"]["per_eps"]
    assert per[0]["grade_shift"]["mean"] == 0.0
    shifts = [e["grade_shift"]["mean"] for e in per]
    assert shifts == sorted(shifts) and shifts[-1] > 0
    # by hand: the mean |adversarial grade - clean grade| of FGSM's output
    from medrobust.attacks import FGSM

    r = FGSM(0.1)(model, x, y)
    want = float((r.predictions - y).abs().float().mean())
    assert per[-1]["grade_shift"]["mean"] == pytest.approx(want)
    assert doc["worst_case"][-1]["grade_shift"]["mean"] == pytest.approx(want)
    assert np.isclose(per[-1]["grade_error"]["mean"], want)


def test_robust_auc_of_a_linear_model_by_hand() -> None:
    """Every sample pushed against its class by the full budget: on the linear model the
    attacked logit is ``z -+ eps ||w||_1``; the robust AUC is the AUC of those scores."""
    from evaluation_helpers import linear_data, linear_model, weights

    from medrobust.metrics import medmnist_auc

    data = linear_data()
    res = mr.evaluate(linear_model(), data, ["fgsm"], eps="0,0.01,0.03", batch_size=16,
                      progress=False, gallery=0, robust_auc=True, steps=10)
    block = res.results["robust_auc"]
    w, b = weights()
    z = data.images.flatten(1).double() @ w.double() + b
    y = data.labels
    vals = []
    for e in block["per_eps"]:
        za = torch.where(y == 1, z - e["eps"] * w.double().abs().sum(),
                         z + e["eps"] * w.double().abs().sum())
        p = torch.sigmoid(za).numpy()
        want = medmnist_auc(y.numpy(), np.stack([1 - p, p], 1), "binary")
        assert e["value"] == pytest.approx(want, abs=1e-9)
        assert e["ci_low"] <= e["value"] <= e["ci_high"]
        vals.append(e["value"])
    assert vals[0] == pytest.approx(res.results["clean"]["auc"]["value"])
    assert vals == sorted(vals, reverse=True) and vals[-1] < vals[0]
    with pytest.raises(mr.evaluation.EvaluationError, match="binary"):  # type: ignore[attr-defined]
        three = ImageData(data.images, data.labels, (0.0, 1.0), "intensity", "multi-class",
                          ["a", "b", "c"])
        net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
        mr.evaluate(mr.Classifier(net, num_classes=3), three, ["fgsm"], eps="0", progress=False,
                    robust_auc=True)
