"""Strength and speed of medrobust's JSMA and One-Pixel against torchattacks and ART.

A small CNN is trained on PneumoniaMNIST in the script; every attack runs on the same test images
with the same budget (JSMA: theta, gamma; One-Pixel: pixels, population, generations), one CPU
thread, interleaved over repeats. Success is judged by the same model on each returned tensor; the
norm is the number of changed pixels (median over successful samples); budgets are checked.

    python benchmarks/bench_sparse.py [--n 256] [--n-onepixel 64] [--repeats 1] [--out FILE]

Foolbox 3 has neither attack; ART and torchattacks have no stAdv.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from _common import REPO, fit, load_pneumonia  # noqa: E402  (benchmarks/ is on sys.path)

import medrobust as mr
from medrobust.attacks import JSMA, OnePixel
from medrobust.nets import smallcnn


def train() -> torch.nn.Module:
    x, y = load_pneumonia("train")
    return fit(lambda: smallcnn(in_channels=1, num_classes=2, width=8), x, y, epochs=2, lr=2e-3)


Runner = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def peers(net: torch.nn.Module, theta: float, gamma: float, pixels: int, population: int,
          generations: int) -> dict[str, dict[str, Runner]]:
    out: dict[str, dict[str, Runner]] = {"jsma": {}, "onepixel": {}}
    model = mr.Classifier(net, bounds=(0.0, 1.0))
    out["jsma"]["medrobust"] = lambda x, y: JSMA(theta=theta, gamma=gamma)(model, x, y).adversarial
    out["onepixel"]["medrobust"] = lambda x, y: OnePixel(
        pixels=pixels, population=population, generations=generations, seed=0)(
        model, x, y).adversarial
    out["onepixel"]["medrobust best1"] = lambda x, y: OnePixel(
        pixels=pixels, population=population, generations=generations, strategy="best1",
        seed=0)(model, x, y).adversarial
    try:
        import torchattacks

        ta_j = torchattacks.JSMA(net, theta=theta, gamma=gamma)
        # torchattacks' untargeted JSMA targets (label + 1) % 10, out of range for 2 classes:
        # target the other class (for 2 classes the same as medrobust's runner-up target)
        ta_j.set_mode_targeted_by_function(lambda x, y: 1 - y)
        ta_o = torchattacks.OnePixel(net, pixels=pixels, steps=generations, popsize=population)
        out["jsma"]["torchattacks"] = lambda x, y: ta_j(x, y)
        out["onepixel"]["torchattacks"] = lambda x, y: ta_o(x, y)
    except Exception as e:  # pragma: no cover - reported
        print("torchattacks unavailable:", e, file=sys.stderr)
    try:
        from art.attacks.evasion import PixelAttack, SaliencyMapMethod
        from art.estimators.classification import PyTorchClassifier

        clf = PyTorchClassifier(model=net, loss=torch.nn.CrossEntropyLoss(),
                                input_shape=(1, 28, 28), nb_classes=2, clip_values=(0.0, 1.0))
        art_j = SaliencyMapMethod(clf, theta=theta, gamma=gamma, batch_size=256, verbose=False)
        art_o = PixelAttack(clf, th=pixels, es=1, max_iter=generations, verbose=False)

        def run_art_j(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            # untargeted SMM in ART: it picks a random target class != the prediction
            np.random.seed(0)
            return torch.from_numpy(art_j.generate(x.numpy())).float()

        def run_art_o(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            np.random.seed(0)
            # ART rejects labels of a 2-class model (pixel_threshold.py:164); y=None attacks the
            # predictions, the same as the labels on the correctly classified images
            return torch.from_numpy(art_o.generate(x.numpy())).float()

        out["jsma"]["art"] = run_art_j
        out["onepixel"]["art (pop 400)"] = run_art_o
    except Exception as e:  # pragma: no cover - reported
        print("ART unavailable:", e, file=sys.stderr)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--n-onepixel", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--theta", type=float, default=1.0)
    ap.add_argument("--gamma", type=float, default=0.1)
    ap.add_argument("--pixels", type=int, default=3)
    ap.add_argument("--population", type=int, default=400)
    ap.add_argument("--generations", type=int, default=10)
    ap.add_argument("--only", default="")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "RESULTS_sparse.md"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    net = train()
    xt, yt = load_pneumonia("test")
    model = mr.Classifier(net, bounds=(0.0, 1.0))
    idx = torch.randperm(len(xt), generator=torch.Generator().manual_seed(0))[:args.n]
    x_all, y_all = xt[idx], yt[idx]
    acc = float((model.predict(x_all) == y_all).float().mean())
    print(f"trained in {time.time() - t0:.0f}s, clean accuracy {acc:.3f} on {args.n}", flush=True)
    runners = peers(net, args.theta, args.gamma, args.pixels, args.population, args.generations)
    d = x_all[0].numel()
    rows = []
    for attack, libs in runners.items():
        if args.only and attack != args.only:
            continue
        n = args.n if attack == "jsma" else args.n_onepixel
        x, y = x_all[:n], y_all[:n]
        times: dict[str, list[float]] = {lib: [] for lib in libs}
        results: dict[str, torch.Tensor] = {}
        for _ in range(args.repeats):
            for lib, fn in libs.items():  # interleaved
                t = time.perf_counter()
                adv = fn(x.clone(), y.clone())
                times[lib].append(time.perf_counter() - t)
                results[lib] = adv.detach().float()
                print(f"{attack} {lib}: {times[lib][-1]:.1f}s", flush=True)
        clean_ok = model.predict(x) == y
        for lib, adv in results.items():
            pred = model.predict(adv)
            ok = pred != y
            in_bounds = bool(adv.min() >= 0) and bool(adv.max() <= 1)
            delta = adv - x
            l0 = (delta != 0).flatten(1).sum(1)
            pix = (delta != 0).any(1).flatten(1).sum(1)
            budget = (math.floor(args.gamma * d / 2) * 2 if attack == "jsma" else args.pixels)
            used = l0 if attack == "jsma" else pix
            rows.append({
                "attack": attack, "lib": lib, "n": n,
                "success": float(ok.float().mean()),
                "median_pixels": float(pix[ok & clean_ok].float().median())
                if (ok & clean_ok).any() else float("nan"),
                "max_budget_used": int(used.max()), "budget": budget,
                "time": statistics.median(times[lib]), "in_bounds": in_bounds,
            })
    lines = [
        "# Sparse attacks: medrobust vs torchattacks and ART",
        "",
        f"SmallCNN (width 8, 2 epochs) on PneumoniaMNIST, clean accuracy {acc:.3f} on the first "
        f"{args.n} shuffled test images (seed 0); torch {torch.__version__}, 1 CPU thread "
        f"(`torch.set_num_threads(1)`), a shared 2-core machine (timings are noisy); median of "
        f"{args.repeats} interleaved run(s).",
        "",
        f"JSMA: theta={args.theta}, gamma={args.gamma} (at most "
        f"{math.floor(args.gamma * d / 2) * 2} changed features of {d}), untargeted. One-Pixel: "
        f"pixels={args.pixels}, population "
        f"{args.population}, generations {args.generations}, untargeted (ART's population is fixed "
        "at 400).",
        "",
        "Success: fraction of images the model misclassifies on the returned tensor (images it "
        "already got wrong count). Pixels: median changed pixels over the successful images the "
        "model got right. Budget: "
        "largest number of changed features (JSMA) / pixels (One-Pixel) over all images.",
        "",
        "| attack | library | images | success | median pixels | max used / budget | time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['attack']} | {r['lib']} | {r['n']} | {r['success']:.3f} | "
            f"{r['median_pixels']:.1f} | {r['max_budget_used']} / {r['budget']} | "
            f"{r['time']:.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.only:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
