"""Defenses on PneumoniaMNIST: adversarial training, input transforms naive vs adaptive, smoothing.

Run (one thread; a few minutes on an idle CPU)::

    PYTHONPATH=src python benchmarks/bench_defenses.py [--quick] [--sections training,...]

Sections (each small, figures measured on this machine and written to the markdown file):

1. Small CNNs (width 16) trained for 2 epochs on the PneumoniaMNIST training set with standard
   training, FGSM-RS, PGD-AT (eps 4/255) and TRADES, and AdvProp: clean accuracy and robust
   accuracy on test images at eps 1/255, 2/255, 4/255 (the per-sample worst case of FGSM and
   PGD-20 with margin and CE losses), and the training time.
2. Every input transform in front of the standard model: robust accuracy under the naive PGD (end
   to end, autograd's gradient) and the adaptive one (BPDA for non-differentiable transforms, EOT
   for randomized ones), eps 4/255.
3. Randomized smoothing (sigma 0.25, Gaussian-noise training): certified accuracy at L2 radii 0.1,
   0.25, 0.5 with Cohen et al.'s CERTIFY (n, n0, alpha below; far fewer draws and images than the
   paper's n = 100,000 on 500 images, to fit the CPU).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load_pneumonia  # noqa: E402

import medrobust as mr  # noqa: E402
from medrobust.attacks.gradient import FGSM, PGD  # noqa: E402
from medrobust.data.base import ImageData  # noqa: E402
from medrobust.defenses import get_defense  # noqa: E402
from medrobust.defenses.smoothing import SmoothedClassifier, gaussian_noise_generator  # noqa: E402
from medrobust.defenses.training import (  # noqa: E402
    AdversarialTraining,
    add_auxiliary_bn,
    strip_auxiliary_bn,
)
from medrobust.nets import smallcnn  # noqa: E402
from medrobust.training import seeded, train  # noqa: E402

EPS = [1 / 255, 2 / 255, 4 / 255]


def _data(n_train: int, n_test: int) -> tuple[ImageData, torch.Tensor, torch.Tensor]:
    x, y = load_pneumonia("train")
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(x), generator=g)[:n_train]
    data = ImageData(x[idx], y[idx], (0.0, 1.0), "intensity", "binary", ["normal", "pneumonia"])
    xt, yt = load_pneumonia("test")
    it = torch.randperm(len(xt), generator=g)[:n_test]
    return data, xt[it], yt[it]


def _train(data: ImageData, method: str | None, epochs: int, eps: float = 4 / 255,
           **kw: Any) -> tuple[torch.nn.Module, float]:
    with seeded(0):
        net = smallcnn(1, 2, width=16)
    hooks: dict[str, Any] = {}
    if method == "noise":
        hooks["example_generator"] = gaussian_noise_generator(kw["sigma"], seed=0)
    elif method is not None:
        adv = AdversarialTraining(method, eps, seed=0, **kw)
        if method == "advprop":
            add_auxiliary_bn(net)
        hooks = ({"example_generator": adv} if method in ("fgsm-rs", "pgd")
                 else {"objective": adv.objective})
    t0 = time.perf_counter()
    train(net, data, epochs=epochs, batch_size=64, lr=2e-3, schedule="none", seed=0,
          progress=False, **hooks)
    seconds = time.perf_counter() - t0
    if method == "advprop":
        strip_auxiliary_bn(net)
    return net.eval(), seconds


def _worst_case(model: mr.Classifier, x: torch.Tensor, y: torch.Tensor, eps: float) -> float:
    robust = model.predict(x) == y
    for attack in (FGSM(eps), PGD(eps, steps=20, seed=0),
                   PGD(eps, steps=20, loss="margin", seed=1)):
        robust &= ~attack(model, x, y).success
    return float(robust.float().mean())


def section_training(data: ImageData, x: torch.Tensor, y: torch.Tensor,
                     epochs: int) -> list[dict[str, Any]]:
    rows = []
    for method, kw in [(None, {}), ("fgsm-rs", {}), ("pgd", {"steps": 3}),
                       ("trades", {"steps": 3}), ("advprop", {"steps": 3})]:
        net, secs = _train(data, method, epochs, **kw)
        model = mr.Classifier(net, num_classes=2)
        row: dict[str, Any] = {"method": method or "standard", "train_s": round(secs, 1),
                               "clean": float((model.predict(x) == y).float().mean())}
        if method != "advprop":
            for e in EPS:
                row[f"robust_{round(e * 255)}"] = _worst_case(model, x, y, e)
        rows.append(row)
        print(row, flush=True)
    return rows


TRANSFORMS: list[tuple[str, dict[str, Any]]] = [
    ("median", {"size": 3}),
    ("gaussian", {"sigma": 1.0}),
    ("jpeg", {"quality": 60, "approximation": "dct"}),
    ("bitdepth", {"bits": 4}),
    ("tvm", {"seed": 0}),
    ("resize-pad", {"seed": 0}),
    ("noise", {"sigma": 0.05, "seed": 0}),
]


def section_transforms(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
                       eot: int) -> list[dict[str, Any]]:
    rows = []
    plain = mr.Classifier(net, num_classes=2)
    rows.append({"defense": "none", "clean": float((plain.predict(x) == y).float().mean()),
                 "naive": _robust(plain, x, y, eps), "adaptive": None, "how": "-"})
    print(rows[-1], flush=True)
    for name, opts in TRANSFORMS:
        d = get_defense(name, **opts)
        model = mr.Classifier(net, num_classes=2, defense=d)
        n = x.shape[0] if name != "tvm" else min(32, x.shape[0])  # TV solver: slow on one core
        xs, ys = x[:n], y[:n]
        kw: dict[str, Any] = {}
        if not d.differentiable:
            kw["bpda"] = True
        if d.randomized:
            kw["eot"] = eot
        t0 = time.perf_counter()
        row = {"defense": name, "options": opts, "n": n,
               "clean": float((model.predict(xs) == ys).float().mean()),
               "naive": _robust(model, xs, ys, eps),
               "adaptive": _robust(model, xs, ys, eps, **kw),
               "how": "+".join(f"{k}={v}" for k, v in kw.items()) or "autograd",
               "seconds": round(time.perf_counter() - t0, 1)}
        rows.append(row)
        print(row, flush=True)
    return rows


def _robust(model: mr.Classifier, x: torch.Tensor, y: torch.Tensor, eps: float,
            **kw: Any) -> float:
    res = PGD(eps, steps=20, seed=0, **kw)(model, x, y)
    return float((~res.success).float().mean())


def section_smoothing(data: ImageData, x: torch.Tensor, y: torch.Tensor, epochs: int, n: int,
                      n0: int, alpha: float) -> dict[str, Any]:
    net, secs = _train(data, "noise", epochs, sigma=0.25)
    sc = SmoothedClassifier(mr.Classifier(net, num_classes=2), 0.25, seed=0)
    t0 = time.perf_counter()
    cert = sc.certify(x, n0=n0, n=n, alpha=alpha)
    radii = [0.0, 0.1, 0.25, 0.5]
    out = {"sigma": 0.25, "n": n, "n0": n0, "alpha": alpha, "images": int(x.shape[0]),
           "train_s": round(secs, 1), "certify_s": round(time.perf_counter() - t0, 1),
           "abstentions": cert.abstentions,
           "certified_accuracy": dict(zip(map(str, radii), cert.certified_accuracy(y, radii),
                                          strict=True))}
    print(out, flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=str(Path(__file__).parent / "RESULTS_defenses.md"))
    p.add_argument("--sections", default="training,transforms,smoothing")
    args = p.parse_args()
    torch.set_num_threads(1)
    n_train, n_test, epochs = (1024, 64, 1) if args.quick else (4708, 200, 2)
    data, x, y = _data(n_train, n_test)
    results: dict[str, Any] = {"n_train": n_train, "n_test": n_test, "epochs": epochs}
    sections = args.sections.split(",")
    t0 = time.perf_counter()
    if "training" in sections:
        results["training"] = section_training(data, x, y, epochs)
    if "transforms" in sections:
        net, _ = _train(data, None, epochs)
        results["transforms"] = section_transforms(net, x[:96], y[:96], 4 / 255, eot=8)
    if "smoothing" in sections:
        results["smoothing"] = section_smoothing(data, x[:50], y[:50], epochs,
                                                 n=200 if args.quick else 2000, n0=64,
                                                 alpha=0.001)
    results["total_s"] = round(time.perf_counter() - t0, 1)
    json_path = Path(args.out).with_suffix(".json")
    json_path.write_text(json.dumps(results, indent=1))
    print(f"wrote {json_path}", flush=True)


if __name__ == "__main__":
    main()
