"""Registry-wide invariants: every attack in ``medrobust.attacks.ATTACKS`` is run on random small
models of rank 1D, 2D and 3D, with random bounds, budgets, masks and targets (hypothesis), and must:

* return a tensor of the input's shape, dtype and device, inside the bounds and (for budgeted
  attacks) inside the eps-ball of its norm, per sample;
* leave the masked-out region, the input tensor, the module's train/eval modes, the parameters'
  ``requires_grad`` flags and ``.grad`` fields, and the global random state untouched;
* reproduce bit-identical results with the same seed;
* report ``success`` and ``predictions`` that agree with the model's decisions on ``adversarial``.
"""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import medrobust as mr
from medrobust.attacks import ATTACKS, FixedBudgetAttack
from medrobust.norms import get_norm

ATTACK_NAMES = sorted({cls.name: name for name, cls in ATTACKS.items()}.values())

# Small settings for speed; the attacks' own defaults are the papers' settings.
FAST: dict[str, dict[str, Any]] = {
    "pgd": {"steps": 5, "restarts": 2},
    "bim": {"steps": 5},
    "mifgsm": {"steps": 5},
    "hopskipjump": {"max_queries": 120, "max_iterations": 3, "init_evals": 10, "init_attempts": 5},
    "simba": {"max_queries": 60},
    "universal": {"max_passes": 2, "deepfool_steps": 3},
    "patch": {"steps": 3, "batch_size": 4},
    "rp2": {"steps": 3, "draws": 2, "eval_draws": 2},
}


def build_attack(name: str, eps: Any, norm: str, seed: int):
    cls = ATTACKS[name]
    kwargs: dict[str, Any] = {}
    fast = getattr(cls, "fast_config", None)
    if callable(fast):
        kwargs.update(fast())
    kwargs.update(FAST.get(name, {}))
    params = inspect.signature(cls).parameters
    if issubclass(cls, FixedBudgetAttack):
        kwargs["eps"] = eps
        kwargs["norm"] = norm
    elif "norm" in params and norm in ("l2", "linf") and "norm" not in kwargs:
        kwargs["norm"] = norm
    if "seed" in params:
        kwargs["seed"] = seed
    try:
        return cls(**kwargs)
    except ValueError:
        kwargs.pop("norm", None)
        return cls(**kwargs)


class TinyNet(nn.Module):
    """conv -> BN -> ReLU -> dropout -> pool -> linear, for any rank (1D/2D/3D)."""

    def __init__(self, rank: int, channels: int, outputs: int, scale: float, shift: float):
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[rank]
        bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[rank]
        self.scale, self.shift = scale, shift
        self.features = nn.Sequential(conv(channels, 4, 3, padding=1), bn(4), nn.ReLU(),
                                      nn.Dropout(0.5))
        self.head = nn.Linear(4, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features((x - self.shift) / self.scale)
        return self.head(h.flatten(2).mean(2)).squeeze(-1)


@st.composite
def problems(draw):
    rank = draw(st.sampled_from([1, 2, 3]))
    n = draw(st.integers(1, 4))
    channels = draw(st.integers(1, 3))
    side = draw(st.integers(3, 6)) if rank < 3 else draw(st.integers(2, 4))
    classes = draw(st.sampled_from([1, 2, 3, 5]))  # 1 = binary sigmoid model
    lo, hi = draw(st.sampled_from([(0.0, 1.0), (-1.0, 1.0), (-1024.0, 3071.0), (0.0, 255.0)]))
    norm = draw(st.sampled_from(["linf", "l2", "l1"]))
    per_sample = draw(st.booleans())
    use_mask = draw(st.booleans())
    targeted = draw(st.booleans()) and classes > 1
    seed = draw(st.integers(0, 2**16))
    return dict(rank=rank, n=n, channels=channels, side=side, classes=classes, bounds=(lo, hi),
                norm=norm, per_sample=per_sample, use_mask=use_mask, targeted=targeted, seed=seed)


def make_case(p: dict[str, Any]):
    g = torch.Generator().manual_seed(p["seed"])
    lo, hi = p["bounds"]
    with torch.random.fork_rng():
        torch.manual_seed(p["seed"])
        net = TinyNet(p["rank"], p["channels"], p["classes"], scale=(hi - lo) / 4,
                      shift=(hi + lo) / 2)
    net.train()  # the attack must switch to eval and restore this mode
    net.head.eval()  # ...including a submodule in a different mode
    net.head.bias.requires_grad_(False)
    model = mr.Classifier(net, bounds=(lo, hi))
    shape = (p["n"], p["channels"]) + (p["side"],) * p["rank"]
    x = lo + (hi - lo) * torch.rand(shape, generator=g)
    k = max(2, p["classes"])
    y = torch.randint(0, k, (p["n"],), generator=g)
    target = (y + torch.randint(1, k, (p["n"],), generator=g)) % k if p["targeted"] else None
    scale = (hi - lo) * {"linf": 0.05, "l2": 0.3, "l1": 1.0}[p["norm"]]
    if p["per_sample"]:
        eps: Any = torch.rand(p["n"], generator=g) * scale
    else:
        eps = float(torch.rand(1, generator=g)) * scale
    mask = None
    if p["use_mask"]:
        mask = (torch.rand((1, 1) + shape[2:], generator=g) < 0.5).float()
    return net, model, x, y, target, eps, mask


@pytest.mark.parametrize("name", ATTACK_NAMES)
@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(p=problems())
def test_attack_invariants(name, p):
    cls = ATTACKS[name]
    if p["targeted"] and not getattr(cls, "supports_targeted", True):
        p = dict(p, targeted=False)
    norms = getattr(cls, "supported_norms", None)  # e.g. Square: L-inf and L2 only
    if norms is not None and p["norm"] not in norms:
        p = dict(p, norm=norms[0])
    net, model, x, y, target, eps, mask = make_case(p)
    attack = build_attack(name, eps, p["norm"], p["seed"])
    ranks = getattr(cls, "spatial_ranks", None)
    if ranks is not None and p["rank"] not in ranks:
        with pytest.raises(ValueError, match="spatial"):
            attack(model, x, y, target=target, mask=mask)
        return
    x_before = x.clone()
    modes = [m.training for m in net.modules()]
    flags = [q.requires_grad for q in net.parameters()]
    rng = torch.get_rng_state()

    res = attack(model, x, y, target=target, mask=mask)

    adv = res.adversarial
    assert adv.shape == x.shape and adv.dtype == x.dtype and adv.device == x.device
    assert torch.equal(x, x_before), "the input tensor was modified"
    lo, hi = model.bounds
    assert float(adv.min()) >= lo and float(adv.max()) <= hi, "outside the bounds"
    if mask is not None:
        outside = (mask == 0).expand_as(x)
        assert torch.equal(adv[outside], x[outside]), "changed outside the mask"
    if isinstance(attack, FixedBudgetAttack):
        e = torch.as_tensor(eps, dtype=torch.float32).expand(x.shape[0])
        measured = get_norm(p["norm"]).measure((adv - x).double()).float()
        tol = 1e-5 * e + 1e-6 * (hi - lo)
        assert torch.all(measured <= e + tol), (measured, e)
    assert [m.training for m in net.modules()] == modes, "module modes not restored"
    assert [q.requires_grad for q in net.parameters()] == flags, "requires_grad flags changed"
    assert all(q.grad is None for q in net.parameters()), "a .grad appeared on a parameter"
    assert torch.equal(torch.get_rng_state(), rng), "the global random state was used"

    # success and predictions agree with the model's decisions on the returned tensor
    with model.attack_mode():
        pred = model.logits(adv).argmax(1)
    assert torch.equal(pred, res.predictions)
    goal = pred == target if target is not None else pred != y
    assert torch.equal(goal, res.success)
    assert res.forward_passes >= x.shape[0]

    # the same seed reproduces bit-identical results
    again = build_attack(name, eps, p["norm"], p["seed"])(model, x, y, target=target, mask=mask)
    assert torch.equal(again.adversarial, adv)
    assert torch.equal(again.success, res.success)
