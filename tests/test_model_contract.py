"""The model contract (medrobust.models.base) and the issue-8 guarantees that live in it:
capabilities checked by every attack, multi-label findings as a model kind, NaN/Inf outputs refused,
half precision (inputs and networks), the caller's tensor never handed to the network, numpy
budgets, shape mismatches explained, and a warning for budgets as large as the bounds."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import medrobust as mr
from medrobust.attacks import ATTACKS, FGSM, PGD, DeepFool
from medrobust.criteria import FindingFlip
from medrobust.models import Capabilities, Model, ModelOutputError
from tests.test_invariants import ATTACK_NAMES, build_attack


def _conv_net(channels: int = 1, classes: int = 3, first: nn.Module | None = None) -> nn.Module:
    torch.manual_seed(0)
    layers = [first] if first is not None else []
    layers += [nn.Conv2d(channels, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
               nn.Flatten(), nn.Linear(4, classes)]
    return nn.Sequential(*layers)


def _batch(n: int = 8, c: int = 1, size: int = 8, lo: float = 0.0, hi: float = 1.0):
    g = torch.Generator().manual_seed(1)
    x = lo + (hi - lo) * torch.rand(n, c, size, size, generator=g)
    return x, torch.randint(0, 3, (n,), generator=g)


# ---------------------------------------------------------------- capabilities
class _LabelOnly(Model):
    """A model kind offering neither gradients nor scores (a decision-only oracle)."""

    capabilities = Capabilities(gradients=False, scores=False)
    kind = "label oracle"
    num_classes = 3

    def _standardize(self, out, n):
        return nn.functional.one_hot(out.argmax(1), 3).float()

    def check_labels(self, labels, n, name="labels"):
        return torch.as_tensor(labels).long()

    def check_label_values(self, labels, target, num_outputs):
        pass

    def default_criterion(self, targeted):
        from medrobust.criteria import Misclassification

        return Misclassification()

    def predictions(self, outputs):
        return outputs.argmax(1)


def test_gradient_attack_refuses_a_model_without_gradients():
    model = _LabelOnly(_conv_net())
    x, y = _batch()
    with pytest.raises(TypeError, match="needs input gradients"):
        PGD(eps=0.1, steps=2)(model, x, y)


def test_attack_for_class_outputs_refuses_multilabel_model():
    model = mr.Classifier(_conv_net(classes=4), task="multilabel")
    x, _ = _batch()
    with pytest.raises(TypeError, match="multilabel"):
        DeepFool()(model, x, torch.zeros(8, 4, dtype=torch.long))


def test_non_model_is_refused_with_the_fix():
    with pytest.raises(TypeError, match="Classifier"):
        PGD(eps=0.1)(_conv_net(), *_batch())


# ---------------------------------------------------------------- multi-label
class _Findings(nn.Module):
    """Affine findings model: logit_f = w_f . x + b_f on flattened inputs."""

    def __init__(self, d: int, f: int) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.lin = nn.Linear(d, f)

    def forward(self, x):
        return self.lin(x.flatten(1))


def test_multilabel_one_finding_and_all():
    net = _Findings(16, 3)
    model = mr.Classifier(net, bounds=(-4, 4), task="multilabel")
    x = torch.rand(6, 1, 4, 4) - 0.5
    labels = (net(x) > 0).long().detach()
    res = PGD(eps=3.0, steps=20, seed=0)(model, x, labels, criterion=FindingFlip(finding=1))
    assert res.success.all()
    flipped = res.predictions != labels
    assert flipped[:, 1].all()  # the chosen finding flipped on every sample
    assert res.predictions.shape == labels.shape
    assert res.robust_accuracy == 0.0
    everything = PGD(eps=3.0, steps=40, seed=0, loss="margin")(
        model, x, labels, criterion=FindingFlip(require="all")
    )
    assert everything.success.all()
    assert (everything.predictions != labels).all()
    # a tiny budget flips nothing, and success agrees with the returned decisions
    none = PGD(eps=1e-4, steps=2, seed=0)(model, x, labels)
    assert (none.success == (none.predictions != labels).any(1)).all()


def test_multilabel_labels_are_checked():
    model = mr.Classifier(_Findings(16, 3), task="multilabel")
    x = torch.rand(2, 1, 4, 4)
    with pytest.raises(ValueError, match=r"\(2, F\)"):
        PGD(eps=0.1)(model, x, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="findings per sample"):
        PGD(eps=0.1)(model, x, torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="does not exist"):
        PGD(eps=0.1)(model, x, torch.zeros(2, 3, dtype=torch.long), criterion=FindingFlip(7))


# ---------------------------------------------------------------- numbers
class _NaNNet(nn.Module):
    def forward(self, x):
        out = x.flatten(1)[:, :2] * 0
        return out / out  # 0/0 = NaN


def test_nan_logits_are_an_error_not_a_success():
    model = mr.Classifier(_NaNNet())
    x = torch.rand(4, 1, 3, 3)
    with pytest.raises(ModelOutputError, match="NaN or Inf"):
        PGD(eps=0.1, steps=2)(model, x, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="NaN or Inf"):
        model.predict(x)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("norm,eps", [("linf", 8 / 255), ("l2", 0.5)])
def test_half_precision_inputs_stay_in_budget_in_their_dtype(dtype, norm, eps):
    model = mr.Classifier(_conv_net())
    x, y = _batch(64)
    xh = x.to(dtype)
    res = PGD(eps=eps, norm=norm, steps=5, seed=0)(model, xh, y)
    assert res.adversarial.dtype == dtype
    d = res.adversarial - xh  # measured in the input's own dtype
    if norm == "linf":
        measured = d.abs().flatten(1).amax(1).float()
    else:
        measured = d.float().flatten(1).norm(dim=1)
    assert (measured <= eps).all(), float(measured.max())
    assert (res.perturbation_norms[norm] <= eps).all()
    assert res.adversarial.min() >= 0 and res.adversarial.max() <= 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_network(dtype):
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 3)).to(dtype)
    model = mr.Classifier(net)
    x, y = _batch(16)
    for attack in (FGSM(eps=0.1), PGD(eps=0.1, steps=5, seed=0)):
        res = attack(model, x, y)
        assert res.adversarial.dtype == torch.float32
        assert (res.perturbation_norms["linf"] <= 0.1 + 1e-6).all()
        logits = model.logits(res.adversarial)
        assert logits.dtype == torch.float32
        assert torch.equal(res.predictions, logits.argmax(1))


class _InPlaceDouble(nn.Module):
    def forward(self, x):
        return x.mul_(2.0)


@pytest.mark.parametrize("name", ATTACK_NAMES)
@pytest.mark.parametrize("first", ["relu", "custom"])
def test_network_working_in_place_never_changes_the_callers_tensor(name, first):
    layer = nn.ReLU(inplace=True) if first == "relu" else _InPlaceDouble()
    model = mr.Classifier(_conv_net(first=layer), bounds=(-1.0, 1.0))
    x, y = _batch(3, lo=-1.0, hi=1.0)
    before = x.clone()
    model.predict(x)
    model.logits(x)
    assert torch.equal(x, before)
    attack = build_attack(name, 0.1, "linf", seed=0)
    attack(model, x, y)
    assert torch.equal(x, before)


def test_numpy_budgets_are_accepted():
    model = mr.Classifier(_conv_net())
    x, y = _batch(4)
    a = PGD(eps=np.float32(0.05), steps=2, seed=0)(model, x, y)
    b = PGD(eps=0.05, steps=2, seed=0)(model, x, y)
    assert torch.equal(a.adversarial, b.adversarial)
    per = PGD(eps=np.array([0.0, 0.01, 0.02, 0.05]), steps=2, seed=0)(model, x, y)
    assert (per.perturbation_norms["linf"] <= torch.tensor([0.0, 0.01, 0.02, 0.05]) + 1e-6).all()
    assert float(per.perturbation_norms["linf"][0]) == 0.0


def test_shape_mismatch_names_expected_and_received():
    model = mr.Classifier(_conv_net(channels=1))
    x3 = torch.rand(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"\(N, 3, 8, 8\).*1 channel"):
        PGD(eps=0.1, steps=1)(model, x3, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="add the batch dimension"):
        PGD(eps=0.1, steps=1)(model, torch.rand(1, 8, 8), torch.tensor([0]))


def test_budget_as_large_as_the_bounds_warns():
    model = mr.Classifier(_conv_net(), bounds=(-1024.0, 3071.0))
    x, y = _batch(2, lo=-1024.0, hi=3071.0)
    with pytest.warns(UserWarning, match="whole range"):
        FGSM(eps=5000.0)(model, x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FGSM(eps=20.0)(model, x, y)  # a 20 HU budget is meant
    with pytest.warns(UserWarning, match="whole range"):
        FGSM(eps=4095.0 * 8.0 + 1, norm="l2")(model, x, y)


def test_registry_names_cover_the_capability_flags():
    for cls in set(ATTACKS.values()):
        assert isinstance(cls.requires_gradients, bool)
        assert isinstance(cls.requires_scores, bool)
        assert isinstance(cls.supports_dense, bool)
