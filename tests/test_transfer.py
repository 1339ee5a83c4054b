"""Transfer: ensembles, DI/TI boosting, the transfer matrix and its CLI."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import medrobust as mr
from medrobust.attacks import DIFGSM, MIFGSM, PGD, TIFGSM, get_attack
from medrobust.attacks.boost import (
    diverse_inputs,
    gaussian_kernel_1d,
    scaled_kernel_size,
    smooth_gradient,
)
from medrobust.cli import main
from medrobust.modelstore import save_model
from medrobust.nets import build_network


def _lin(seed: int, k: int = 3, dim: int = 16) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(nn.Flatten(), nn.Linear(dim, k))


# ------------------------------------------------------------------ Ensemble
def test_ensemble_logits_are_the_weighted_mean():
    a, b = mr.Classifier(_lin(0)), mr.Classifier(_lin(1))
    ens = mr.Ensemble([a, b], weights=[3, 1])
    x = torch.rand(4, 1, 4, 4)
    assert torch.allclose(ens.logits(x), 0.75 * a.logits(x) + 0.25 * b.logits(x), atol=1e-6)


def test_ensemble_loss_combination_gives_the_mean_of_member_gradients():
    a, b = mr.Classifier(_lin(0)), mr.Classifier(_lin(1))
    ens = mr.Ensemble([a, b], combine="loss")
    x = torch.rand(3, 1, 4, 4)
    y = torch.tensor([0, 1, 2])

    def ce(out, i):
        return torch.nn.functional.cross_entropy(out, y[i], reduction="none")

    _, la, ga = a.value_and_grad(x, ce)
    _, lb, gb = b.value_and_grad(x, ce)
    _, le, ge = ens.value_and_grad(x, ce)
    assert torch.allclose(le, (la + lb) / 2, atol=1e-6)
    assert torch.allclose(ge, (ga + gb) / 2, atol=1e-6)


def test_every_gradient_attack_accepts_an_ensemble():
    ens = mr.Ensemble([mr.Classifier(_lin(0)), mr.Classifier(_lin(1))])
    x = torch.rand(4, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    y = ens.predict(x)
    for name in ("fgsm", "bim", "pgd", "mifgsm", "difgsm", "tifgsm"):
        res = get_attack(name, eps=0.1, seed=0)(ens, x, y)
        assert float((res.adversarial - x).abs().max()) <= 0.1 + 1e-6


def test_ensemble_and_transfer_refuse_different_bounds_or_units():
    a = mr.Classifier(_lin(0), bounds=(0, 1))
    b = mr.Classifier(_lin(1), bounds=(-1024, 3071))
    with pytest.raises(ValueError, match="different bounds"):
        mr.Ensemble([a, b])
    with pytest.raises(ValueError, match="different bounds"):
        mr.transfer({"a": a, "b": b}, (torch.rand(2, 1, 4, 4), torch.zeros(2)), "fgsm", 0.1)
    with pytest.raises(ValueError, match="different units"):
        mr.Ensemble([a, mr.Classifier(_lin(1))], units=["intensity", "HU"])
    with pytest.raises(TypeError, match="Classifier"):
        mr.Ensemble([a, mr.BlackBox(lambda z: z, output="logits")])  # type: ignore[list-item]


# ------------------------------------------------------------------ DI / TI
def test_ti_kernel_matches_the_paper_and_scales_with_the_input():
    assert scaled_kernel_size(299) == 15
    assert scaled_kernel_size(224) == 11
    assert scaled_kernel_size(28) == 3
    g = gaussian_kernel_1d(15)
    assert torch.isclose(g.sum(), torch.tensor(1.0, dtype=g.dtype))
    assert torch.equal(g, g.flip(0)) and int(g.argmax()) == 7
    # a constant gradient stays constant away from the border; an impulse becomes the kernel
    grad = torch.zeros(1, 1, 9, 9)
    grad[0, 0, 4, 4] = 1
    out = smooth_gradient(grad, 3)
    k2 = torch.outer(gaussian_kernel_1d(3), gaussian_kernel_1d(3)).float()
    assert torch.allclose(out[0, 0, 3:6, 3:6], k2, atol=1e-6)
    assert torch.allclose(smooth_gradient(torch.ones(1, 2, 7, 7, 7), 3)[..., 3, 3, 3],
                          torch.ones(1, 2))


def test_input_diversity_keeps_shape_and_is_differentiable():
    x = torch.rand(5, 1, 28, 28, requires_grad=True)
    g = torch.Generator().manual_seed(0)
    out = diverse_inputs(x, 1.0, 0.0, g)
    assert out.shape == x.shape and not torch.equal(out, x)
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert torch.equal(diverse_inputs(x, 0.0, 0.0, g), x)


def test_boosting_options_off_reproduce_mi_fgsm_exactly():
    model = mr.Classifier(build_network("smallcnn", in_channels=1, num_classes=2, width=2))
    x = torch.rand(4, 1, 12, 12, generator=torch.Generator().manual_seed(0))
    y = model.predict(x)
    base = MIFGSM(0.05, seed=0)(model, x, y)
    off = DIFGSM(0.05, input_diversity=0.0, seed=0)(model, x, y)
    ti1 = TIFGSM(0.05, translation_kernel=1, seed=0)(model, x, y)
    assert torch.equal(base.adversarial, off.adversarial)
    assert torch.equal(base.adversarial, ti1.adversarial)
    with pytest.raises(ValueError, match="odd"):
        PGD(0.1, translation_kernel=4)
    with pytest.raises(ValueError, match="probability"):
        PGD(0.1, input_diversity=1.5)


# ------------------------------------------------------------------ the transfer matrix
@pytest.fixture(scope="module")
def matrix(pneumonia_model, pneumonia_proxies):
    x, y = pneumonia_model.x[:96], pneumonia_model.y[:96]
    models = {"a": pneumonia_model.model, "b": pneumonia_proxies[0], "c": pneumonia_proxies[1]}
    return mr.transfer(models, (x, y), "pgd", eps=8 / 255, attack_kwargs={"steps": 10})


def test_transfer_between_independent_models_fools_a_third(matrix):
    """PGD-Linf at eps = 8/255 (10 steps) crafted on model a, evaluated on model b (trained
    independently: other seed, other training images): >= 30% of b's correct samples fooled."""
    assert matrix.success[0][1] >= 0.30, matrix.to_markdown()
    # white box beats transfer (the diagonal dominates its column)
    for j in range(3):
        assert matrix.success[j][j] >= max(matrix.success[i][j] for i in range(3)) - 1e-9


def test_ensemble_beats_every_single_proxy_on_the_held_out_model(matrix):
    ens = matrix.ensemble_success
    assert ens is not None
    # held out b: crafted on the ensemble of a and c
    assert ens[1] > max(matrix.success[0][1], matrix.success[2][1]), matrix.to_markdown()
    for j in range(3):  # and never below the proxies' average
        singles = [matrix.success[i][j] for i in range(3) if i != j]
        assert ens[j] >= sum(singles) / 2 - 1e-9, matrix.to_markdown()


def test_transfer_counts_only_samples_the_target_gets_right(matrix, pneumonia_model,
                                                          pneumonia_proxies):
    x, y = pneumonia_model.x[:96], pneumonia_model.y[:96]
    for j, clf in enumerate([pneumonia_model.model, *pneumonia_proxies]):
        ok = clf.predict(x) == y
        assert matrix.correct[j] == int(ok.sum())
        # accuracy on the examples = (correct and not fooled) / n  (a sample wrong when clean
        # may become right; that is counted in accuracy but never as a success)
        assert matrix.accuracy[j][j] <= matrix.clean_accuracy[j] + (~ok).float().mean() + 1e-9
    doc = matrix.to_dict()
    assert json.loads(json.dumps(doc))["success"] == doc["success"]


# ------------------------------------------------------------------ the CLI
def _save(folder: Path, seed: int) -> Path:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = build_network("smallcnn", in_channels=1, num_classes=2, width=2)
    net.eval()
    return save_model(folder, net, bounds=(0.0, 1.0), units="intensity",
                      class_names=["normal", "pneumonia"], task="binary")


def test_cli_transfer_writes_results_and_a_report(tmp_path, data_dir):
    folders = [str(_save(tmp_path / f"m{i}", i)) for i in range(3)]
    out = tmp_path / "T"
    argv = ["transfer", "--models", ",".join(folders), "--data", str(data_dir /
            "pneumoniamnist.npz"), "--attack", "fgsm", "--eps", "4/255", "--limit", "16",
            "--out", str(out)]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
        assert main(argv) == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["names"] == ["m0", "m1", "m2"] and doc["n"] == 16
    assert len(doc["success"]) == 3 and all(len(r) == 3 for r in doc["success"])
    assert len(doc["ensemble"]["success"]) == 3
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2
    assert 'id="transfer-success"' in page and "http" not in page.replace("http-equiv", "")
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        assert main(argv) == 2
    assert "--overwrite" in err.getvalue()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        assert main(["transfer", "--models", folders[0], "--data", "x", "--eps", "1",
                     "--out", str(tmp_path / "U")]) == 2
    assert "at least two" in err.getvalue()


# ------------------------------------------------------------------ substitute training
def test_substitute_from_a_label_oracle_agrees_and_transfers(pneumonia_model, data_dir):
    """Papernot et al.: 100 held-out images (not the target's training data), the target queried
    as a label oracle; every query is counted; the substitute agrees with the target on other
    held-out images and its PGD examples (eps 8/255) transfer to the target."""
    from conftest import load_npz_split

    from medrobust.substitute import train_substitute

    net = pneumonia_model.model.module
    oracle = mr.BlackBox(lambda z: net(z).argmax(1), output="label", num_classes=2)
    xv, _ = load_npz_split(data_dir / "pneumoniamnist.npz", "val")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        sub_net = build_network("smallcnn", in_channels=1, num_classes=2, width=4)
    res = train_substitute(oracle, xv[:100], sub_net, epochs=4, train_epochs=3, lr=3e-3,
                           seed=0)
    assert res.queries == oracle.queries == 800  # 100 -> 200 -> 400 -> 800, each labelled once
    assert [h["set_size"] for h in res.history] == [100, 200, 400, 800]
    x, y = pneumonia_model.x[:128], pneumonia_model.y[:128]
    agree = float((res.model.predict(x) == pneumonia_model.model.predict(x)).float().mean())
    assert agree >= 0.75
    tr = mr.transfer({"sub": res.model, "target": pneumonia_model.model}, (x, y), "pgd",
                     eps=8 / 255, attack_kwargs={"steps": 10})
    assert tr.success[0][1] >= 0.3, tr.to_markdown()
    # a query budget stops the augmentation before it is exceeded
    capped = train_substitute(oracle, xv[:100], build_network("smallcnn", in_channels=1,
                              num_classes=2, width=2), epochs=4, train_epochs=1,
                              max_queries=250, seed=0)
    assert capped.queries == 250


def test_vit_is_a_registered_classifier_that_attacks_and_saves(tmp_path):
    from medrobust.modelstore import load_model

    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = build_network("vit", in_channels=1, num_classes=3, num_layers=1, hidden_size=24,
                            mlp_dim=48, num_heads=2)
    x = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    assert net(x).shape == (2, 3)
    clf = mr.Classifier(net.eval())
    res = get_attack("fgsm", eps=4 / 255)(clf, x, clf.predict(x))
    assert float((res.adversarial - x).abs().max()) <= 4 / 255 + 1e-7
    back = load_model(save_model(tmp_path / "vit", net, task="multi-class", num_classes=3))
    assert torch.allclose(back.module(x), net(x), atol=1e-6)
    with pytest.raises(ValueError, match="divisible"):
        build_network("vit", patch_size=5)
