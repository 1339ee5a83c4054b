"""Input-transform defenses, attaching them to a model, BPDA/EOT, and feature squeezing."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch
from torch import nn

import medrobust as mr
from medrobust.attacks.gradient import FGSM, PGD
from medrobust.defenses import (
    DEFENSES,
    DefenseError,
    FeatureSqueezing,
    defense_from_config,
    get_defense,
)
from medrobust.defenses.base import bpda
from medrobust.defenses.transforms import JPEGCompression

torch.set_num_threads(1)


def _images(n: int = 4, c: int = 1, size: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, c, size, size), generator=g)


class _Linear(nn.Module):
    """A fixed linear classifier on the image mean (logits [-m, m] around 0.5)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.flatten(1).mean(1, keepdim=True) - 0.5
        return torch.cat([-m, m], 1) * 10


# --------------------------------------------------------------------------- building
def test_registry_names_and_errors() -> None:
    for name in ("median", "gaussian", "jpeg", "bitdepth", "tvm", "resize-pad", "noise"):
        assert name in DEFENSES
        assert get_defense(name).name == name
    with pytest.raises(DefenseError, match="unknown defense 'blur'.*median"):
        get_defense("blur")
    with pytest.raises(DefenseError, match="jpeg.*unexpected keyword"):
        get_defense("jpeg", qualty=50)
    for q in (0, 101, 50.5):
        with pytest.raises(DefenseError, match="quality must be an integer in 1..100"):
            get_defense("jpeg", quality=q)
    with pytest.raises(DefenseError, match="odd positive integer"):
        get_defense("median", size=2)


def test_config_round_trip() -> None:
    chain = [get_defense("median", size=5), get_defense("jpeg", qualities=[30, 60], seed=3)]
    model = mr.Classifier(_Linear(), defense=chain)
    cfg = model.defense.config()
    assert cfg[0] == {"name": "median", "options": {"size": 5, "approximation": "median"}}
    rebuilt = defense_from_config(cfg)
    assert rebuilt is not None and [d.name for d in rebuilt] == ["median", "jpeg"]
    assert rebuilt.defenses[1].qualities == [30, 60] and rebuilt.randomized
    with pytest.raises(DefenseError, match="unknown defense"):
        defense_from_config([{"name": "os.system", "options": {}}])


def test_jpeg_refuses_volumes_unless_per_slice() -> None:
    vol = torch.rand(2, 1, 4, 16, 16)
    with pytest.raises(DefenseError, match="per_slice=True"):
        get_defense("jpeg")(vol)
    out = get_defense("jpeg", quality=50, per_slice=True)(vol)
    assert out.shape == vol.shape
    # slice by slice: slice 2 of the volume equals the 2D JPEG of that slice
    assert torch.equal(out[:, :, 2], get_defense("jpeg", quality=50)(vol[:, :, 2]))


# --------------------------------------------------------------------------- oracles
def test_median_and_gaussian_match_scipy_2d_and_3d() -> None:
    for shape in ((2, 1, 9, 11), (1, 2, 5, 6, 7)):
        x = torch.rand(shape, dtype=torch.float64)
        med = get_defense("median", size=3)(x)
        sizes = (1, 1) + (3,) * (len(shape) - 2)
        assert np.allclose(med.numpy(), ndi.median_filter(x.numpy(), size=sizes, mode="nearest"))
        gau = get_defense("gaussian", sigma=1.2)(x)
        sig = (0, 0) + (1.2,) * (len(shape) - 2)
        ref = ndi.gaussian_filter(x.numpy(), sigma=sig, mode="nearest", truncate=4.0)
        assert np.allclose(gau.numpy(), ref, atol=1e-10)


def test_bit_depth_and_jpeg_act_on_the_bounds_normalized_view() -> None:
    lo, hi = -1024.0, 3071.0
    u = _images(3, 1, 16)
    hu = u * (hi - lo) + lo
    bits = get_defense("bitdepth", bits=3)
    out = bits(hu, (lo, hi))
    k = (out - lo) / (hi - lo) * 7
    assert torch.allclose(k, k.round(), atol=1e-4)  # on the 3-bit grid of the HU range
    assert torch.allclose(out, bits(u) * (hi - lo) + lo, atol=1e-3)
    assert torch.equal(bits(bits(u)), bits(u))  # idempotent
    jpeg = get_defense("jpeg", quality=40)
    assert torch.allclose(jpeg(hu, (lo, hi)), jpeg(u) * (hi - lo) + lo, atol=1e-2)


def test_jpeg_quality_orders_the_error_and_dct_approximation_is_close() -> None:
    x = get_defense("gaussian", sigma=1.0)(_images(4, 1, 24))
    errs = [float((get_defense("jpeg", quality=q)(x) - x).abs().mean()) for q in (10, 50, 95)]
    assert errs[0] > errs[1] > errs[2] > 0
    rgb = _images(2, 3, 16)
    assert get_defense("jpeg", quality=50)(rgb).shape == rgb.shape
    d = JPEGCompression(quality=50, approximation="dct")
    real = d(x)
    approx = d.backward_approximation(x)
    # the differentiable approximation is much closer to the codec than the identity is
    assert float((approx - real).abs().mean()) < 0.5 * float((x - real).abs().mean())


def test_tvm_reduces_total_variation_and_is_reproducible() -> None:
    x = _images(2, 1, 16)
    a = get_defense("tvm", seed=1)(x)
    b = get_defense("tvm", seed=1)(x)
    assert torch.equal(a, b) and a.min() >= 0 and a.max() <= 1

    def tv(z: torch.Tensor) -> float:
        return float(z.diff(dim=2).abs().sum() + z.diff(dim=3).abs().sum())

    assert tv(a) < 0.7 * tv(x)


def test_resize_pad_shape_padding_and_seed() -> None:
    x = torch.ones(3, 1, 28, 28)
    d = get_defense("resize-pad", seed=0)
    y = d(x, (0.0, 1.0))
    assert y.shape == (3, 1, 31, 31)
    # the image occupies a random 28..30 square; the rest is the lower bound
    filled = (y > 0).flatten(1).sum(1)
    assert all(28 * 28 <= int(f) <= 30 * 30 for f in filled)
    assert torch.equal(get_defense("resize-pad", seed=0)(x), y)
    assert get_defense("resize-pad", keep_size=True, seed=0)(x).shape == x.shape


# --------------------------------------------------------------------------- attaching
def test_chain_runs_in_order_before_preprocessing_and_inputs_untouched() -> None:
    seen = {}

    def pre(z: torch.Tensor) -> torch.Tensor:
        seen["pre"] = z.clone()
        return z

    med, bits = get_defense("gaussian", sigma=1.0), get_defense("bitdepth", bits=2)
    model = mr.Classifier(_Linear(), bounds=(0.0, 1.0), preprocess=pre, defense=[med, bits])
    x = _images(2)
    x0 = x.clone()
    model.logits(x)
    assert torch.equal(seen["pre"], bits(med(x)))
    assert not torch.equal(seen["pre"], med(bits(x)))
    assert torch.equal(x, x0)
    assert not model.capabilities.randomized
    with pytest.raises(DefenseError, match="must be a medrobust.defenses.Defense"):
        mr.Classifier(_Linear(), defense=[nn.Identity()])


def test_bpda_is_straight_through() -> None:
    x = _images(2).requires_grad_(True)
    d = get_defense("bitdepth", bits=2)
    y = bpda(d, x, (0.0, 1.0))
    assert torch.equal(y, d(x.detach()))
    (g,) = torch.autograd.grad((y * 3).sum(), x)
    assert torch.allclose(g, torch.full_like(g, 3.0))  # identity backward pass


def test_naive_gradient_is_zero_through_jpeg_and_bpda_restores_it() -> None:
    model = mr.Classifier(_Linear(), defense=get_defense("jpeg", quality=75))
    x = _images(3)
    y = torch.tensor([0, 1, 0])

    def loss(o: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(o, y[i], reduction="none")

    _, _, g_naive = model.value_and_grad(x, loss)
    _, _, g_bpda = model.value_and_grad(x, loss, bpda=True)
    assert torch.count_nonzero(g_naive) == 0
    assert torch.count_nonzero(g_bpda) == g_bpda.numel()
    plain = mr.Classifier(_Linear())
    _, _, g_plain = plain.value_and_grad(x, loss)
    jx = get_defense("jpeg", quality=75)(x)
    _, _, g_at = plain.value_and_grad(jx, loss)
    assert torch.allclose(g_bpda, g_at) and not torch.allclose(g_bpda, g_plain)


def test_randomized_defense_votes_and_eot_costs_are_counted() -> None:
    d = get_defense("noise", sigma=0.05, seed=0)
    model = mr.Classifier(_Linear(), defense=d, votes=7)
    assert model.capabilities.randomized and model.draws_per_prediction == 7
    x = _images(5)
    scores = model.logits(x)
    # one-hot vote fractions (plus a tie-breaker below one vote) summing to ~1
    assert torch.all(scores.sum(1) > 0.99) and torch.all(scores.sum(1) < 1.0 + 1 / 7)
    assert torch.allclose(scores * 7, (scores * 7).floor() + (scores * 7).frac(), atol=0)
    y = model.predict(x)
    res = PGD(0.02, steps=2, eot=3, seed=0)(model, x, y)
    n = x.shape[0]
    assert res.backward_passes == n * 2 * 3
    # probing + 2 steps x 3 draws + the final majority votes (7 draws) on the returned batch
    assert res.forward_passes >= n * 2 * 3 + n * 7
    with pytest.raises(ValueError, match="eot must be a positive integer"):
        PGD(0.02, eot=0)


# --------------------------------------------------------------------------- real data
@pytest.fixture(scope="module")
def pneumonia(pneumonia_model):  # type: ignore[no-untyped-def]
    n = 96
    return pneumonia_model.model.module, pneumonia_model.x[:n], pneumonia_model.y[:n]


def _robust(model: mr.Classifier, x: torch.Tensor, y: torch.Tensor, **kw: object) -> float:
    res = PGD(8 / 255, steps=20, seed=0, **kw)(model, x, y)  # type: ignore[arg-type]
    return 1.0 - float(res.success.float().mean())


def test_jpeg_raises_naive_robustness_and_bpda_removes_it(pneumonia):  # type: ignore[no-untyped-def]
    net, x, y = pneumonia
    undefended = _robust(mr.Classifier(net, num_classes=2), x, y)
    jpeg = get_defense("jpeg", quality=60, approximation="dct")
    model = mr.Classifier(net, num_classes=2, defense=jpeg)
    naive = _robust(model, x, y)  # Pillow's codec: autograd gives zero gradient
    adaptive = _robust(model, x, y, bpda=True)  # backward pass through the differentiable JPEG
    print("jpeg undefended", undefended, "naive", naive, "adaptive", adaptive)
    assert naive > undefended + 0.5
    assert adaptive < naive - 0.4
    assert adaptive <= undefended + 0.3


def test_median_raises_robustness_and_bpda_through_its_autograd_equals_naive(pneumonia):  # type: ignore[no-untyped-def]
    net, x, y = pneumonia
    undefended = _robust(mr.Classifier(net, num_classes=2), x, y)
    med = mr.Classifier(net, num_classes=2, defense=get_defense("median", size=3))
    # the torch median is differentiable almost everywhere: its own autograd is the default
    # BPDA approximation, so BPDA changes nothing (the naive attack is already adaptive here)
    res_naive = PGD(8 / 255, steps=20, seed=0)(med, x, y)
    res_bpda = PGD(8 / 255, steps=20, seed=0, bpda=True)(med, x, y)
    assert torch.equal(res_naive.adversarial, res_bpda.adversarial)
    naive = 1.0 - float(res_naive.success.float().mean())
    ident = mr.Classifier(net, num_classes=2,
                          defense=get_defense("median", size=3, approximation="identity"))
    identity = _robust(ident, x, y, bpda=True)
    print("median undefended", undefended, "naive/BPDA(median)", naive, "BPDA(identity)", identity)
    assert naive > undefended + 0.15


def test_resize_pad_falls_to_eot(pneumonia):  # type: ignore[no-untyped-def]
    net, x, y = pneumonia
    x, y = x[:48], y[:48]
    undefended = _robust(mr.Classifier(net, num_classes=2), x, y)
    model = mr.Classifier(net, num_classes=2, defense=get_defense("resize-pad", seed=0))
    clean = float((model.predict(x) == y).float().mean())
    naive = _robust(model, x, y)  # one random draw per step, autograd through the resize
    adaptive = _robust(model, x, y, eot=8)
    print("resize-pad clean", clean, "undefended", undefended, "naive", naive, "EOT", adaptive)
    assert clean > 0.7  # the defended model still classifies (its vote over 10 draws)
    assert adaptive <= naive + 0.05
    assert adaptive <= undefended + 0.15


# --------------------------------------------------------------------------- detection
def test_feature_squeezing_auc_on_fgsm_and_pgd(pneumonia):  # type: ignore[no-untyped-def]
    net, x, y = pneumonia
    model = mr.Classifier(net, num_classes=2)
    fs = FeatureSqueezing(model)
    with pytest.raises(DefenseError, match="calibrate"):
        fs.detect(x)
    t = fs.calibrate(x, fpr=0.05)
    assert float((fs.score(x) > t).float().mean()) <= 0.05
    aucs = {}
    for attack in (FGSM(4 / 255), PGD(4 / 255, steps=10, seed=0)):
        res = attack(model, x, y)
        adv = res.adversarial[res.success]
        report = fs.evaluate(x, adv)
        aucs[attack.name] = report.auc
        assert report.false_positive_rate <= 0.05 and report.n_adversarial == int(res.success.sum())
        assert 0.0 <= report.auc <= 1.0
    print("feature squeezing ROC AUC:", aucs)
    assert aucs["fgsm"] > 0.5 and aucs["pgd"] > 0.5
    # the adaptive attack (C&W AISec 2017) finds examples that are misclassified AND undetected
    res = fs.adaptive_attack(PGD(8 / 255, steps=20, seed=0), x, y)
    ok = res.success
    assert ok.any()
    adv = res.adversarial[ok]
    assert not fs.detect(adv).any()
    assert torch.all(model.predict(adv) != y[ok])


# --------------------------------------------------------------------------- model folders
def test_defended_model_folder_round_trip(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json

    from medrobust.modelstore import ModelError, load_model, save_model
    from medrobust.nets import build_network

    net = build_network("smallcnn", in_channels=1, num_classes=2, spatial_dims=2, width=4).eval()
    defended = mr.Classifier(net, num_classes=2, votes=5, defense=[
        get_defense("median", size=3), get_defense("jpeg", quality=50)])
    folder = save_model(tmp_path / "m", net, defense=defended)
    meta = json.loads((folder / "model.json").read_text())
    assert meta["defense"]["votes"] == 5
    assert [s["name"] for s in meta["defense"]["steps"]] == ["median", "jpeg"]
    loaded = load_model(folder).classifier
    assert loaded is not None and loaded.votes == 5
    assert loaded.defense.config() == defended.defense.config()
    x = _images(4, 1, 28)
    assert torch.equal(loaded.logits(x), defended.logits(x))
    meta["defense"]["steps"][0]["name"] = "builtins.eval"
    (folder / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="model.json: defense: unknown defense 'builtins.eval'"):
        load_model(folder)


# --------------------------------------------------------------------------- evaluate --adaptive
def test_evaluate_adaptive_flags_jpeg_as_masking(pneumonia, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    import json

    from medrobust.cli import main
    from medrobust.data.base import ImageData
    from medrobust.evaluation.adaptive import evaluate_adaptive
    from medrobust.modelstore import load_model, save_model

    net, x, y = pneumonia
    names = ["normal", "pneumonia"]
    args = {"in_channels": 1, "num_classes": 2, "width": 8}
    folder = save_model(tmp_path / "jpeg", net, architecture="smallcnn", arch_args=args,
                        class_names=names, task="binary",
                        defense=[get_defense("jpeg", quality=60, approximation="dct")])
    data = ImageData(x[:48], y[:48], (0.0, 1.0), "intensity", "binary", names)
    summary = evaluate_adaptive(load_model(folder), data, attacks=["pgd"], out=tmp_path / "ev",
                                eps=["8/255"], steps=20, progress=False, gallery=0,
                                large_eps=False)
    (row,) = summary["rows"]
    print("evaluate --adaptive:", row["naive"]["value"], row["adaptive"]["value"])
    assert summary["adaptive_kwargs"] == {"pgd": {"bpda": True}}
    assert row["naive"]["value"] - row["adaptive"]["value"] > row["threshold"] >= 0.05
    assert row["masking"] and summary["masking"]
    saved = json.loads((tmp_path / "ev" / "adaptive.json").read_text())
    assert saved["rows"][0]["quote_value"] == row["adaptive"]["value"]
    for part in ("naive", "adaptive"):
        assert (tmp_path / "ev" / part / "results.json").is_file()
    # an undefended model: a clear error, exit code 2
    plain = save_model(tmp_path / "plain", net, architecture="smallcnn", arch_args=args,
                       class_names=["normal", "lesion"], task="binary")  # the phantom's classes
    rc = main(["evaluate", "--model", str(plain), "--data", "phantom-16", "--limit", "8",
               "--attacks", "pgd", "--adaptive", "--out", str(tmp_path / "ev2"), "--quiet"])
    assert rc == 2 and "has no defense" in capsys.readouterr().err


# --------------------------------------------------------------------------- learned defenses
@pytest.fixture(scope="module")
def pneumonia_train(data_dir):  # type: ignore[no-untyped-def]
    from conftest import load_npz_split

    x, _ = load_npz_split(data_dir / "pneumoniamnist.npz", "train")
    return x[:768]


def test_dae_denoises_and_round_trips_through_a_model_folder(pneumonia, pneumonia_train,
                                                             tmp_path) -> None:  # type: ignore[no-untyped-def]
    from medrobust.modelstore import load_model, save_model

    net, x, y = pneumonia
    dae = get_defense("dae", width=8)
    losses = dae.fit(pneumonia_train, sigma=0.1, epochs=4, seed=0)
    assert losses[-1] < losses[0]
    g = torch.Generator().manual_seed(0)
    noisy = (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    with torch.no_grad():
        den = dae(noisy)
    assert float(((den - x) ** 2).mean()) < 0.6 * float(((noisy - x) ** 2).mean())
    model = mr.Classifier(net, num_classes=2, defense=dae)
    folder = save_model(tmp_path / "dae", net, architecture="smallcnn",
                        arch_args={"in_channels": 1, "num_classes": 2, "width": 8},
                        class_names=["normal", "pneumonia"], task="binary", defense=model)
    assert (folder / "defense.safetensors").is_file()
    loaded = load_model(folder).classifier
    assert loaded is not None and torch.equal(loaded.logits(x), model.logits(x))


def test_hgd_restores_the_models_decisions_on_adversarial_inputs(pneumonia) -> None:  # type: ignore[no-untyped-def]
    net, x, y = pneumonia
    model = mr.Classifier(net, num_classes=2)
    adv = PGD(8 / 255, steps=10, seed=0)(model, x, y).adversarial
    hgd = get_defense("hgd", width=8)
    train_i, test_i = slice(0, 64), slice(64, 96)
    hgd.fit(model, x[train_i], adv[train_i], epochs=15, batch_size=16, seed=0)
    defended = mr.Classifier(net, num_classes=2, defense=hgd)
    raw = float((model.predict(adv[test_i]) == y[test_i]).float().mean())
    den = float((defended.predict(adv[test_i]) == y[test_i]).float().mean())
    print("HGD: accuracy on held-out PGD examples", raw, "->", den)
    assert den > raw + 0.2
    with pytest.raises(DefenseError, match="no submodule 'nope'"):
        hgd.fit(model, x[:4], adv[:4], layer="nope")


def test_defensegan_projects_onto_the_generator(pneumonia, pneumonia_train) -> None:  # type: ignore[no-untyped-def]
    _, x, _ = pneumonia
    gan = get_defense("defensegan", latent=8, width=8, restarts=2, steps=30, seed=0)
    gan.fit(pneumonia_train, epochs=2, seed=0)
    xs = x[:8]
    with torch.no_grad():
        out = gan(xs)
    assert out.shape == xs.shape and out.min() >= 0 and out.max() <= 1
    short = get_defense("defensegan", latent=8, width=8, restarts=2, steps=1, seed=0)
    short.load_state_dict(gan.state_dict())
    err_long = float(((gan(xs) - xs) ** 2).mean())
    err_short = float(((short(xs) - xs) ** 2).mean())
    assert err_long < err_short  # the latent search moves G(z) towards the input
    assert gan.randomized and not gan.differentiable
    with pytest.raises(DefenseError, match="built for"):
        gan(torch.rand(2, 1, 16, 16))


def test_apgd_is_adaptive_too(pneumonia):  # type: ignore[no-untyped-def]
    """APGD takes bpda= and eot= like the other gradient attacks: naive APGD through Pillow's
    JPEG gets no gradient, BPDA APGD breaks the defense, and EOT draws are counted."""
    from medrobust.attacks import APGD

    net, x, y = pneumonia
    jpeg = get_defense("jpeg", quality=60, approximation="dct")
    model = mr.Classifier(net, num_classes=2, defense=jpeg)
    naive = APGD(8 / 255, steps=20, seed=0)(model, x, y)
    adaptive = APGD(8 / 255, steps=20, seed=0, bpda=True)(model, x, y)
    assert adaptive.robust_accuracy < naive.robust_accuracy - 0.3
    noisy = mr.Classifier(net, num_classes=2, defense=get_defense("noise", sigma=0.05))
    one = APGD(8 / 255, steps=3, seed=0, early_stop=False)(noisy, x[:4], y[:4])
    four = APGD(8 / 255, steps=3, seed=0, early_stop=False, eot=4)(noisy, x[:4], y[:4])
    assert four.backward_passes == 4 * one.backward_passes
