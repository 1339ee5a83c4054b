"""FAB and FAB-T (Croce & Hein, "Minimally distorted adversarial examples with a fast adaptive
boundary attack", ICML 2020).

* The projection onto a hyperplane intersected with the box (L-inf, L2, L1) against scipy's
  solvers (linear programs for L-inf and L1, a constrained least-squares for L2).
* Closed forms: on an affine multi-class model (box inactive) FAB and FAB-T find the exact minimal
  L2 / L-inf / L1 distance within 1%; on a binary affine model whose box is active, the minimal
  distance inside the box, computed by a linear program.
* With ``eps``: samples stop once broken within eps (fewer gradients), and the result says which.
* Real data: FAB's L2 perturbations are smaller than DeepFool's (the paper's claim); targeted FAB
  reaches its target.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from scipy.optimize import linprog, minimize
from test_attacks_minimal import affine_problem, rel_err
from torch import nn

import medrobust as mr
from medrobust.attacks import FAB, FABT, DeepFool, get_attack
from medrobust.attacks.fab import project_hyperplane_box


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# ---------------------------------------------------------------------------- projection
def _lp_min_norm(t: np.ndarray, w: np.ndarray, b: float, norm: str, lo: float, hi: float
                 ) -> float:
    """min ||d|| s.t. w.(t + d) = b, lo <= t + d <= hi, by scipy (the oracle)."""
    d = t.size
    if norm == "l2":
        res = minimize(lambda v: 0.5 * v @ v, np.zeros(d), jac=lambda v: v, method="SLSQP",
                       bounds=list(zip(lo - t, hi - t, strict=True)),
                       constraints=[{"type": "eq", "fun": lambda v: w @ (t + v) - b,
                                     "jac": lambda v: w}],
                       options={"ftol": 1e-12, "maxiter": 500})
        assert res.success
        return float(np.linalg.norm(res.x))
    if norm == "linf":  # variables (d, s): min s, -s <= d_i <= s
        c = np.r_[np.zeros(d), 1.0]
        a_ub = np.block([[np.eye(d), -np.ones((d, 1))], [-np.eye(d), -np.ones((d, 1))]])
        res = linprog(c, A_ub=a_ub, b_ub=np.zeros(2 * d), A_eq=np.r_[w, 0.0][None],
                      b_eq=[b - w @ t], bounds=[*zip(lo - t, hi - t, strict=True), (0, None)])
        assert res.success
        return float(res.fun)
    # l1: d = p - q with p, q >= 0
    c = np.ones(2 * d)
    res = linprog(c, A_eq=np.r_[w, -w][None], b_eq=[b - w @ t],
                  bounds=[(0, max(hi - ti, 0)) for ti in t] + [(0, max(ti - lo, 0)) for ti in t])
    assert res.success
    return float(res.fun)


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
def test_projection_matches_scipy(norm: str) -> None:
    g = torch.Generator().manual_seed(0)
    n, d, lo, hi = 8, 12, 0.0, 1.0
    t = torch.rand(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(n, d, generator=g, dtype=torch.float64)
    w[0, :4] = 0.0  # some coordinates the hyperplane ignores
    # hyperplanes at various distances: near (box inactive) and far (box active)
    b = (w * t).sum(1) + torch.linspace(-1.5, 1.5, n, dtype=torch.float64)
    dvec = project_hyperplane_box(t, w, b, norm, lo, hi)
    z = t + dvec
    assert torch.allclose((w * z).sum(1), b, atol=1e-8)
    assert (z >= lo - 1e-12).all() and (z <= hi + 1e-12).all()
    assert (dvec[0, :4] == 0).all()
    measure = {"linf": lambda v: v.abs().max(), "l2": lambda v: v.norm(),
               "l1": lambda v: v.abs().sum()}
    for i in range(n):
        exact = _lp_min_norm(t[i].numpy(), w[i].numpy(), float(b[i]), norm, lo, hi)
        assert abs(float(measure[norm](dvec[i])) - exact) <= 1e-6 + 1e-5 * exact, (i, exact)


def test_projection_infeasible_follows_the_reference() -> None:
    t = torch.tensor([[0.5, 0.5]], dtype=torch.float64)
    w = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    b = torch.tensor([5.0], dtype=torch.float64)  # the box [0, 1]^2 never reaches w.z = 5
    free = project_hyperplane_box(t, w, b, "l2", 0.0, 1.0)
    assert torch.allclose(free, torch.tensor([[2.0, 2.0]], dtype=torch.float64))  # no box
    corner = project_hyperplane_box(t, w, b, "l1", 0.0, 1.0)
    assert torch.allclose(corner, torch.tensor([[0.5, 0.5]], dtype=torch.float64))


# -------------------------------------------------------------------------------- oracles
def _exact(model: mr.Classifier, x: torch.Tensor, y: torch.Tensor, norm: str) -> torch.Tensor:
    lin = model.module[1]
    ws = lin.weight.detach()
    with torch.no_grad():
        z = model.module(x)
    dw = ws[y][:, None, :] - ws[None]
    dual = {"l2": dw.norm(dim=2), "linf": dw.abs().sum(2), "l1": dw.abs().amax(2)}[norm]
    gap = z.gather(1, y[:, None]) - z
    own = nn.functional.one_hot(y, ws.shape[0]).bool()
    return (gap / dual).masked_fill(own, float("inf")).amin(1)


@pytest.mark.parametrize("norm", ["l2", "linf", "l1"])
@pytest.mark.parametrize("cls", [FAB, FABT])
def test_affine_multiclass_closed_form(cls: type, norm: str) -> None:
    model, x, y, _, _ = affine_problem()
    exact = _exact(model, x, y, norm)
    res = cls(norm, steps=20, seed=0)(model, x, y)
    assert res.success.all()
    assert rel_err(res.perturbation_norms[norm], exact) < 0.01
    assert (res.perturbation_norms[norm] >= exact * (1 - 1e-4)).all()  # never below the optimum


@pytest.mark.parametrize("norm", ["linf", "l1"])
def test_active_box_matches_linear_program(norm: str) -> None:
    # a binary affine model on [0, 1] with inputs near the bounds: the box binds, so the minimal
    # perturbation is the linear program's, not |f| / ||w||_dual
    g = torch.Generator().manual_seed(1)
    d = 10
    w = torch.randn(d, generator=g)
    lin = nn.Linear(d, 1)
    with torch.no_grad():
        lin.weight.copy_(w[None])
        lin.bias.fill_(-0.5 * float(w.sum()))
    model = mr.Classifier(nn.Sequential(nn.Flatten(), lin), bounds=(0.0, 1.0))
    x = (torch.rand(8, 1, d, generator=g) < 0.5).float() * 0.9 + 0.05
    with torch.no_grad():
        f = lin(x.flatten(1))[:, 0]
    y = (f > 0).long()
    res = FAB(norm, steps=30, seed=0)(model, x, y)
    assert res.success.all()
    for i in range(8):
        exact = _lp_min_norm(x[i].flatten().double().numpy(), w.double().numpy(),
                             float(0.5 * w.sum()), norm, 0.0, 1.0)
        got = float(res.perturbation_norms[norm][i])
        assert exact * (1 - 1e-4) <= got <= exact * 1.01 + 1e-6, (i, got, exact)


def test_with_eps_stops_once_broken_within_eps() -> None:
    model, x, y, e2, _ = affine_problem()
    eps = float(e2.median())
    free = FAB("l2", steps=30, seed=0)(model, x, y)
    budget = FAB("l2", steps=30, eps=eps, seed=0)(model, x, y)
    broken = budget.success & (budget.perturbation_norms["l2"] <= eps * (1 + 1e-5))
    assert broken[e2 <= eps / 1.02].all()  # FAB gets within 1% of the minimal distance
    assert not broken[e2 > eps].any()  # and never below it
    assert budget.backward_passes < free.backward_passes  # broken samples left the loop


def test_targeted_reaches_the_target() -> None:
    model, x, y, e2, _ = affine_problem()
    target = (y + 2) % 4
    res = FAB("l2", steps=30, seed=0)(model, x, y, target=target)
    assert res.success.all()
    assert torch.equal(res.predictions, target)
    assert (res.perturbation_norms["l2"] >= e2 * (1 - 1e-4)).all()


# ------------------------------------------------------------------------------ real data
def test_smaller_than_deepfool_on_pneumonia(pneumonia_model) -> None:
    m = pneumonia_model
    x, y = m.x[:48], m.y[:48]
    fab = FAB("l2", steps=10, seed=0)(m.model, x, y)
    df = DeepFool(steps=10)(m.model, x, y)
    assert fab.success_rate >= 0.9
    ok = fab.success & df.success
    assert fab.perturbation_norms["l2"][ok].median() < df.perturbation_norms["l2"][ok].median()


def test_registry_and_validation() -> None:
    assert type(get_attack("fab")) is FAB
    assert type(get_attack("fab-t", norm="l2")) is FABT
    with pytest.raises(ValueError, match="beta"):
        FAB(beta=1.0)
    with pytest.raises(ValueError, match="eta"):
        FAB(eta=0.5)
    with pytest.raises(ValueError, match="unknown norm"):
        FAB("l0")
