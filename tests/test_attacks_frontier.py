"""The minimum-norm frontier: DDN, FMN (L0/L1/L2/L-inf) and ALMA (L2/L1), and scale-free constants
for every minimum-norm attack (C&W, EAD, L-BFGS included).

* Closed-form oracles on an affine model (``test_attacks_minimal.affine_problem``): the minimal
  Lp distance to the boundary between classes ``y`` and ``j`` is ``(z_y - z_j) / ||w_y - w_j||_q``
  with ``q`` the dual norm; the minimal L0 change is the smallest number of coordinates whose
  largest possible moves inside the box close the logit gap.
* Real data: small CNNs trained on PneumoniaMNIST (binary) and RetinaMNIST (5 grades) in
  ``conftest.py``: success and median L2 against DeepFool.
* Scale-free: a model with bounds (-1024, 3071) gives the same success and the same distances in
  units of the span as the same network composed with the affine map onto (0, 1) bounds.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from test_attacks_minimal import affine_problem
from test_attacks_minimal import test_invariants as check_invariants
from torch import nn

import medrobust as mr
from medrobust.attacks import (
    ALMA,
    ATTACKS,
    DDN,
    EAD,
    FMN,
    LBFGS,
    CarliniWagnerL2,
    DeepFool,
    get_attack,
)
from medrobust.attacks.fmn import project_l0


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def per_class_distance(model: mr.Classifier, x: torch.Tensor, y: torch.Tensor, q: float
                       ) -> torch.Tensor:
    """``(n, k)``: the exact distance from each input to the boundary between its class and each
    other class of the affine model, in the norm dual to ``q`` (inf for the class itself)."""
    lin = model.module[1]
    w = lin.weight.detach()
    with torch.no_grad():
        z = model.logits(x)
    dw = w[y][:, None, :] - w[None]
    gap = z.gather(1, y[:, None]) - z
    own = nn.functional.one_hot(y, w.shape[0]).bool()
    return (gap / dw.norm(p=q, dim=2)).masked_fill(own, float("inf"))


def minimal_l0(model: mr.Classifier, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The exact minimal number of changed coordinates: per competing class, sort the coordinates
    by the logit gap each closes when moved to the bound that helps, and count how many close it."""
    lin = model.module[1]
    w = lin.weight.detach()
    lo, hi = model.bounds
    xf = x.flatten(1)
    with torch.no_grad():
        z = model.logits(x)
    best = torch.full((x.shape[0],), float("inf"))
    for j in range(w.shape[0]):
        dw = w[y] - w[j]  # (n, d): moving x_i changes z_y - z_j by dw_i * dx_i
        room = torch.where(dw > 0, xf - lo, hi - xf)
        gain = (dw.abs() * room).sort(1, descending=True).values.cumsum(1)
        gap = (z.gather(1, y[:, None])[:, 0] - z[:, j])
        enough = gain > gap[:, None]
        count = torch.where(enough.any(1), enough.float().argmax(1) + 1.0,
                            torch.full_like(gap, float("inf")))
        best = torch.where(y == j, best, torch.minimum(best, count))
    return best


# ----------------------------------------------------------------------------- affine oracles
def test_ddn_finds_the_minimal_l2_distance_within_5_percent() -> None:
    model, x, y, e2, _ = affine_problem()
    res = DDN(steps=100)(model, x, y)
    assert res.success.all()
    l2 = res.perturbation_norms["l2"]
    assert (l2 <= e2 * 1.05).all() and (l2 >= e2 * (1 - 1e-4)).all()


@pytest.mark.parametrize("norm, q, key", [("l2", 2.0, "l2"), ("linf", 1.0, "linf"),
                                          ("l1", float("inf"), "l1")])
def test_fmn_reaches_the_closed_form_boundary(norm: str, q: float, key: str) -> None:
    """FMN ends on the boundary with the class its margin loss leads to (the runner-up logit), at
    the exact distance to that boundary within 1%, and never below the global minimum."""
    model, x, y, _, _ = affine_problem()
    res = FMN(norm, steps=100)(model, x, y)
    assert res.success.all()
    per = per_class_distance(model, x, y, q)
    reached = per.gather(1, res.predictions[:, None])[:, 0]
    d = res.perturbation_norms[key]
    assert (d <= reached * 1.01).all(), (d / reached)
    assert (d >= per.amin(1) * (1 - 1e-4)).all()
    if norm == "l2":  # orthonormal weights: the runner-up boundary is the nearest one
        assert (d <= per.amin(1) * 1.01).all()


def test_fmn_l0_changes_few_coordinates() -> None:
    model, x, y, _, _ = affine_problem()
    res = FMN("l0", steps=100)(model, x, y)
    assert res.success.all()
    exact = minimal_l0(model, x, y)
    l0 = res.perturbation_norms["l0"].float()
    assert (l0 >= exact).all()
    assert (l0 <= exact + 2).all(), (l0, exact)
    assert l0.median() < x[0].numel() / 2  # sparse: far fewer changes than an L2 attack's 20


def test_alma_finds_the_minimal_distance() -> None:
    model, x, y, e2, _ = affine_problem()
    res = ALMA(steps=100, alpha=0.5)(model, x, y)
    assert res.success.all()
    l2 = res.perturbation_norms["l2"]
    assert (l2 <= e2 * 1.01).all() and (l2 >= e2 * (1 - 1e-4)).all()
    res1 = ALMA("l1", steps=300)(model, x, y)
    assert res1.success.all()
    per = per_class_distance(model, x, y, float("inf"))
    reached = per.gather(1, res1.predictions[:, None])[:, 0]
    l1 = res1.perturbation_norms["l1"]
    assert (l1 <= reached * 1.03).all() and (l1 >= per.amin(1) * (1 - 1e-4)).all()


def test_targeted_variants_hit_the_target_on_the_affine_model() -> None:
    model, x, y, _, _ = affine_problem()
    t = (y + 2) % 4
    exact = per_class_distance(model, x, y, 2.0).gather(1, t[:, None])[:, 0]
    for atk in (DDN(steps=100), FMN("l2", steps=100), FMN("linf", steps=100),
                FMN("l1", steps=100), FMN("l0", steps=100), ALMA(steps=100, alpha=0.5)):
        res = atk(model, x, y, target=t)
        assert res.success.all(), repr(atk)
        assert torch.equal(res.predictions, t)
        if atk.norm.name == "l2":  # the boundary to the target class
            d = res.perturbation_norms["l2"]
            assert (d >= exact * (1 - 1e-4)).all() and (d <= exact * 1.05).all(), repr(atk)


def test_project_l0_keeps_the_largest_elements() -> None:
    d = torch.tensor([[0.1, -3.0, 2.0, 0.5], [1.0, 2.0, 3.0, 4.0]])
    out = project_l0(d, torch.tensor([2.0, 0.0]))
    assert torch.equal(out, torch.tensor([[0.0, -3.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0]]))


def test_ddn_quantization_puts_every_value_on_the_grid() -> None:
    model, x, y, _, _ = affine_problem()
    lo, hi = model.bounds
    xq = lo + (hi - lo) * torch.round((x - lo) / (hi - lo) * 255) / 255  # clean on the grid
    res = DDN(steps=50, levels=256)(model, xq, y)
    assert res.success.all()
    grid = (res.adversarial - lo) / (hi - lo) * 255
    assert torch.allclose(grid, grid.round(), atol=1e-3)
    assert (res.perturbation_norms["l0"] > 0).all()


# ------------------------------------------------------------------------------- real data
def _frontier() -> dict[str, Any]:
    return {"DDN": DDN(steps=50), "FMN": FMN("l2", steps=50),
            "ALMA": ALMA(steps=100, alpha=0.5)}


@pytest.mark.parametrize("which", ["pneumonia", "retina"])
def test_frontier_on_real_cnns_beats_deepfool(which: str, request: pytest.FixtureRequest
                                              ) -> None:
    m = request.getfixturevalue(f"{which}_model")
    correct = (m.model.predict(m.x) == m.y).nonzero().flatten()[:24]
    x, y = m.x[correct], m.y[correct]
    df = DeepFool()(m.model, x, y)
    assert df.success_rate >= 0.95
    df_med = df.perturbation_norms["l2"][df.success].median()
    for name, atk in _frontier().items():
        res = atk(m.model, x, y)
        assert res.success_rate >= 0.95, (name, res.success_rate)
        med = res.perturbation_norms["l2"][res.success].median()
        assert med <= df_med * 1.02, (name, float(med), float(df_med))
    # ALMA's constraint: the DLR on 5 grades, the clean logit range on 2 classes (said so)
    res = ALMA(steps=5)(m.model, x[:2], y[:2])
    assert res.extra["constraint"] == ("clean-range" if which == "pneumonia" else "dlr")


def test_targeted_frontier_on_retina(retina_model) -> None:
    m = retina_model
    x, y = m.x[::4], m.y[::4]
    reachable = torch.bincount(m.model.predict(m.x), minlength=5).nonzero().flatten()
    target = torch.stack([reachable[(reachable != int(yi)).nonzero().flatten()][i % 2]
                          for i, yi in enumerate(y)])
    for atk in (DDN(steps=100), FMN("l2", steps=100), ALMA(steps=200, alpha=0.5)):
        res = atk(m.model, x, y, target=target)
        # ALMA's targeted DLR constraint misses a few of this weak model's far targets (adv-lib's
        # reference ALMA reaches 0.68 in the same setting); DDN and FMN reach them all
        assert res.success_rate >= (0.85 if isinstance(atk, ALMA) else 0.95), repr(atk)
        assert torch.equal(res.predictions[res.success], target[res.success])


# ------------------------------------------------------------------------------- scale-free
class _ToUnit(nn.Module):
    """Hounsfield units (-1024, 3071) -> [0, 1]."""

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return (v + 1024.0) / 4095.0


SCALE_ATTACKS = [
    lambda: CarliniWagnerL2(binary_search_steps=5, steps=50, initial_const=0.1),
    lambda: EAD(binary_search_steps=5, steps=50, initial_const=0.1),
    lambda: LBFGS(steps=30, search_steps=6, rtol=0.05, initial_const=0.1),
    lambda: DDN(steps=30),
    lambda: FMN("l2", steps=30),
    lambda: FMN("linf", steps=30),
    lambda: FMN("l1", steps=30),
    lambda: FMN("l0", steps=100),  # the L0 radius grows by about one element per step
    lambda: ALMA(steps=50, alpha=0.5),
    lambda: ALMA("l1", steps=50, alpha=0.5),
]


@pytest.mark.parametrize("make", SCALE_ATTACKS)
def test_same_result_in_hounsfield_units_as_on_unit_bounds(make: Any, pneumonia_model) -> None:
    m = pneumonia_model
    x, y = m.x[:8], m.y[:8]
    span = 4095.0
    hu = mr.Classifier(nn.Sequential(_ToUnit(), m.model.module), bounds=(-1024.0, 3071.0))
    atk = make()
    r01 = atk(m.model, x, y)
    rhu = atk(hu, x * span - 1024.0, y)
    assert r01.success.float().mean() >= 0.85, repr(atk)
    assert torch.equal(rhu.success, r01.success), repr(atk)
    key = atk.norm.name
    d01 = r01.perturbation_norms[key].double()
    dhu = rhu.perturbation_norms[key].double() / (1.0 if key == "l0" else span)
    ok = r01.success
    assert torch.allclose(dhu[ok], d01[ok], rtol=1e-2, atol=1e-6), (repr(atk), dhu, d01)


# ------------------------------------------------------------------------------- invariants
@pytest.mark.parametrize("make", [
    lambda: DDN(steps=10, levels=256), lambda: FMN("l0", steps=10), lambda: FMN("l1", steps=10),
    lambda: FMN("linf", steps=10), lambda: ALMA("l1", steps=10),
])
@pytest.mark.parametrize("rank", [1, 2, 3])
def test_invariants_of_the_other_norms(make: Any, rank: int) -> None:
    """Bounds (HU for 3D), mask, targets, inputs and model untouched, same result twice, failed
    samples returned clean (the registry-wide test covers the default L2 settings)."""
    check_invariants(make, rank)


# ------------------------------------------------------------------------------- interface
@pytest.mark.parametrize("bad", [
    lambda: DDN(steps=0), lambda: DDN(gamma=1.5), lambda: DDN(init_epsilon=0.0),
    lambda: DDN(levels=1), lambda: FMN("l3"), lambda: FMN(steps=0), lambda: FMN(gamma_init=2.0),
    lambda: FMN(alpha_init=-1.0), lambda: ALMA("linf"), lambda: ALMA(penalty="P42"),
    lambda: ALMA(alpha=1.5), lambda: ALMA(init_lr_distance=-1.0), lambda: ALMA(check_steps=0),
])
def test_parameters_are_validated(bad: Any) -> None:
    with pytest.raises(ValueError):
        bad()


def test_registered_by_name() -> None:
    for name, cls in (("ddn", DDN), ("fmn", FMN), ("alma", ALMA)):
        assert ATTACKS[name] is cls
        assert isinstance(get_attack(name.upper(), **cls.fast_config()), cls)
    assert get_attack("fmn", norm="l0").norm.name == "l0"
