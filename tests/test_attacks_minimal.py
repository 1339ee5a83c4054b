"""Minimum-norm attacks: DeepFool, Carlini-Wagner L2, EAD and L-BFGS.

* Closed-form oracles on an affine multi-class model with the box inactive: the exact minimal L2
  perturbation that leaves class ``y`` is ``min_{j != y} (z_y - z_j) / ||w_y - w_j||_2`` (L-inf:
  with the L1 norm of the weight difference).
* Real data: small CNNs trained on PneumoniaMNIST and RetinaMNIST (``conftest.py``).
* Invariants on 1D/2D/3D inputs: bounds, mask, no side effects, determinism, honest success.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn

import medrobust as mr
from medrobust.attacks import ATTACKS, EAD, LBFGS, CarliniWagnerL2, DeepFool


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # small tensors: one thread avoids oversubscription on a shared machine
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# ----------------------------------------------------------------------------- affine oracle
def affine_problem(scale: float = 10.0, d: int = 20, k: int = 4, n: int = 12):
    """An affine classifier with orthonormal class weights (so every ``||w_y - w_j||`` is equal
    and the runner-up logit is also the nearest boundary: the margin and CE losses then point at the
    nearest boundary), inputs in [-1, 1], bounds (-2, 2) that never bind, and distances ~0.5-1.3
    (large against C&W's first Adam step of ``lr * (hi - lo) / 2`` per element)."""
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(d, k, generator=g))
    w = q.T.contiguous()  # (k, d), orthonormal rows
    y = torch.arange(n) % k
    x = (1.5 * w[y] + 0.25 * torch.randn(n, d, generator=g)).clamp(-1, 1).view(n, 1, d)
    lin = nn.Linear(d, k)
    with torch.no_grad():
        lin.weight.copy_(w * scale)
        lin.bias.zero_()
    net = nn.Sequential(nn.Flatten(), lin)
    model = mr.Classifier(net, bounds=(-2.0, 2.0))
    with torch.no_grad():
        z = net(x)
    assert torch.equal(z.argmax(1), y)
    ws = lin.weight.detach()
    dw = ws[y][:, None, :] - ws[None]  # (n, k, d)
    other = nn.functional.one_hot(y, k).bool()
    gap = z.gather(1, y[:, None]) - z
    exact_l2 = (gap / dw.norm(dim=2)).masked_fill(other, float("inf")).amin(1)
    exact_linf = (gap / dw.abs().sum(2)).masked_fill(other, float("inf")).amin(1)
    return model, x, y, exact_l2, exact_linf


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b) / b).abs().max())


def test_deepfool_l2_and_linf_match_the_closed_form() -> None:
    model, x, y, e2, einf = affine_problem()
    r2 = DeepFool("l2", overshoot=1e-4)(model, x, y)
    assert r2.success.all()
    assert rel_err(r2.perturbation_norms["l2"], e2) < 1e-3
    rinf = DeepFool("linf", overshoot=1e-4)(model, x, y)
    assert rinf.success.all()
    assert rel_err(rinf.perturbation_norms["linf"], einf) < 1e-3


def test_cw_lbfgs_ead_match_the_closed_form() -> None:
    model, x, y, e2, _ = affine_problem()
    cw = CarliniWagnerL2(steps=200)(model, x, y)
    assert cw.success.all()
    assert rel_err(cw.perturbation_norms["l2"], e2) < 0.02
    assert (cw.perturbation_norms["l2"] >= e2 * (1 - 1e-4)).all()  # never below the true minimum
    lb = LBFGS()(model, x, y)
    assert lb.success.all()
    assert rel_err(lb.perturbation_norms["l2"], e2) < 0.02
    ead = EAD(beta=0.0, decision_rule="EN", steps=200)(model, x, y)
    assert ead.success.all()
    assert rel_err(ead.perturbation_norms["l2"], cw.perturbation_norms["l2"]) < 0.02


def test_ead_l1_rule_is_sparser_than_cw() -> None:
    model, x, y, _, _ = affine_problem()
    cw = CarliniWagnerL2(steps=200)(model, x, y)
    ead = EAD(beta=0.1, decision_rule="L1", steps=200)(model, x, y)
    assert ead.success.all()
    assert ead.perturbation_norms["l1"].median() < cw.perturbation_norms["l1"].median()
    assert ead.perturbation_norms["l0"].float().mean() < cw.perturbation_norms["l0"].float().mean()


def test_targeted_on_affine_model_reaches_target() -> None:
    model, x, y, _, _ = affine_problem()
    t = (y + 1) % 4
    for atk in (CarliniWagnerL2(steps=100, binary_search_steps=5),
                EAD(steps=100, binary_search_steps=5), LBFGS(steps=50, search_steps=5)):
        res = atk(model, x, y, target=t)
        assert res.success.all(), type(atk).__name__
        assert torch.equal(res.predictions, t)


def test_deepfool_rejects_target() -> None:
    model, x, y, _, _ = affine_problem()
    with pytest.raises(ValueError, match="untargeted"):
        DeepFool()(model, x, y, target=(y + 1) % 4)


@pytest.mark.parametrize("bad", [
    lambda: DeepFool("l1"), lambda: DeepFool(steps=0), lambda: DeepFool(candidates=1),
    lambda: CarliniWagnerL2(binary_search_steps=0), lambda: CarliniWagnerL2(initial_const=0.0),
    lambda: CarliniWagnerL2(confidence=-1.0), lambda: EAD(decision_rule="L2"),
    lambda: EAD(beta=-1.0), lambda: LBFGS(rtol=2.0), lambda: LBFGS(steps=0),
])
def test_parameters_are_validated(bad: Any) -> None:
    with pytest.raises(ValueError):
        bad()


def test_confidence_gives_a_margin() -> None:
    model, x, y, _, _ = affine_problem()
    res = CarliniWagnerL2(steps=200, confidence=2.0)(model, x, y)
    with torch.no_grad():
        z = model.logits(res.adversarial)
    top2 = z.topk(2, dim=1).values
    assert res.success.all()
    assert ((top2[:, 0] - top2[:, 1]) >= 2.0 - 1e-3).all()


# ------------------------------------------------------------------------------- real data
def _fast(cls: type, **extra: Any) -> Any:
    cfg: dict[str, Any] = {
        DeepFool: {},
        # fewer iterations, and a larger first c so that 5 binary-search steps suffice
        CarliniWagnerL2: {"binary_search_steps": 5, "steps": 50, "initial_const": 0.1},
        EAD: {"binary_search_steps": 5, "steps": 50, "initial_const": 0.1},
        LBFGS: {"steps": 30, "search_steps": 6, "rtol": 0.05, "initial_const": 0.1},
    }[cls]
    cfg.update(extra)
    return cls(**cfg)


def test_pneumonia_model_is_trained(pneumonia_model) -> None:
    m = pneumonia_model
    assert m.clean_accuracy >= m.majority_rate + 0.10


def test_retina_model_is_trained(retina_model) -> None:
    m = retina_model
    assert m.clean_accuracy >= m.majority_rate + 0.10


def test_untargeted_on_pneumonia(pneumonia_model) -> None:
    m = pneumonia_model
    x, y = m.x[:48], m.y[:48]
    results = {cls.__name__: _fast(cls)(m.model, x, y)
               for cls in (DeepFool, CarliniWagnerL2, EAD, LBFGS)}
    for name, res in results.items():
        assert res.success_rate >= 0.95, (name, res.success_rate)
    df = results["DeepFool"].perturbation_norms["l2"]
    cw = results["CarliniWagnerL2"].perturbation_norms["l2"]
    ok = results["DeepFool"].success & results["CarliniWagnerL2"].success
    assert cw[ok].median() < df[ok].median()


def test_untargeted_and_targeted_on_retina(retina_model) -> None:
    m = retina_model
    x, y = m.x[::4], m.y[::4]  # 25 images, 5 per grade
    for cls in (DeepFool, CarliniWagnerL2, EAD, LBFGS):
        res = _fast(cls)(m.model, x, y)
        assert res.success_rate >= 0.95, (cls.__name__, res.success_rate)
    # targets among the grades the model predicts somewhere on the test images (this weak model
    # never outputs the rarest grade, which no attack can then reach)
    reachable = torch.bincount(m.model.predict(m.x), minlength=5).nonzero().flatten()
    assert reachable.numel() >= 3
    target = torch.stack([reachable[(reachable != int(yi)).nonzero().flatten()][i % 2]
                          for i, yi in enumerate(y)])
    for cls in (CarliniWagnerL2, EAD, LBFGS):
        res = _fast(cls, steps=100)(m.model, x, y, target=target)  # a farther goal
        assert res.success_rate >= 0.95, (cls.__name__, res.success_rate)
        assert torch.equal(res.predictions[res.success], target[res.success])


# ------------------------------------------------------------------------------- invariants
class TinyNet(nn.Module):
    def __init__(self, rank: int, channels: int, classes: int) -> None:
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[rank]
        bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[rank]
        self.body = nn.Sequential(conv(channels, 4, 3, padding=1), bn(4), nn.ReLU(),
                                  nn.Dropout(0.5))
        self.head = nn.Linear(4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).flatten(2).mean(2))


FAST_ATTACKS = [
    lambda: DeepFool(**DeepFool.fast_config()),
    lambda: DeepFool("linf", **DeepFool.fast_config()),
    lambda: CarliniWagnerL2(**CarliniWagnerL2.fast_config()),
    lambda: EAD(**EAD.fast_config()),
    lambda: EAD(fista=False, decision_rule="L1", **EAD.fast_config()),
    lambda: LBFGS(**LBFGS.fast_config()),
]


@pytest.mark.parametrize("make", FAST_ATTACKS)
@pytest.mark.parametrize("rank", [1, 2, 3])
def test_invariants(make: Any, rank: int) -> None:
    g = torch.Generator().manual_seed(rank)
    lo, hi = (-1024.0, 3071.0) if rank == 3 else (0.0, 1.0)
    torch.manual_seed(rank)
    net = TinyNet(rank, 2, 3)
    with torch.no_grad():
        net.body[0].weight.mul_(4.0 / (hi - lo))
    net.train()
    net.head.eval()
    net.head.bias.requires_grad_(False)
    model = mr.Classifier(net, bounds=(lo, hi))
    shape = (4, 2) + (5,) * rank
    x = lo + (hi - lo) * torch.rand(shape, generator=g)
    y = torch.randint(0, 3, (4,), generator=g)
    mask = (torch.rand((1, 1) + shape[2:], generator=g) < 0.6).float()
    attack = make()
    targeted = not isinstance(attack, DeepFool)
    target = (y + 1) % 3 if targeted else None
    before = x.clone()
    modes = [mod.training for mod in net.modules()]
    flags = [p.requires_grad for p in net.parameters()]
    rng = torch.get_rng_state()

    for m in (None, mask):
        res = attack(model, x, y, target=target, mask=m)
        adv = res.adversarial
        assert adv.shape == x.shape and adv.dtype == x.dtype
        assert torch.equal(x, before)
        assert float(adv.min()) >= lo and float(adv.max()) <= hi
        if m is not None:
            outside = (m == 0).expand_as(x)
            assert torch.equal(adv[outside], x[outside])
        with model.attack_mode():
            pred = model.logits(adv).argmax(1)
        assert torch.equal(pred, res.predictions)
        goal = pred == target if target is not None else pred != y
        assert torch.equal(goal, res.success)
        # failed samples come back unchanged (C&W, EAD, L-BFGS) or as the last iterate (DeepFool)
        if not isinstance(attack, DeepFool):
            failed = ~res.success
            assert torch.equal(adv[failed], x[failed])
        again = attack(model, x, y, target=target, mask=m)
        assert torch.equal(again.adversarial, adv)
    assert [mod.training for mod in net.modules()] == modes
    assert [p.requires_grad for p in net.parameters()] == flags
    assert all(p.grad is None for p in net.parameters())
    assert torch.equal(torch.get_rng_state(), rng)


def test_registered_and_constructible_without_arguments() -> None:
    for name, cls in (("deepfool", DeepFool), ("carliniwagnerl2", CarliniWagnerL2),
                      ("cw", CarliniWagnerL2), ("ead", EAD), ("lbfgs", LBFGS)):
        assert ATTACKS[name] is cls
        cls()
        cls(**cls.fast_config())
