"""Black-box models and the query-based attacks (HopSkipJump, SimBA)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import medrobust as mr
from medrobust.attacks import PGD, HopSkipJump, SimBA, get_attack
from medrobust.attacks.score import dct_matrix
from medrobust.models import ModelOutputError


def _linear(dim: int = 16, k: int = 2, seed: int = 0) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(nn.Flatten(), nn.Linear(dim, k))


def _correct(tm, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    ok = (tm.model.predict(tm.x) == tm.y).nonzero().flatten()[:n]
    return tm.x[ok], tm.y[ok]


# ------------------------------------------------------------------ the wrapper
def test_label_oracle_gives_one_hot_rows_and_counts_queries():
    net = _linear(4, 3)
    bb = mr.BlackBox(lambda x: net(x).argmax(1), bounds=(0, 1), output="label", num_classes=3)
    x = torch.rand(5, 1, 2, 2)
    out = bb.logits(x)
    assert torch.equal(out.sum(1), torch.ones(5))
    assert torch.equal(out.argmax(1), net(x).argmax(1))
    assert bb.queries == 5
    assert not bb.capabilities.gradients and not bb.capabilities.scores


def test_probs_become_log_probabilities():
    net = _linear(4, 3)
    bb = mr.BlackBox(lambda x: torch.softmax(net(x), 1), output="probs")
    x = torch.rand(3, 1, 2, 2)
    assert torch.allclose(torch.softmax(bb.logits(x), 1), torch.softmax(net(x), 1), atol=1e-6)
    assert bb.capabilities.scores


@pytest.mark.parametrize(
    ("fn", "output", "match"),
    [
        (lambda x: torch.zeros(x.shape[0], 2, dtype=torch.long), "label", "shape"),
        (lambda x: torch.zeros(x.shape[0] + 1), "label", "shape"),
        (lambda x: torch.full((x.shape[0],), float("nan")), "label", "NaN"),
        (lambda x: torch.full((x.shape[0],), 7), "label", "outside"),
        (lambda x: torch.full((x.shape[0],), 0.5), "label", "non-integer"),
        (lambda x: torch.full((x.shape[0], 2), float("nan")), "logits", "NaN"),
        (lambda x: torch.zeros(x.shape[0]), "logits", "shape"),
        (lambda x: torch.full((x.shape[0], 2), 0.9), "probs", "not probabilities"),
        (lambda x: "cat", "logits", "expected"),
    ],
)
def test_bad_oracle_outputs_are_reported(fn, output, match):
    bb = mr.BlackBox(fn, output=output, num_classes=2)
    with pytest.raises(ModelOutputError, match=match):
        bb.logits(torch.rand(2, 1, 2, 2))


def test_inconsistent_labels_for_the_same_input_are_reported():
    g = torch.Generator().manual_seed(0)
    calls = iter(range(1000))

    def coin(x):  # answers 0, then 1 for the same input
        return torch.full((x.shape[0],), next(calls) % 2)

    bb = mr.BlackBox(coin, output="label", num_classes=2)
    x = torch.rand(1, 1, 3, 3, generator=g)
    bb.logits(x)
    with pytest.raises(ModelOutputError, match="not deterministic"):
        bb.logits(x)
    ok = mr.BlackBox(coin, output="label", num_classes=2, randomized=True)
    ok.logits(x)
    ok.logits(x)
    assert ok.capabilities.randomized


def test_constructor_errors():
    with pytest.raises(ValueError, match="num_classes"):
        mr.BlackBox(lambda x: x, output="label")
    with pytest.raises(ValueError, match="output"):
        mr.BlackBox(lambda x: x, output="scores")
    with pytest.raises(ValueError, match="max_queries"):
        mr.BlackBox(lambda x: x, output="logits", max_queries=0)
    with pytest.raises(TypeError, match="callable"):
        mr.BlackBox(3, output="logits")


def test_gradient_and_score_attacks_refuse_what_they_cannot_use():
    net = _linear(4, 2)
    x, y = torch.rand(2, 1, 2, 2), torch.zeros(2, dtype=torch.long)
    labels_only = mr.BlackBox(lambda z: net(z).argmax(1), output="label", num_classes=2)
    with pytest.raises(TypeError, match="gradients"):
        PGD(0.1, steps=2)(labels_only, x, y)
    with pytest.raises(TypeError, match="labels only"):
        SimBA()(labels_only, x, y)
    scores = mr.BlackBox(net, output="logits")
    with pytest.raises(TypeError, match="gradients"):
        PGD(0.1, steps=2)(scores, x, y)


# ------------------------------------------------------------------ HopSkipJump
def test_hopskipjump_approaches_the_closed_form_distance_of_a_linear_model():
    """For a linear classifier the nearest adversarial point (L2) is at |w.x + b| / ||w||."""
    torch.manual_seed(0)
    lin = nn.Linear(16, 1)
    with torch.no_grad():
        lin.bias.zero_()

    def net(z):
        return lin(z.flatten(1) - 0.5)

    bb = mr.BlackBox(lambda z: (net(z)[:, 0] > 0).long(), output="label", num_classes=2)
    g = torch.Generator().manual_seed(1)
    x = 0.3 + 0.4 * torch.rand(6, 1, 4, 4, generator=g)
    y = (net(x)[:, 0] > 0).long()
    res = HopSkipJump("l2", max_queries=1500, seed=0)(bb, x, y)
    assert bool(res.success.all())
    exact = net(x)[:, 0].abs() / lin.weight.norm()
    found = res.perturbation_norms["l2"]
    assert torch.all(found >= exact * (1 - 1e-4))  # no point closer than the boundary
    assert torch.all(found <= exact * 1.15), (found / exact)
    assert torch.all(res.extra["queries"] <= 1500)


@pytest.mark.parametrize("norm,eps", [("l2", 1.5), ("linf", 12 / 255)])
def test_hopskipjump_succeeds_within_its_query_budget(pneumonia_model, norm, eps):
    x, y = _correct(pneumonia_model, 10)
    net = pneumonia_model.model.module
    bb = mr.BlackBox(lambda z: net(z).argmax(1), output="label", num_classes=2,
                     max_queries=600)
    res = HopSkipJump(norm, eps=eps, seed=0)(bb, x, y)
    assert res.success.float().mean() >= 0.7, res.success
    assert torch.all(res.extra["queries"] <= 600)
    assert res.forward_passes <= 600 * len(x)
    assert torch.all(res.perturbation_norms[norm][res.success] <= eps * (1 + 1e-5))
    # failures are returned clean (the best input within eps that is known)
    assert torch.equal(res.adversarial[~res.success], x[~res.success])


def test_hopskipjump_targeted_reaches_the_target():
    net = _linear(16, 3, seed=2)
    bb = mr.BlackBox(lambda z: net(z).argmax(1), output="label", num_classes=3)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(12, 1, 4, 4, generator=g)
    y = net(x).argmax(1)
    target = (y + 1) % 3
    res = HopSkipJump("linf", max_queries=400, seed=0)(bb, x, y, target=target)
    # the paper starts from an image of the target class: those that have one in the batch succeed
    startable = torch.isin(target, y)
    assert startable.sum() >= 6
    assert bool(res.success[startable].all())
    assert torch.equal(res.predictions[res.success], target[res.success])


def test_max_queries_stops_the_attack_with_its_best_input():
    net = _linear(16, 2, seed=3)
    bb = mr.BlackBox(lambda z: net(z).argmax(1), output="label", num_classes=2, max_queries=40)
    x = torch.rand(5, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    y = net(x).argmax(1)
    res = HopSkipJump("l2", seed=0)(bb, x, y)  # the attack's own budget is larger: the model's wins
    assert torch.all(res.extra["queries"] <= 40)
    assert res.forward_passes == int(res.extra["queries"].sum())
    assert bb.queries == res.forward_passes
    # the returned inputs are adversarial where success is claimed (checked by the base class)
    assert torch.equal(net(res.adversarial).argmax(1) != y, res.success)


# ------------------------------------------------------------------ SimBA
def test_dct_basis_is_orthonormal():
    for n in (1, 5, 28):
        d = dct_matrix(n)
        assert torch.allclose(d @ d.T, torch.eye(n, dtype=d.dtype), atol=1e-10)


@pytest.mark.parametrize("basis", ["pixel", "dct"])
def test_simba_fools_a_score_oracle_within_budget(pneumonia_model, basis):
    x, y = _correct(pneumonia_model, 12)
    net = pneumonia_model.model.module
    bb = mr.BlackBox(lambda z: torch.softmax(net(z), 1), output="probs", max_queries=800)
    res = get_attack("simba", basis=basis, step=0.2, seed=0)(bb, x, y)
    assert res.success.float().mean() >= 0.75
    assert torch.all(res.extra["queries"] <= 800)
    # orthonormal directions: ||delta||_2 <= step * sqrt(directions accepted)
    steps = res.extra["query_trace"].shape[0] - 1
    assert torch.all(res.perturbation_norms["l2"] <= 0.2 * math.sqrt(steps) + 1e-5)


def test_simba_dct_works_on_volumes_and_respects_the_mask():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv3d(1, 2, 3, padding=1), nn.Flatten(), nn.Linear(2 * 60, 3))
    model = mr.Classifier(net)
    x = torch.rand(4, 1, 3, 4, 5, generator=torch.Generator().manual_seed(0))
    y = model.predict(x)
    mask = torch.zeros(1, 1, 3, 4, 5)
    mask[..., :2, :] = 1
    res = SimBA("dct", step=0.5, max_queries=300, seed=1)(model, x, y, mask=mask)
    assert res.success.float().mean() >= 0.75
    assert torch.equal(res.adversarial[(mask == 0).expand_as(x)], x[(mask == 0).expand_as(x)])
    again = SimBA("dct", step=0.5, max_queries=300, seed=1)(model, x, y, mask=mask)
    assert torch.equal(again.adversarial, res.adversarial)


def test_square_from_main_attacks_a_score_black_box(pneumonia_model):
    """The Square attack (reliable-evaluation issue) reused on a score oracle: it needs no
    gradients, its queries are the oracle's."""
    from medrobust.attacks import Square

    x, y = _correct(pneumonia_model, 8)
    net = pneumonia_model.model.module
    bb = mr.BlackBox(lambda z: torch.softmax(net(z), 1), output="probs")
    res = Square(12 / 255, n_queries=200, seed=0)(bb, x, y)
    assert res.forward_passes == bb.queries
    assert res.success.float().mean() >= 0.5
    assert float((res.adversarial - x).abs().max()) <= 12 / 255 + 1e-6


def test_square_respects_the_black_box_query_budget(pneumonia_model):
    """BlackBox(max_queries=q): Square spends at most q queries on any sample (the final check of
    the returned batch is the base class's and counts once more), and returns its best so far."""
    from medrobust.attacks import Square

    x, y = _correct(pneumonia_model, 8)
    net = pneumonia_model.model.module
    bb = mr.BlackBox(lambda z: torch.softmax(net(z), 1), output="probs", max_queries=15)
    res = Square(1 / 255, n_queries=500, restarts=2, seed=0)(bb, x, y)
    spent = res.extra["queries"]
    assert int(spent.max()) <= 15
    assert int(spent[~res.success].min()) == 15  # the failures used their whole budget
    unlimited = Square(1 / 255, n_queries=60, seed=0)(
        mr.BlackBox(lambda z: torch.softmax(net(z), 1), output="probs"), x, y)
    assert int(unlimited.extra["queries"].max()) > 15
