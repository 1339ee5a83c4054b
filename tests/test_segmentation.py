"""Segmenters under attack: the Segmenter wrapper, dense criteria, DAG and CosPGD, the core's
gradient attacks with per-pixel losses, and the guarantees (bounds, budget, mask, no mutation,
mode restored, seeds) on 2D and 3D label maps.

The models are tiny fully convolutional networks trained here, in a few seconds on one thread, on
the built-in phantoms (:mod:`medrobust.data.phantoms`, lesion masks as labels). The 2D phantoms
have little noise and a low-contrast lesion (20 HU against 2 HU noise, in the soft-tissue window
mapped to [0, 1]), so that a network this small segments it well and an L-inf budget of 8/255
(about 12.5 HU, less than the lesion's contrast) is a meaningful attacker: with the default
60 HU lesions a three-layer network is too robust at 8/255 for the papers' claims to be tested.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import medrobust as mr
from medrobust.attacks import (
    ALMA,
    APGD,
    BIM,
    DAG,
    DDN,
    EAD,
    FAB,
    FGSM,
    FMN,
    JSMA,
    LBFGS,
    MIFGSM,
    PGD,
    CarliniWagnerL2,
    CosPGD,
    DeepFool,
    OnePixel,
    Square,
    StAdv,
    get_attack,
)
from medrobust.attacks.dense import _CosineWeighted
from medrobust.criteria import (
    DiceBelow,
    Misclassification,
    PixelFraction,
    TargetMask,
    dice_per_class,
    inject_target,
    remove_target,
)
from medrobust.data.phantoms import make_phantoms
from medrobust.models import SlidingWindow


def _fcn(dim: int, width: int) -> nn.Module:
    conv = nn.Conv2d if dim == 2 else nn.Conv3d
    return nn.Sequential(
        conv(1, width, 3, padding=1), nn.ReLU(),
        conv(width, width, 3, padding=2, dilation=2), nn.ReLU(),
        conv(width, width, 3, padding=4, dilation=4), nn.ReLU(),
        conv(width, 2, 1),
    )


def _train(net: nn.Module, x: torch.Tensor, y: torch.Tensor, mean: float, std: float,
           epochs: int, seed: int, batch: int = 32) -> nn.Module:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            opt = torch.optim.Adam(net.parameters(), lr=1e-2)
            weight = torch.tensor([1.0, 4.0])
            xn = (x - mean) / std
            for _ in range(epochs):
                perm = torch.randperm(len(x))
                for i in range(0, len(x), batch):
                    b = perm[i:i + batch]
                    loss = F.cross_entropy(net(xn[b]), y[b], weight=weight)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
    finally:
        torch.set_num_threads(threads)
    net.zero_grad(set_to_none=True)
    net.eval()
    return net


@dataclass
class Seg:
    model: mr.Segmenter
    x: torch.Tensor
    y: torch.Tensor


@pytest.fixture(scope="module")
def seg2d() -> Seg:
    """A 2D phantom segmenter (inputs in [0, 1]); 32 held-out phantoms, each with a lesion."""
    d = make_phantoms(160, 32, task="segmentation", seed=1, lesion_fraction=1.0,
                      lesion_contrast=20.0, lesion_radius=(0.1, 0.18), n_organs=0, noise=2.0,
                      texture=2.0)
    mean, std = float(d.images.mean()), float(d.images.std())
    with torch.random.fork_rng():
        torch.manual_seed(1)
        net = _fcn(2, 16)
    net = _train(net, d.images[:128], d.labels[:128], mean, std, epochs=40, seed=1)
    model = mr.Segmenter(net, bounds=(0.0, 1.0), mean=mean, std=std, num_classes=2)
    return Seg(model, d.images[128:], d.labels[128:])


@pytest.fixture(scope="module")
def seg3d() -> Seg:
    """A 3D phantom segmenter (5-D inputs, 16^3 voxels); 4 held-out volumes."""
    d = make_phantoms(24, 16, dim=3, task="segmentation", seed=1, lesion_fraction=1.0,
                      lesion_contrast=40.0, lesion_radius=(0.15, 0.25), n_organs=0, noise=4.0,
                      texture=4.0)
    mean, std = float(d.images.mean()), float(d.images.std())
    with torch.random.fork_rng():
        torch.manual_seed(1)
        net = _fcn(3, 4)
    net = _train(net, d.images[:20], d.labels[:20], mean, std, epochs=15, seed=1, batch=4)
    model = mr.Segmenter(net, bounds=(0.0, 1.0), mean=mean, std=std, num_classes=2,
                         chunk_size=2)
    return Seg(model, d.images[20:], d.labels[20:])


def _lesion_dice(model: mr.Segmenter, x: torch.Tensor, y: torch.Tensor) -> float:
    return float(dice_per_class(model.predict(x), y, 2)[:, 1].nanmean())


# ------------------------------------------------------------------------------ the wrapper
def test_segmenter_outputs_and_predictions(seg2d: Seg) -> None:
    m = seg2d.model
    assert m.capabilities.output == "dense"
    z = m.logits(seg2d.x[:3])
    assert z.shape == (3, 2, 32, 32)
    assert torch.equal(m.predict(seg2d.x[:3]), z.argmax(1))
    # the trained phantom segmenter really segments
    assert _lesion_dice(m, seg2d.x, seg2d.y) > 0.6


def test_one_sigmoid_channel_is_two_classes() -> None:
    net = nn.Conv2d(1, 1, 1)
    m = mr.Segmenter(net)
    x = torch.rand(2, 1, 8, 8)
    z = m.logits(x)
    assert z.shape == (2, 2, 8, 8)
    assert torch.equal(z[:, 0], torch.zeros_like(z[:, 0]))
    with torch.no_grad():
        assert torch.allclose(torch.softmax(z, 1)[:, 1], torch.sigmoid(net(x))[:, 0], atol=1e-6)


def test_bad_outputs_are_explained() -> None:
    with pytest.raises(mr.models.ModelOutputError, match="num_classes=3"):
        mr.Segmenter(nn.Conv2d(1, 2, 1), num_classes=3).logits(torch.rand(1, 1, 4, 4))

    class Flat(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.flatten(1)

    with pytest.raises(mr.models.ModelOutputError, match="per-pixel logits"):
        mr.Segmenter(Flat()).logits(torch.rand(1, 1, 4, 4))


def test_label_map_shape_mismatch_is_an_error(seg2d: Seg) -> None:
    x, y = seg2d.x[:2], seg2d.y[:2]
    with pytest.raises(ValueError, match=r"spatial shape \(30, 32\).*output is \(32, 32\)"):
        PGD(4 / 255, steps=2)(seg2d.model, x, y[:, :30])
    with pytest.raises(ValueError, match=r"label maps are \(N, H, W\)"):
        PGD(4 / 255, steps=2)(seg2d.model, x, y[:, 0])
    with pytest.raises(TypeError, match="integer label maps"):
        PGD(4 / 255, steps=2)(seg2d.model, x, y.float())
    with pytest.raises(ValueError, match="2 label maps but the batch has 1"):
        PGD(4 / 255, steps=2)(seg2d.model, x[:1], y)
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        PGD(4 / 255, steps=2)(seg2d.model, x, y * 2)
    with pytest.raises(ValueError, match="target equals the label at every voxel"):
        PGD(4 / 255, steps=2)(seg2d.model, x, y, target=y)
    # a channel axis of one (MONAI's mask layout) is accepted
    res = FGSM(1 / 255)(seg2d.model, x, y.unsqueeze(1))
    assert res.labels.shape == (2, 32, 32)


def test_remove_and_inject_targets() -> None:
    y = torch.zeros(2, 6, 6, dtype=torch.long)
    y[:, 1:3, 1:3] = 1
    y[:, 4, 4] = 2
    t = remove_target(y, 1)
    assert (t == 1).sum() == 0 and torch.equal(t[y != 1], y[y != 1])
    assert torch.equal(t[y == 1], torch.zeros(8, dtype=torch.long))
    region = torch.zeros(6, 6, dtype=torch.bool)
    region[3:5, 0:2] = True
    t2 = inject_target(y, region, 2)
    assert bool((t2[:, 3:5, 0:2] == 2).all()) and torch.equal(t2[:, ~region], y[:, ~region])
    y[1] = 0
    with pytest.raises(ValueError, match=r"class 1\) is empty in 1 sample\(s\) \(indices \[1\]\)"):
        remove_target(y, 1)
    with pytest.raises(ValueError, match="background"):
        remove_target(y, 0)
    with pytest.raises(ValueError, match="does not broadcast"):
        inject_target(y, torch.ones(5, 5, dtype=torch.bool), 1)
    with pytest.raises(ValueError, match="region to inject is empty"):
        inject_target(y, torch.zeros(6, 6, dtype=torch.bool), 1)


# ------------------------------------------------------------------------------ criteria
def test_dense_criteria_closed_form() -> None:
    # 1 sample, 2 classes, 4 voxels; the prediction is class 1 where the logit of 1 is larger
    logits = torch.tensor([[[2.0, 0.0, 0.0, 3.0], [0.0, 1.0, 2.0, 0.0]]]).view(1, 2, 2, 2)
    labels = torch.tensor([[0, 1, 1, 1]]).view(1, 2, 2)  # prediction [0, 1, 1, 0]
    idx = torch.arange(1)
    pf = PixelFraction(0.25).bind(labels, None, "ce")
    assert pf.voxel_success(logits, idx).sum() == 1
    assert bool(pf.is_adversarial(logits, idx))
    assert not bool(PixelFraction(0.5).bind(labels, None, "ce").is_adversarial(logits, idx))
    # the margin is > 0 exactly when adversarial: 1 of 4 voxels flipped, by a margin of 3
    assert float(pf.margin(logits, idx)) == pytest.approx(3.0)
    assert float(PixelFraction(0.5).bind(labels, None, "ce").margin(logits, idx)) < 0
    expected = F.cross_entropy(logits, labels, reduction="none").mean()
    assert float(pf.loss(logits, idx)) == pytest.approx(float(expected))
    # margin loss: max_{j != y} z_j - z_y per voxel, clipped at 0: [-2, -1, -2, 0] -> mean -1.25
    pm = PixelFraction(0.25).bind(labels, None, "margin")
    assert float(pm.loss(logits, idx)) == pytest.approx(-1.25)
    # DiceBelow averages over the structure's voxels (1, 2, 3) only
    ce = F.cross_entropy(logits, labels, reduction="none").flatten()
    dce = DiceBelow(1, 0.5).bind(labels, None, "ce")
    assert float(dce.loss(logits, idx)) == pytest.approx(float(ce[1:].mean()))
    # Dice of class 1: prediction {1, 2}, label {1, 2, 3} -> 2*2/(2+3) = 0.8
    db = DiceBelow(1, 0.85).bind(labels, None, "ce")
    assert float(db.dice(logits, idx)) == pytest.approx(0.8)
    assert bool(db.is_adversarial(logits, idx))
    assert not bool(DiceBelow(1, 0.8).bind(labels, None, "ce").is_adversarial(logits, idx))
    d = dice_per_class(logits.argmax(1), labels, 2)
    assert d[0, 1] == pytest.approx(0.8) and d[0, 0] == pytest.approx(2 / 3)
    # the target equals the label at voxels 0 and 1; active voxels 2 and 3 (targets 0 and 1)
    target = torch.tensor([[0, 1, 0, 0]]).view(1, 2, 2)
    tm = TargetMask(0.5).bind(labels, target, "ce")
    assert tm.active(idx).sum() == 2
    assert float(tm.reached(logits, idx)) == pytest.approx(0.5)  # voxel 3 reached, 2 not
    assert bool(tm.is_adversarial(logits, idx))
    assert not bool(TargetMask().bind(labels, target, "ce").is_adversarial(logits, idx))
    assert float(TargetMask().bind(labels, target, "ce").margin(logits, idx)) == pytest.approx(-2)
    with pytest.raises(ValueError, match="targeted criterion: pass target"):
        TargetMask().bind(labels, None, "ce")
    with pytest.raises(ValueError, match="label maps"):
        PixelFraction().bind(torch.tensor([0, 1]), None, "ce")


def test_cospgd_weights_are_the_cosine_similarity() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 4, 4, generator=g)
    labels = torch.randint(0, 3, (2, 4, 4), generator=g)
    idx = torch.arange(2)
    inner = PixelFraction().bind(labels, None, "ce")
    p = torch.softmax(logits, 1)
    cos = p.gather(1, labels.unsqueeze(1))[:, 0] / p.norm(dim=1)  # cos(p, e_y) = p_y / ||p||
    ce = F.cross_entropy(logits, labels, reduction="none")
    expected = (cos * ce).flatten(1).mean(1)
    assert torch.allclose(_CosineWeighted(inner).loss(logits, idx), expected, atol=1e-6)
    target = (labels + 1) % 3
    inner_t = TargetMask().bind(labels, target, "ce")
    cos_t = p.gather(1, target.unsqueeze(1))[:, 0] / p.norm(dim=1)
    ce_t = F.cross_entropy(logits, target, reduction="none")
    expected_t = (-(1 - cos_t) * ce_t).flatten(1).mean(1)
    assert torch.allclose(_CosineWeighted(inner_t).loss(logits, idx), expected_t, atol=1e-6)
    # class outputs: each sample's loss weighted by cos(softmax(z), e_y)
    z = torch.randn(4, 3, generator=g)
    yc = torch.tensor([0, 1, 2, 0])
    pc = torch.softmax(z, 1)
    w = pc.gather(1, yc.unsqueeze(1))[:, 0] / pc.norm(dim=1)
    crit = Misclassification().bind(yc, None, "ce")
    assert torch.allclose(_CosineWeighted(crit).loss(z, torch.arange(4)),
                          w * F.cross_entropy(z, yc, reduction="none"), atol=1e-6)


def test_criteria_match_the_model_kind(seg2d: Seg) -> None:
    with pytest.raises(TypeError, match="needs a dense criterion"):
        PGD(4 / 255, steps=2)(seg2d.model, seg2d.x[:1], seg2d.y[:1], criterion=Misclassification())
    with torch.random.fork_rng():
        torch.manual_seed(0)
        clf = mr.Classifier(nn.Sequential(nn.Flatten(), nn.Linear(16, 3)), num_classes=3)
    x, y = torch.rand(2, 1, 4, 4), torch.tensor([0, 2])
    with pytest.raises(TypeError, match="criterion for dense outputs"):
        PGD(4 / 255, steps=2)(clf, x, y, criterion=PixelFraction())
    res = PGD(1 / 255, steps=1)(clf, x, y)
    assert res.voxel_success is None and res.dice is None
    # on a classifier a sample is one "pixel": unbounded DAG flips every prediction
    res = DAG(max_iter=500)(clf, x, y)
    assert bool(res.success.all()) and torch.equal(res.extra["active_left"], torch.zeros(2).long())
    res = CosPGD(0.9, steps=20, seed=0)(clf, x, y, target=(y + 1) % 3)
    assert bool(res.success.all())


# ------------------------------------------------------------------------------ attacks
def test_dense_pgd_lowers_dice_monotonically_with_eps(seg2d: Seg) -> None:
    x, y = seg2d.x[:16], seg2d.y[:16]
    dice = []
    for eps in (0.0, 2 / 255, 4 / 255, 8 / 255):
        res = PGD(eps, steps=10, seed=0)(seg2d.model, x, y, criterion=DiceBelow(1, 0.5))
        assert res.dice is not None and res.dice.shape == (16, 2)
        dice.append(float(res.dice[:, 1].nanmean()))
    assert dice[0] == pytest.approx(_lesion_dice(seg2d.model, x, y))
    assert all(a >= b for a, b in zip(dice, dice[1:], strict=False)), dice
    assert dice[-1] < 0.5 * dice[0], dice


def test_dag_reaches_the_target_mask(seg2d: Seg) -> None:
    """Xie et al.: DAG fools (nearly) every targeted pixel; here removal targets at 8/255."""
    x, y = seg2d.x, seg2d.y
    target = remove_target(y, 1)
    res = DAG(8 / 255)(seg2d.model, x, y, target=target)
    assert float(res.perturbation_norms["linf"].max()) <= 8 / 255 + 1e-6
    active = target != y
    assert res.voxel_success is not None
    reached = float((res.voxel_success & active).sum() / active.sum())
    assert reached >= 0.9, reached
    # active sets: a sample whose set emptied left the loop before max_iter
    done = res.extra["active_left"] == 0
    assert bool(done.any()) and bool((res.extra["iterations"][done] < 200).all())
    # the success flags are the criterion's (>= 99% of the active voxels)
    hit = ((res.predictions == target) & active).flatten(1).sum(1) / active.flatten(1).sum(1)
    assert torch.equal(res.success, hit >= 0.99)


def test_removal_drives_the_predicted_volume_near_zero(seg2d: Seg) -> None:
    x, y = seg2d.x[:16], seg2d.y[:16]
    clean = int((seg2d.model.predict(x) == 1).sum())
    target = remove_target(y, 1)
    for attack in (PGD(8 / 255, steps=20, seed=0), CosPGD(8 / 255, steps=20, seed=0)):
        res = attack(seg2d.model, x, y, target=target)
        volume = int((res.predictions == 1).sum())
        assert volume <= 0.02 * clean, (type(attack).__name__, volume, clean)
        # the rest of the segmentation is kept (TargetMask drives every voxel to its target)
        assert float((res.predictions == target).float().mean()) > 0.98


def test_injection_makes_the_region_the_structure(seg2d: Seg) -> None:
    """A disk of radius 3 (29 voxels) in lesion-free tissue, targeted to "lesion": nothing there
    is predicted as lesion before; at 8/255 (less than the lesion's contrast) most of the disk
    is, and above the contrast (16/255) nearly all of it."""
    x, y = seg2d.x[:8], seg2d.y[:8]
    region = torch.zeros(8, 32, 32, dtype=torch.bool)
    yy, xx = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    for i in range(8):  # a disk in the body, in the half without the lesion
        cy, cx = (8, 16) if int(y[i, :16].sum()) < int(y[i, 16:].sum()) else (24, 16)
        region[i] = (yy - cy) ** 2 + (xx - cx) ** 2 <= 9
    region &= (y == 0) & (x[:, 0] > 0.3)
    target = inject_target(y, region, 1)

    def covered(pred: torch.Tensor) -> float:
        return float(((pred == 1) & region).sum() / region.sum())

    assert covered(seg2d.model.predict(x)) == 0.0
    res = DAG(8 / 255, max_iter=100)(seg2d.model, x, y, target=target)
    assert covered(res.predictions) >= 0.75
    res = PGD(8 / 255, steps=20, seed=0)(seg2d.model, x, y, target=target,
                                         criterion=TargetMask(over="active"))
    assert covered(res.predictions) >= 0.75
    res = DAG(16 / 255, max_iter=100)(seg2d.model, x, y, target=target)
    assert covered(res.predictions) >= 0.85
    # outside the region, the segmentation is hardly touched
    keep = ~region
    assert float((res.predictions[keep] == y[keep]).float().mean()) > 0.97


def test_untargeted_attacks_on_a_segmenter(seg2d: Seg) -> None:
    x, y = seg2d.x[:8], seg2d.y[:8]
    clean = _lesion_dice(seg2d.model, x, y)
    for attack in (FGSM(8 / 255), BIM(8 / 255), MIFGSM(8 / 255), PGD(8 / 255, steps=10, seed=0),
                   APGD(8 / 255, steps=10, seed=0), CosPGD(8 / 255, steps=10, seed=0),
                   DAG(8 / 255, max_iter=50)):
        res = attack(seg2d.model, x, y, criterion=DiceBelow(1, 0.5))
        assert res.dice is not None
        assert float(res.dice[:, 1].nanmean()) < clean - 0.2, type(attack).__name__
        assert torch.equal(res.success, res.dice[:, 1] < 0.5)
    # the default criterion: PixelFraction(0.5) (half the voxels changed: not at 8/255 here)
    res = PGD(8 / 255, steps=5, seed=0)(seg2d.model, x, y)
    assert res.voxel_success is not None
    frac = res.voxel_success.flatten(1).float().mean(1)
    assert torch.equal(res.success, frac >= 0.5)
    assert torch.equal(res.voxel_success, res.predictions != y)


def test_attacks_without_dense_support_refuse_a_segmenter(seg2d: Seg) -> None:
    x, y = seg2d.x[:1], seg2d.y[:1]
    for attack in (DeepFool(), CarliniWagnerL2(steps=2, binary_search_steps=1), EAD(steps=2),
                   LBFGS(), DDN(), FMN(), ALMA(), FAB(), JSMA(), OnePixel(), StAdv(),
                   Square(8 / 255)):
        with pytest.raises(TypeError, match="supports_dense"):
            attack(seg2d.model, x, y)
    assert isinstance(get_attack("dag", eps=0.1), DAG)
    assert isinstance(get_attack("cospgd", eps=0.1), CosPGD)


# ------------------------------------------------------------------------------ invariants, 3D
ATTACKS_3D = [
    lambda: FGSM(4 / 255),
    lambda: BIM(4 / 255, steps=3),
    lambda: MIFGSM(4 / 255, steps=3),
    lambda: PGD(4 / 255, steps=3, seed=0),
    lambda: CosPGD(4 / 255, steps=3, seed=0),
    lambda: DAG(4 / 255, max_iter=5),
]


@pytest.mark.parametrize("make", ATTACKS_3D)
@pytest.mark.parametrize("targeted", [False, True])
def test_invariants_on_volumes(seg3d: Seg, make, targeted: bool) -> None:
    model, x, y = seg3d.model, seg3d.x, seg3d.y
    assert x.dim() == 5
    target = remove_target(y, 1) if targeted else None
    mask = torch.zeros_like(x)
    mask[..., 4:12, 4:12, 4:12] = 1
    x_before, y_before = x.clone(), y.clone()
    model.module.train()
    try:
        res = make()(model, x, y, target=target, mask=mask)
        # the module's mode (every submodule) is restored, its parameters get no gradient
        assert all(m.training for m in model.module.modules())
        assert all(p.grad is None for p in model.module.parameters())
    finally:
        model.module.eval()
    assert torch.equal(x, x_before) and torch.equal(y, y_before)
    adv = res.adversarial
    assert adv.shape == x.shape and adv.dtype == x.dtype
    assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
    assert float((adv - x).abs().max()) <= 4 / 255 + 1e-6
    assert torch.equal(adv[mask == 0], x[mask == 0])
    assert res.voxel_success is not None and res.voxel_success.shape == y.shape
    assert res.dice is not None and res.dice.shape == (len(x), 2)
    assert res.predictions.shape == y.shape
    # success and evidence are computed on the returned tensor
    assert torch.equal(res.predictions, model.predict(adv))
    again = make()(model, x, y, target=target, mask=mask)
    assert torch.equal(again.adversarial, adv)


def test_seeds_reproduce_and_differ(seg3d: Seg) -> None:
    model, x, y = seg3d.model, seg3d.x, seg3d.y
    a = PGD(4 / 255, steps=2, seed=1)(model, x, y)
    b = PGD(4 / 255, steps=2, seed=1)(model, x, y)
    c = PGD(4 / 255, steps=2, seed=2)(model, x, y)
    assert torch.equal(a.adversarial, b.adversarial)
    assert not torch.equal(a.adversarial, c.adversarial)


# ------------------------------------------------------------------------------ sliding window
def test_sliding_window_is_exact_for_a_pointwise_network_and_differentiable() -> None:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        pointwise = nn.Conv3d(1, 3, 1)
        local = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 2, 1))
    x = torch.rand(2, 1, 12, 10, 9)
    plain = mr.Segmenter(pointwise)
    windowed = mr.Segmenter(pointwise, sliding_window=SlidingWindow((8, 6, 5), overlap=0.5))
    assert torch.allclose(windowed.logits(x), plain.logits(x), atol=1e-6)
    # input gradients flow through the blended windows: exact against finite differences
    net = local.double()
    sw = mr.Segmenter(net, sliding_window={"roi_size": 6, "overlap": 0.5, "mode": "gaussian"})
    xi = torch.rand(1, 1, 9, 9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: sw.forward(t), (xi,))
    with pytest.raises(ValueError, match="roi_size"):
        SlidingWindow(0)
    with pytest.raises(ValueError, match="2 axes but the inputs have 3"):
        mr.Segmenter(pointwise, sliding_window=SlidingWindow((4, 4))).logits(x)


def test_attack_through_sliding_window(seg2d: Seg) -> None:
    sw = mr.Segmenter(seg2d.model.module, mean=seg2d.model.mean, std=seg2d.model.std,
                      num_classes=2, sliding_window=SlidingWindow(16, overlap=0.5))
    x, y = seg2d.x[:4], seg2d.y[:4]
    res = PGD(8 / 255, steps=5, seed=0)(sw, x, y, criterion=DiceBelow(1, 0.5))
    assert res.dice is not None
    assert float(res.dice[:, 1].nanmean()) < float(
        dice_per_class(sw.predict(x), y, 2)[:, 1].nanmean()) - 0.2


# ------------------------------------------------------------------------------ model folders
def test_a_saved_unet_loads_as_a_segmenter(tmp_path) -> None:
    from medrobust.modelstore import load_model, save_model
    from medrobust.nets import build_network
    from medrobust.training import seeded

    with seeded(0):
        net = build_network("unet", in_channels=1, num_classes=3, spatial_dims=3,
                            channels=[4, 8], num_res_units=0)
    net.eval()
    save_model(tmp_path / "unet", net, bounds=(0.0, 1.0), mean=[0.2], std=[0.5],
               class_names=["background", "anterior", "posterior"])
    loaded = load_model(tmp_path / "unet")
    assert loaded.task == "segmentation" and loaded.classifier is None
    seg = loaded.segmenter
    assert isinstance(seg, mr.Segmenter) and loaded.model is seg
    assert seg.num_classes == 3 and seg.bounds == (0.0, 1.0)
    x = torch.rand(1, 1, 8, 8, 8)
    with torch.no_grad():
        expected = net((x - 0.2) / 0.5)
    assert torch.allclose(seg.logits(x), expected, atol=1e-5)


# ------------------------------------------------------------------------------ evaluation
def test_evaluate_segmentation(seg3d: Seg, tmp_path) -> None:
    import json

    from medrobust.data.base import ImageData
    from medrobust.evaluation.errors import EvaluationError
    from medrobust.evaluation.segmentation import evaluate_segmentation, hd95

    # HD95 closed form: two 1-voxel-thick plates 3 voxels apart
    a = np.zeros((8, 8, 8), dtype=bool)
    b = np.zeros_like(a)
    a[2], b[5] = True, True
    assert hd95(a, b) == pytest.approx(3.0)
    assert hd95(a, b, spacing=(2.0, 1.0, 1.0)) == pytest.approx(6.0)
    assert np.isnan(hd95(a, np.zeros_like(a)))

    data = ImageData(images=seg3d.x, labels=seg3d.y, bounds=(0.0, 1.0), units="intensity",
                     task="segmentation", class_names=["background", "lesion"])
    kw = {"pgd": {"steps": 2}, "cospgd": {"steps": 2}, "dag": {"max_iter": 3}}
    doc = evaluate_segmentation(seg3d.model, data, "pgd,cospgd,dag", eps="0,4/255,16/255",
                                out=tmp_path, batch_size=2, attack_kwargs=kw)
    clean = dice_per_class(seg3d.model.predict(seg3d.x), seg3d.y, 2)[:, 1]
    assert doc["clean"]["lesion"]["dice"]["mean"] == pytest.approx(float(clean.nanmean()))
    for name in ("pgd", "cospgd", "dag"):
        per = doc["attacks"][name]["per_eps"]
        assert per[0]["dice"]["lesion"]["mean"] == pytest.approx(float(clean.nanmean()))
        assert per[-1]["linf_max"] <= 16 / 255 + 1e-6
    worst = doc["worst_case"]
    for j in range(3):  # the worst case is the per-case minimum over the attacks
        per_case = np.array(doc["per_case"]["worst_dice"][worst[j]["eps"]])[:, 1]
        mins = np.nanmin(np.stack([
            [e["dice"]["lesion"]["mean"] for e in doc["attacks"][n]["per_eps"]][j:j + 1]
            for n in ("pgd", "cospgd", "dag")]))
        assert float(per_case.mean()) <= mins + 1e-9
    assert worst[-1]["dice"]["lesion"]["mean"] < worst[0]["dice"]["lesion"]["mean"]
    assert (tmp_path / "figures" / "dice_vs_eps.png").is_file()
    assert (tmp_path / "figures" / "overlays.png").is_file()
    saved = json.loads((tmp_path / "segmentation_results.json").read_text())
    assert saved["attacks"]["dag"]["per_eps"][1]["eps"] == "4/255"
    # a rerun reads every unit back from the store
    again = evaluate_segmentation(seg3d.model, data, "pgd,cospgd,dag", eps="0,4/255,16/255",
                                  out=tmp_path, batch_size=2, attack_kwargs=kw, figures=False)
    assert again["units"]["computed"] == 0 and again["worst_case"] == doc["worst_case"]
    with pytest.raises(EvaluationError, match="cannot attack a segmenter"):
        evaluate_segmentation(seg3d.model, data, "deepfool")
    bad = ImageData(images=seg3d.x, labels=seg3d.y[..., :8], bounds=(0.0, 1.0),
                    units="intensity", task="segmentation", class_names=["bg", "lesion"])
    with pytest.raises(EvaluationError, match="spatial shape"):
        evaluate_segmentation(seg3d.model, bad, "pgd")


def test_cli_evaluate_on_a_segmentation_model(tmp_path, capsys) -> None:
    import json

    from medrobust.cli import main
    from medrobust.modelstore import save_model
    from medrobust.nets import build_network
    from medrobust.training import seeded

    with seeded(0):
        net = build_network("unet", in_channels=1, num_classes=2, spatial_dims=2,
                            channels=[4, 8], num_res_units=0)
    save_model(tmp_path / "unet", net.eval(), bounds=(0.0, 1.0),
               class_names=["background", "lesion"])
    out = tmp_path / "eval"
    rc = main(["evaluate", "--model", str(tmp_path / "unet"), "--data", "phantom-seg",
               "--limit", "2", "--attacks", "pgd,cospgd", "--eps", "0,2/255", "--steps", "1",
               "--out", str(out), "--quiet"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "worst case" in text and "cospgd" in text
    doc = json.loads((out / "segmentation_results.json").read_text())
    assert doc["n"] == 2 and set(doc["attacks"]) == {"pgd", "cospgd"}
    rc = main(["evaluate", "--model", str(tmp_path / "unet"), "--data", "phantom-seg",
               "--limit", "2", "--attacks", "deepfool", "--out", str(out), "--quiet"])
    assert rc == 2
    assert "cannot attack a segmenter" in capsys.readouterr().err
