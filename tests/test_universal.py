"""Universal perturbations, adversarial patches and RP2 on a real PneumoniaMNIST CNN."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import medrobust as mr
from medrobust.attacks import PGD, RP2, AdversarialPatch, UniversalPerturbation, get_attack
from medrobust.attacks.patch import Patch
from medrobust.attacks.rp2 import ScannerTransforms, scanner_transform, total_variation
from medrobust.attacks.universal import Universal


@pytest.fixture(scope="module")
def split(pneumonia_model):
    """100 images to fit on, the other 156 held out."""
    m = pneumonia_model
    return m.model, (m.x[:100], m.y[:100]), (m.x[100:], m.y[100:])


# ------------------------------------------------------------------ universal perturbations
def test_sgd_uap_fools_most_held_out_images(split):
    """Budget: L-inf 16/255, fitted on 100 images; fooling rate (prediction changed) on the 156
    held-out images above 50%."""
    model, (xf, yf), (xh, _) = split
    uap = UniversalPerturbation(16 / 255, method="sgd", max_passes=5, seed=0).fit(model, xf, yf)
    assert float(uap.perturbation.abs().max()) <= 16 / 255 + 1e-7
    assert uap.fooling_rate(model, xh) > 0.5


def test_deepfool_uap_finds_the_universal_direction_of_a_linear_model():
    """Closed form: for f(x) = w.(x - 1/2) with every input on the positive side, at distance at
    most 0.3 (L2) from the boundary, -0.5 w / ||w|| fools them all; DeepFool's accumulation finds
    that direction."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 1)
    with torch.no_grad():
        lin.bias.zero_()
    w = lin.weight[0].detach()

    class Net(torch.nn.Module):
        def forward(self, z):
            return lin(z.flatten(1) - 0.5)

    model = mr.Classifier(Net(), bounds=(-10.0, 10.0))
    g = torch.Generator().manual_seed(1)
    d = 0.05 + 0.25 * torch.rand(40, 1, generator=g)
    side = torch.randn(40, 16, generator=g)
    side = side - (side @ w)[:, None] * w / w.dot(w)  # no component along w
    x = (0.5 + d * w / w.norm() + 0.3 * side / side.norm(dim=1, keepdim=True)).view(40, 1, 4, 4)
    y = torch.ones(40, dtype=torch.long)
    assert bool((model.predict(x) == 1).all())
    uap = UniversalPerturbation(0.5, "l2", delta=0.0, max_passes=5, seed=0).fit(model, x, y)
    assert uap.fooling_rate(model, x) == 1.0
    cos = torch.nn.functional.cosine_similarity(uap.perturbation.flatten(), -w, dim=0)
    assert cos > 0.9


def test_deepfool_uap_fools_more_with_a_larger_budget(split):
    model, (xf, yf), (xh, _) = split
    rates = [UniversalPerturbation(e, "l2", max_passes=2, seed=0).fit(model, xf[:40], yf[:40])
             .fooling_rate(model, xh) for e in (1.0, 2.0)]
    assert rates[1] > rates[0] + 0.05, rates


def test_targeted_uap_sends_held_out_images_to_the_target(split):
    model, (xf, yf), (xh, yh) = split
    uap = UniversalPerturbation(8 / 255, method="sgd", max_passes=5, seed=0).fit(
        model, xf, yf, target=1)
    assert uap.target == 1
    assert uap.fooling_rate(model, xh[yh == 0]) >= 0.6  # normal images called pneumonia


def test_uap_as_an_attack_adds_one_perturbation_to_every_sample(split):
    model, (xf, yf), _ = split
    res = get_attack("universal", eps=16 / 255, method="sgd", max_passes=2, seed=0)(
        model, xf[:20], yf[:20])
    d = res.adversarial - xf[:20]
    inside = (res.adversarial > 0) & (res.adversarial < 1) & (xf[:20] > 0) & (xf[:20] < 1)
    ref = d[0:1].expand_as(d)
    both = inside & inside[0:1].expand_as(inside)
    assert torch.allclose(d[both], ref[both], atol=1e-6)
    assert res.extra["universal"][0]["method"] == "sgd"


def test_universal_save_load_and_errors(split, tmp_path):
    model, (xf, yf), _ = split
    uap = UniversalPerturbation(4 / 255, method="sgd", max_passes=1, seed=0).fit(
        model, xf[:16], yf[:16])
    path = uap.save(tmp_path / "uap.safetensors")
    back = Universal.load(path)
    assert torch.equal(back.perturbation, uap.perturbation)
    assert (back.eps, back.norm, back.bounds, back.target) == (uap.eps, uap.norm, uap.bounds,
                                                                None)
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="corrupt"):
        Universal.load(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="do not match"):
        uap.apply(torch.rand(2, 1, 8, 8))


# ------------------------------------------------------------------ adversarial patch
def test_patch_success_grows_with_its_area(split, tmp_path):
    """Untargeted patches of 2% and 20% of the image (EOT-trained, 40 steps on 100 images),
    evaluated on held-out correctly classified images under fresh locations and transforms."""
    model, (xf, yf), (xh, yh) = split
    ok = model.predict(xh) == yh
    xh, yh = xh[ok], yh[ok]
    rates = []
    for area in (0.02, 0.2):
        patch = AdversarialPatch(area, steps=40, seed=0).fit(model, xf, yf)
        rates.append(patch.success_rate(model, xh, yh, draws=2))
    assert rates[1] > rates[0] + 0.2, rates
    png = patch.save_image(tmp_path / "patch.png")
    with Image.open(png) as im:
        assert im.size == (13, 13) and im.mode == "L"
    back = Patch.load(patch.save(tmp_path / "patch.safetensors"))
    assert torch.equal(back.patch, patch.patch) and back.area == 0.2


def test_targeted_patch_and_the_patch_as_an_attack(split):
    model, (xf, yf), (xh, yh) = split
    patch = AdversarialPatch(0.15, steps=40, seed=0).fit(model, xf, yf, target=0)
    assert patch.success_rate(model, xh[yh == 1], yh[yh == 1], draws=2) >= 0.6
    # as an attack, confined to a mask: nothing changes outside it
    mask = torch.zeros(1, 1, 28, 28)
    mask[..., :14, :] = 1
    res = AdversarialPatch(0.15, steps=5, seed=0)(model, xf[:8], yf[:8], mask=mask)
    outside = (mask == 0).expand_as(xf[:8])
    assert torch.equal(res.adversarial[outside], xf[:8][outside])
    assert float(res.perturbation_norms["pixels"].max()) <= 0.2 * 28 * 28


# ------------------------------------------------------------------ RP2
def test_rp2_survives_scanner_transforms_better_than_pgd(split):
    """Same mask (the central 12 x 12 pixels) and budget (L-inf 16/255), 15 steps each: under
    fresh draws of scanner-like transformations (blur, intensity drift, rotations up to 10 degrees,
    shifts up to 2 px), RP2's examples stay adversarial more often than PGD's."""
    model, _, (xh, yh) = split
    ok = (model.predict(xh) == yh).nonzero().flatten()[:16]
    x, y = xh[ok], yh[ok]
    mask = torch.zeros(1, 1, 28, 28)
    mask[..., 8:20, 8:20] = 1
    spec = ScannerTransforms(noise=0.0, blur=0.5, rotation=10.0, shift=2.0)
    rp2 = RP2(16 / 255, steps=15, draws=4, eval_draws=8, tv_weight=0.0, transforms=spec,
              seed=0)(model, x, y, mask=mask)
    outside = (mask == 0).expand_as(x)
    assert torch.equal(rp2.adversarial[outside], x[outside])
    assert float((rp2.adversarial - x).abs().max()) <= 16 / 255 + 1e-6
    pgd = PGD(16 / 255, steps=15, seed=0)(model, x, y, mask=mask)
    g = torch.Generator().manual_seed(123)
    hits = [
        (model.predict(scanner_transform(pgd.adversarial, (0.0, 1.0), spec, g)) != y)
        .float().mean() for _ in range(8)
    ]
    assert rp2.extra["transform_success_rate"] > float(torch.stack(hits).mean()) + 0.05
    smooth = RP2(16 / 255, steps=15, draws=4, eval_draws=2, tv_weight=0.5, transforms=spec,
                 seed=0)(model, x, y, mask=mask)
    assert float(total_variation(smooth.adversarial - x).mean()) < float(
        total_variation(rp2.adversarial - x).mean())
