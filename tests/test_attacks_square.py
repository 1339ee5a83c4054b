"""Square Attack (Andriushchenko et al., "Square Attack: a query-efficient black-box adversarial
attack via random search", ECCV 2020).

* The paper's schedule of square sizes and its L2 pattern ``eta`` (against a loop written as in the
  reference code).
* Score-only: it attacks a model that offers no gradients, which gradient attacks refuse.
* Real data: it lowers the accuracy of an undefended PneumoniaMNIST CNN within its query budget,
  with queries counted per sample (one for a sample misclassified from the start; early exit).
* Any input rank (squares become cubes on volumes, segments on signals), L-inf and L2 budgets,
  targeted goals.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from test_attacks_minimal import affine_problem
from torch import nn

import medrobust as mr
from medrobust.attacks import APGD, Square, get_attack
from medrobust.attacks.square import eta_pattern, p_selection
from medrobust.models.base import Capabilities


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def test_schedule_of_square_sizes() -> None:
    # p_init halves after iterations 10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000 (of 10,000)
    expected = {0: 1, 10: 1, 11: 2, 50: 2, 51: 4, 200: 4, 201: 8, 501: 16, 1001: 32, 2001: 64,
                4001: 128, 6001: 256, 8001: 512, 9999: 512}
    for it, div in expected.items():
        assert p_selection(0.8, it, 10000) == pytest.approx(0.8 / div)
    # rescaled to 1,000 queries the checkpoints come ten times sooner
    assert p_selection(0.8, 6, 1000) == pytest.approx(0.8 / 4)
    assert p_selection(0.8, 6, 1000, rescale=False) == pytest.approx(0.8)


def _eta_reference(s: int) -> torch.Tensor:
    """The reference code's eta (fra31/auto-attack square.py) as a plain loop: nested rectangles
    with weights 1 / (k + 1)^2, top half positive, bottom half negative, unit L2 norm."""

    def rect(x: int, y: int) -> torch.Tensor:
        delta = torch.zeros(x, y)
        cx, cy = x // 2, y // 2
        for k in range(max(x // 2 + 1, y // 2 + 1)):
            delta[max(cx - k, 0):min(cx - k + 2 * k + 1, x),
                  max(cy - k, 0):min(cy - k + 2 * k + 1, y)] += 1.0 / (k + 1) ** 2
        return delta

    out = torch.zeros(s, s)
    out[: s // 2] = rect(s // 2, s)
    out[s // 2:] = -rect(s - s // 2, s)
    return out / out.norm()


@pytest.mark.parametrize("s", [2, 3, 5, 8, 9])
def test_eta_pattern_matches_the_reference(s: int) -> None:
    assert torch.allclose(eta_pattern(s, 2, 0, torch.device("cpu"), torch.float32),
                          _eta_reference(s), atol=1e-6)
    assert torch.allclose(eta_pattern(s, 2, 1, torch.device("cpu"), torch.float32),
                          _eta_reference(s).T, atol=1e-6)
    cube = eta_pattern(s, 3, 2, torch.device("cpu"), torch.float32)
    assert cube.shape == (s, s, s) and torch.isclose(cube.norm(), torch.tensor(1.0))


def test_reduces_accuracy_within_the_query_budget(pneumonia_model) -> None:
    m = pneumonia_model
    x, y = m.x[:48], m.y[:48]
    n_queries = 200
    res = Square(8 / 255, n_queries=n_queries, seed=0)(m.model, x, y)
    clean_wrong = m.model.predict(x) != y
    assert res.robust_accuracy < m.clean_accuracy - 0.2
    q = res.extra["queries"]
    assert q.shape == (48,) and q.dtype == torch.long
    assert (q <= n_queries + 1).all()  # the budget, plus the clean check
    assert (q[clean_wrong] == 1).all()  # already misclassified: no search
    fooled = res.success & ~clean_wrong
    assert fooled.any() and (q[fooled] < n_queries + 1).all()  # early exit per sample
    assert res.backward_passes == 0
    assert int(q.sum()) <= res.forward_passes <= int(q.sum()) + 48
    assert (res.perturbation_norms["linf"] <= 8 / 255 + 1e-6).all()
    ce = Square(8 / 255, n_queries=n_queries, loss="ce", seed=0)(m.model, x[:24], y[:24])
    assert ce.robust_accuracy < m.clean_accuracy - 0.2


class _ScoresOnly(mr.Classifier):
    """A classifier whose gradients are not available (an API returning scores)."""

    def __init__(self, module: nn.Module, bounds: tuple[float, float]) -> None:
        super().__init__(module, bounds=bounds)
        self.capabilities = Capabilities(gradients=False)


def _affine_binary(shape: tuple[int, ...], bounds: tuple[float, float]):
    g = torch.Generator().manual_seed(0)
    d = int(torch.tensor(shape).prod())
    lin = nn.Linear(d, 1)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(1, d, generator=g))
        lin.bias.zero_()
    net = nn.Sequential(nn.Flatten(), lin)
    lo, hi = bounds
    x = lo + (hi - lo) * (0.25 + 0.5 * torch.rand((16, *shape), generator=g))
    with torch.no_grad():
        net[1].bias.fill_(-float(net(x)[:, 0].mean()))  # about half of each class
        f = net(x)[:, 0]
    return net, x, (f > 0).long(), f.abs(), lin.weight.detach().flatten()


@pytest.mark.parametrize("shape", [(1, 64), (2, 6, 6), (1, 4, 5, 6)])
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_score_only_any_rank(shape: tuple[int, ...], norm: str) -> None:
    bounds = (-1024.0, 3071.0)
    net, x, y, margin, w = _affine_binary(shape, bounds)
    model = _ScoresOnly(net, bounds)
    with pytest.raises(TypeError, match="needs input gradients"):
        APGD(1.0, steps=2)(model, x, y)
    dist = margin / (w.abs().sum() if norm == "linf" else w.norm())
    eps = dist * 3.0  # random search: a margin over the minimal distance
    res = Square(eps, norm, n_queries=300, seed=0)(model, x, y)
    assert res.success.all()
    # float32 rounding of x + delta in HU: the base class's tolerance
    assert (res.perturbation_norms[norm] <= eps * (1 + 1e-5) + 1e-6 * (bounds[1] - bounds[0])).all()
    assert not Square(dist * 0.98, norm, n_queries=50, seed=0)(model, x, y).success.any()


def test_targeted() -> None:
    model, x, y, e2, einf = affine_problem()
    target = (y + 1) % 4
    res = Square(float(einf.max()) * 4, n_queries=500, seed=0)(model, x, y, target=target)
    assert res.success.float().mean() >= 0.9
    assert torch.equal(res.predictions[res.success], target[res.success])


def test_registry_and_validation() -> None:
    assert type(get_attack("square", eps=0.1)) is Square
    assert Square.requires_gradients is False
    with pytest.raises(ValueError, match="linf' or 'l2"):
        Square(0.1, "l1")
    with pytest.raises(ValueError, match="p_init"):
        Square(0.1, p_init=0.0)
    with pytest.raises(ValueError, match="n_queries"):
        Square(0.1, n_queries=0)
