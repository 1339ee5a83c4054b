"""The Classifier wrapper: normalization inside, binary sigmoid models, chunking, eval mode."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import medrobust as mr
from medrobust.attacks import PGD


def test_normalization_happens_inside_any_rank():
    net = nn.Identity()
    for shape in [(2, 3, 5), (2, 3, 4, 4), (2, 3, 2, 3, 3)]:
        m = mr.Classifier(nn.Sequential(nn.Flatten(), nn.Identity()), bounds=(0, 1),
                          mean=[0.1, 0.2, 0.3], std=[0.5, 0.5, 0.25])
        x = torch.rand(shape)
        mean = torch.tensor([0.1, 0.2, 0.3]).view((1, 3) + (1,) * (len(shape) - 2))
        std = torch.tensor([0.5, 0.5, 0.25]).view((1, 3) + (1,) * (len(shape) - 2))
        assert torch.allclose(m(x), ((x - mean) / std).flatten(1))
    assert net is not None


def test_binary_sigmoid_output_becomes_two_classes():
    lin = nn.Linear(4, 1)
    for module in [nn.Sequential(lin), nn.Sequential(lin, nn.Flatten(0))]:
        m = mr.Classifier(module, bounds=(-1, 1))
        x = torch.rand(6, 4) * 2 - 1
        logits = m(x)
        assert logits.shape == (6, 2)
        p1 = torch.sigmoid(lin(x)).squeeze(1)
        assert torch.allclose(logits.softmax(1)[:, 1], p1, atol=1e-6)


def test_chunked_logits_and_gradients_equal_unchunked():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3))
    x = torch.rand(10, 1, 6, 6)
    y = torch.randint(0, 3, (10,))
    big = mr.Classifier(net, bounds=(0, 1))
    small = mr.Classifier(net, bounds=(0, 1), chunk_size=3)
    assert torch.allclose(big.logits(x), small.logits(x), atol=1e-6)
    r1 = PGD(eps=0.1, steps=3, seed=0)(big, x, y)
    r2 = PGD(eps=0.1, steps=3, seed=0)(small, x, y)
    assert torch.allclose(r1.adversarial, r2.adversarial, atol=1e-5)


def test_attack_mode_restores_every_submodule():
    net = nn.Sequential(nn.Linear(4, 4), nn.Dropout(), nn.Linear(4, 2))
    net.train()
    net[1].eval()
    m = mr.Classifier(net, bounds=(0, 1))
    with m.attack_mode():
        assert not any(mod.training for mod in net.modules())
    assert [mod.training for mod in net.modules()] == [True, True, False, True]


def test_result_properties():
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    m = mr.Classifier(net, bounds=(0, 1))
    x = torch.rand(8, 1, 2, 2)
    y = m.predict(x)
    res = PGD(eps=0.0, steps=2, seed=0)(m, x, y)
    assert res.robust_accuracy == 1.0 and res.success_rate == 0.0
    assert torch.equal(res.adversarial, x)
    assert res.perturbation_norms["l0"].sum() == 0
    assert set(res.perturbation_norms) >= {"linf", "l2", "l1", "l0"}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(bounds=(1, 0)), "lo < hi"),
        (dict(bounds="x"), "pair"),
        (dict(std=[0.0]), "positive"),
        (dict(num_classes=1), "num_classes"),
        (dict(chunk_size=0), "chunk_size"),
    ],
)
def test_classifier_rejects_bad_arguments(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        mr.Classifier(nn.Linear(2, 2), **kwargs)
