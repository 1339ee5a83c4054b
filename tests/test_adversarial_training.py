"""Adversarial training (FGSM-RS, PGD-AT, TRADES, mixed, AdvProp) through medrobust.training."""

from __future__ import annotations

import pytest
import torch
from conftest import load_npz_split
from torch import nn

import medrobust as mr
from medrobust.attacks.gradient import PGD
from medrobust.data.base import ImageData
from medrobust.defenses import DefenseError
from medrobust.defenses.training import (
    AdversarialTraining,
    DualBatchNorm,
    add_auxiliary_bn,
    auxiliary_bn,
    strip_auxiliary_bn,
)
from medrobust.nets import smallcnn
from medrobust.training import seeded, train

torch.set_num_threads(1)
EPS = 8 / 255


@pytest.fixture(scope="module")
def pneumonia(data_dir):  # type: ignore[no-untyped-def]
    x, y = load_npz_split(data_dir / "pneumoniamnist.npz", "train")
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(x), generator=g)[:2048]
    data = ImageData(x[idx], y[idx], (0.0, 1.0), "intensity", "binary", ["normal", "pneu"])
    xt, yt = load_npz_split(data_dir / "pneumoniamnist.npz", "test")
    i = torch.randperm(len(xt), generator=g)[:128]
    return data, xt[i], yt[i]


def _fit(data: ImageData, epochs: int = 2, **hooks: object) -> nn.Module:
    with seeded(0):
        net = smallcnn(1, 2, width=8)
    if hooks.pop("advprop", False):
        add_auxiliary_bn(net)
    train(net, data, epochs=epochs, batch_size=64, lr=2e-3, schedule="none", seed=0,
          progress=False, **hooks)  # type: ignore[arg-type]
    return net.eval()


def _robust(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    res = PGD(EPS, steps=10, seed=0)(mr.Classifier(net, num_classes=2), x, y)
    return 1 - float(res.success.float().mean())


def test_pgd_training_raises_robust_accuracy(pneumonia):  # type: ignore[no-untyped-def]
    data, x, y = pneumonia
    standard = _robust(_fit(data), x, y)
    pgd = AdversarialTraining("pgd", EPS, steps=2, seed=0)
    robust = _robust(_fit(data, example_generator=pgd), x, y)
    print(f"robust accuracy at eps 8/255: standard {standard:.3f}, PGD-AT {robust:.3f}")
    assert robust > standard + 0.2


def test_warmup_schedule_follows_the_training_epochs(pneumonia):  # type: ignore[no-untyped-def]
    data, _, _ = pneumonia
    seen = []
    adv = AdversarialTraining("fgsm-rs", EPS, warmup_epochs=2, seed=0)

    class Spy:
        def set_epoch(self, epoch: int) -> None:
            adv.set_epoch(epoch)
            seen.append(adv.current_eps)

        def __call__(self, w, xb, yb):  # type: ignore[no-untyped-def]
            xa = adv(w, xb, yb)
            assert float((xa - xb).abs().max()) <= adv.current_eps + 1e-6
            assert xa.min() >= 0 and xa.max() <= 1
            return xa

    small = data.subset(torch.arange(128))
    _fit(small, epochs=3, example_generator=Spy())
    assert seen == pytest.approx([EPS / 2, EPS, EPS])


@pytest.mark.parametrize("method", ["trades", "mixed", "fgsm-rs"])
def test_objectives_train(pneumonia, method):  # type: ignore[no-untyped-def]
    data, x, y = pneumonia
    adv = AdversarialTraining(method, EPS, steps=2 if method == "trades" else None, seed=0)
    net = _fit(data.subset(torch.arange(512)), epochs=1, objective=adv.objective)
    acc = float((mr.Classifier(net, num_classes=2).predict(x) == y).float().mean())
    assert acc > 0.6
    with pytest.raises(DefenseError, match="unknown adversarial training"):
        AdversarialTraining("free", EPS)
    if method == "trades":
        with pytest.raises(DefenseError, match="objective="):
            adv(mr.Classifier(net, num_classes=2), x[:2], y[:2])


def test_advprop_keeps_two_bn_statistics_and_infers_with_the_clean_one(pneumonia):  # type: ignore[no-untyped-def]
    data, x, y = pneumonia
    adv = AdversarialTraining("advprop", EPS, steps=2, seed=0)
    net = _fit(data.subset(torch.arange(512)), epochs=1, objective=adv.objective, advprop=True)
    duals = [m for m in net.modules() if isinstance(m, DualBatchNorm)]
    assert len(duals) == 4
    for d in duals:  # two sets of statistics, both updated, and different
        assert int(d.main.num_batches_tracked) > 0 and int(d.aux.num_batches_tracked) > 0
        assert not torch.allclose(d.main.running_mean, d.aux.running_mean)
    with torch.no_grad():
        out = net(x)
        with auxiliary_bn(net):
            out_aux = net(x)
    assert not torch.allclose(out, out_aux)
    keys_before = set(smallcnn(1, 2, width=8).state_dict())
    strip_auxiliary_bn(net)
    assert set(net.state_dict()) == keys_before  # the original architecture, main BN kept
    with torch.no_grad():
        assert torch.equal(net(x), out)
    acc = float((mr.Classifier(net, num_classes=2).predict(x) == y).float().mean())
    assert acc > 0.6
    with pytest.raises(DefenseError, match="add_auxiliary_bn"):
        adv.objective(mr.Classifier(net, num_classes=2), x[:4], y[:4])


@pytest.mark.parametrize("method", ["pgd", "advprop"])
def test_cli_train_adversarial(tmp_path, capsys, method) -> None:  # type: ignore[no-untyped-def]
    import json

    from medrobust.cli import main
    from medrobust.modelstore import load_model

    out = tmp_path / method
    rc = main(["train", "--data", "phantom", "--size", "16", "--limit", "48", "--epochs", "2",
               "--batch-size", "16", "--adversarial", method, "--eps", "2/255",
               "--attack-steps", "2", "--eps-warmup", "2", "--no-progress", "--out", str(out)])
    assert rc == 0
    adv = json.loads((out / "model.json").read_text())["training"]["adversarial"]
    assert adv["method"] == method and adv["eps"] == pytest.approx(2 / 255)
    assert adv["warmup_epochs"] == 2 and adv["steps"] == 2
    loaded = load_model(out)  # AdvProp: saved with the main batch norms only
    assert not any(isinstance(m, DualBatchNorm) for m in loaded.module.modules())
    rc = main(["train", "--data", "phantom", "--out", str(tmp_path / "x"), "--adversarial", "pgd"])
    assert rc == 2 and "needs --eps" in capsys.readouterr().err


def test_checkpoint_resume_gives_the_uninterrupted_weights(pneumonia, tmp_path) -> None:  # type: ignore[no-untyped-def]
    data, _, _ = pneumonia
    small = data.subset(torch.arange(192))

    def run(checkpoint: object = None, stop_at: int | None = None) -> nn.Module:
        with seeded(0):
            net = smallcnn(1, 2, width=4)
        adv = AdversarialTraining("fgsm-rs", EPS, warmup_epochs=2, seed=0)

        def stop(rec: dict) -> None:  # type: ignore[type-arg]
            if rec["epoch"] == stop_at:
                raise KeyboardInterrupt

        train(net, small, epochs=3, batch_size=64, schedule="cosine", seed=0, progress=False,
              example_generator=adv, checkpoint=checkpoint, on_epoch_end=stop)  # type: ignore[arg-type]
        return net

    full = run()
    ck = tmp_path / "ck.pt"
    with pytest.raises(KeyboardInterrupt):
        run(ck, stop_at=2)  # interrupted during epoch 2's bookkeeping
    assert torch.load(ck, weights_only=True)["epoch"] == 1
    resumed = run(ck)
    assert torch.load(ck, weights_only=True)["epoch"] == 3
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
