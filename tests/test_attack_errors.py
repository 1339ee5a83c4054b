"""Bad input gets a clear ValueError/TypeError naming the problem."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import medrobust as mr
from medrobust.attacks import FGSM, PGD, get_attack


@pytest.fixture()
def setup():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    model = mr.Classifier(net, bounds=(0.0, 1.0))
    x = torch.rand(4, 1, 4, 4)
    y = torch.tensor([0, 1, 2, 0])
    return model, x, y


def test_nan_and_inf_inputs(setup):
    model, x, y = setup
    for bad in (float("nan"), float("inf")):
        xb = x.clone()
        xb[0, 0, 0, 0] = bad
        with pytest.raises(ValueError, match="NaN or Inf"):
            FGSM(eps=0.1)(model, xb, y)


def test_inputs_outside_the_bounds(setup):
    model, x, y = setup
    with pytest.raises(ValueError, match="outside the model's bounds"):
        FGSM(eps=0.1)(model, x * 255, y)


def test_labels_of_the_wrong_length(setup):
    model, x, y = setup
    with pytest.raises(ValueError, match="labels has 3 entries but the batch has 4"):
        FGSM(eps=0.1)(model, x, y[:3])


def test_labels_out_of_range_and_float_labels(setup):
    model, x, y = setup
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\]"):
        FGSM(eps=0.1)(model, x, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(TypeError, match="integer class indices"):
        FGSM(eps=0.1)(model, x, y.float())


def test_integer_inputs_are_rejected(setup):
    model, x, y = setup
    with pytest.raises(TypeError, match="floating-point"):
        FGSM(eps=0.1)(model, (x * 255).to(torch.uint8), y)


@pytest.mark.parametrize("eps", [-0.1, float("nan"), torch.tensor([0.1, -0.2, 0.1, 0.1])])
def test_negative_or_nan_eps(eps):
    with pytest.raises(ValueError, match="eps"):
        PGD(eps=eps)


def test_per_sample_eps_of_the_wrong_length(setup):
    model, x, y = setup
    with pytest.raises(ValueError, match="eps has 3 values but the batch has 4"):
        PGD(eps=torch.tensor([0.1, 0.1, 0.1]), steps=1)(model, x, y)


def test_unknown_norm_loss_and_attack():
    with pytest.raises(ValueError, match="unknown norm 'l7'"):
        PGD(eps=0.1, norm="l7")
    with pytest.raises(ValueError, match="unknown loss 'hinge'"):
        PGD(eps=0.1, loss="hinge")
    with pytest.raises(ValueError, match="unknown attack 'pgdd'"):
        get_attack("pgdd", eps=0.1)
    with pytest.raises(ValueError, match="steps"):
        PGD(eps=0.1, steps=0)


def test_model_output_of_the_wrong_shape():
    model = mr.Classifier(nn.Identity(), bounds=(0.0, 1.0))  # returns (N, 1, 4, 4)
    x = torch.rand(2, 1, 4, 4)
    with pytest.raises(ValueError, match=r"the model returned shape .* expected logits of shape"):
        FGSM(eps=0.1)(model, x, torch.tensor([0, 1]))


def test_num_classes_mismatch():
    model = mr.Classifier(nn.Sequential(nn.Flatten(), nn.Linear(16, 3)), num_classes=5)
    with pytest.raises(ValueError, match="num_classes=5"):
        FGSM(eps=0.1)(model, torch.rand(2, 1, 4, 4), torch.tensor([0, 1]))


def test_target_equal_to_label(setup):
    model, x, y = setup
    target = torch.tensor([1, 1, 0, 2])  # sample 1: target == label
    msg = r"target equals the label for 1 sample\(s\) \(indices \[1\]"
    with pytest.raises(ValueError, match=msg):
        PGD(eps=0.1, steps=1)(model, x, y, target=target)


def test_mask_that_does_not_broadcast(setup):
    model, x, y = setup
    with pytest.raises(ValueError, match="mask of shape .* does not broadcast"):
        FGSM(eps=0.1)(model, x, y, mask=torch.ones(3, 3))


def test_model_that_is_not_wrapped(setup):
    model, x, y = setup
    with pytest.raises(TypeError, match="medrobust.Classifier"):
        FGSM(eps=0.1)(model.module, x, y)  # type: ignore[arg-type]
