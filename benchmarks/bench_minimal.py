"""Strength and speed of the minimum-norm attacks against foolbox, ART and torchattacks.

A small CNN (``medrobust.nets.smallcnn``, width 8) is trained on PneumoniaMNIST inside the script
(one epoch, seconds) and attacked on 256 test images with the same iteration budget for every
library (same steps, binary-search steps, step size and initial constant). Reported per library:
success rate on the 256 images, the median perturbation norm over the images the model classifies
correctly (a failure counts as +inf, so a weaker attack cannot look smaller by failing), and the
wall time: median of ``--repeats`` interleaved runs, one CPU thread.

    python benchmarks/bench_minimal.py [--repeats 3] [--steps 100] [--bs 5] [--out FILE]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from _common import REPO, fit, load_pneumonia  # noqa: E402  (benchmarks/ is on sys.path)

import medrobust as mr
from medrobust.attacks import EAD, CarliniWagnerL2, DeepFool
from medrobust.nets import smallcnn


def train() -> torch.nn.Module:
    x, y = load_pneumonia("train")
    return fit(lambda: smallcnn(in_channels=1, num_classes=2, width=8), x, y, epochs=2, lr=2e-3)


Runner = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def runners(net: torch.nn.Module, steps: int, bs: int) -> dict[str, dict[str, Runner]]:
    model = mr.Classifier(net, bounds=(0.0, 1.0))
    out: dict[str, dict[str, Runner]] = {"DeepFool L2": {}, "C&W L2": {}, "EAD": {}}

    def ours(atk: mr.attacks.Attack) -> Runner:
        return lambda x, y: atk(model, x, y).adversarial

    out["DeepFool L2"]["medrobust"] = ours(DeepFool(steps=50, candidates=10, overshoot=0.02))
    out["C&W L2"]["medrobust"] = ours(CarliniWagnerL2(binary_search_steps=bs, steps=steps))
    out["EAD"]["medrobust"] = ours(EAD(binary_search_steps=bs, steps=steps, beta=1e-2))
    try:
        import foolbox as fb

        fmodel = fb.PyTorchModel(net, bounds=(0, 1))

        def fool(atk: object) -> Runner:
            def run(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
                _, adv, _ = atk(fmodel, x, y, epsilons=None)  # type: ignore[operator]
                return adv

            return run

        fa = fb.attacks
        out["DeepFool L2"]["foolbox"] = fool(fa.L2DeepFoolAttack(steps=50, candidates=10,
                                                                  overshoot=0.02))
        out["C&W L2"]["foolbox"] = fool(fa.L2CarliniWagnerAttack(
            binary_search_steps=bs, steps=steps, stepsize=0.01, initial_const=1e-3))
        out["EAD"]["foolbox"] = fool(fa.EADAttack(
            binary_search_steps=bs, steps=steps, initial_stepsize=0.01, initial_const=1e-3,
            regularization=1e-2, decision_rule="EN"))
    except ImportError as e:
        print("foolbox unavailable:", e, file=sys.stderr)
    try:
        from art.attacks.evasion import CarliniL2Method, ElasticNet
        from art.attacks.evasion import DeepFool as ArtDeepFool
        from art.estimators.classification import PyTorchClassifier

        clf = PyTorchClassifier(model=net, loss=torch.nn.CrossEntropyLoss(),
                                input_shape=(1, 28, 28), nb_classes=2, clip_values=(0.0, 1.0))

        def art(atk: object) -> Runner:
            def run(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
                adv = atk.generate(x.numpy(), y=np.eye(2)[y.numpy()])  # type: ignore[attr-defined]
                return torch.from_numpy(np.asarray(adv)).float()

            return run

        out["DeepFool L2"]["ART"] = art(ArtDeepFool(clf, max_iter=50, epsilon=0.02, nb_grads=10,
                                                    batch_size=256, verbose=False))
        out["C&W L2"]["ART"] = art(CarliniL2Method(
            clf, binary_search_steps=bs, max_iter=steps, learning_rate=0.01, initial_const=1e-3,
            batch_size=256, verbose=False))
        out["EAD"]["ART"] = art(ElasticNet(
            clf, binary_search_steps=bs, max_iter=steps, learning_rate=0.01, initial_const=1e-3,
            beta=1e-2, decision_rule="EN", batch_size=256, verbose=False))
    except ImportError as e:
        print("ART unavailable:", e, file=sys.stderr)
    try:
        import torchattacks as ta

        def tatk(atk: object) -> Runner:
            return lambda x, y: atk(x, y).detach()  # type: ignore[operator]

        out["DeepFool L2"]["torchattacks"] = tatk(ta.DeepFool(net, steps=50, overshoot=0.02))
        # torchattacks' CW has no binary search: one c, the same total number of Adam steps
        out["C&W L2"]["torchattacks"] = tatk(ta.CW(net, c=1.0, kappa=0, steps=steps * bs,
                                                   lr=0.01))
    except ImportError as e:
        print("torchattacks unavailable:", e, file=sys.stderr)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--bs", type=int, default=5)
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--slow", type=float, default=90.0,
                    help="a peer whose first run takes longer than this runs only once")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "RESULTS_minimal.md")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    t0 = time.time()
    net = train()
    xt, yt = load_pneumonia("test")
    idx = torch.randperm(len(xt), generator=torch.Generator().manual_seed(0))[: args.n]
    x, y = xt[idx].contiguous(), yt[idx].contiguous()
    with torch.no_grad():
        correct = net(x).argmax(1) == y
    print(f"trained in {time.time() - t0:.0f}s; clean accuracy {float(correct.float().mean()):.3f}")
    table = runners(net, args.steps, args.bs)
    times: dict[tuple[str, str], list[float]] = {}
    stats: dict[tuple[str, str], tuple[float, float, float]] = {}
    for rep in range(args.repeats):
        for attack, libs in table.items():
            for lib, run in libs.items():
                key = (attack, lib)
                if rep > 0 and times.get(key) and times[key][0] > args.slow:
                    continue
                torch.manual_seed(rep)
                start = time.perf_counter()
                adv = run(x.clone(), y.clone())
                dt = time.perf_counter() - start
                times.setdefault(key, []).append(dt)
                adv = adv.clamp(0, 1)
                with torch.no_grad():
                    succ = net(adv).argmax(1) != y
                d = (adv - x).flatten(1)
                l2 = torch.where(succ, d.norm(dim=1), torch.full_like(d[:, 0], float("inf")))
                l1 = torch.where(succ, d.abs().sum(1), torch.full_like(d[:, 0], float("inf")))
                stats[key] = (float(succ.float().mean()), float(l2[correct].median()),
                              float(l1[correct].median()))
                print(f"rep {rep} {attack:12s} {lib:13s} {dt:7.2f}s success {stats[key][0]:.3f} "
                      f"median L2 {stats[key][1]:.4f} L1 {stats[key][2]:.3f}", flush=True)
    lines = [
        "# Minimum-norm attacks: medrobust vs foolbox, ART, torchattacks",
        "",
        f"SmallCNN (width 8) trained 2 epochs on PneumoniaMNIST; {args.n} test images (clean "
        f"accuracy {float(correct.float().mean()):.3f}); one CPU thread "
        "(`torch.set_num_threads(1)`); shared 2-core machine (timings noisy). Budget: DeepFool "
        f"50 steps, 10 candidates, overshoot 0.02; C&W and EAD {args.bs} binary-search steps x "
        f"{args.steps} steps, "
        "lr 0.01, initial c 1e-3 (EAD: beta 0.01, FISTA, EN rule); torchattacks' CW has no binary "
        f"search (c = 1, {args.bs * args.steps} steps). Median norm over correctly classified "
        "images, failures counted as +inf. Time: median of the interleaved repeats (peers slower "
        f"than {args.slow:.0f} s ran once). Ratios are medrobust / best peer (norm) and "
        "medrobust / fastest peer (time).",
        "",
        "| attack | library | success | median L2 | median L1 | time (s) | runs |",
        "|---|---|---|---|---|---|---|",
    ]
    for attack, libs in table.items():
        for lib in libs:
            s, l2, l1 = stats[(attack, lib)]
            ts = times[(attack, lib)]
            lines.append(f"| {attack} | {lib} | {s:.3f} | {l2:.4f} | {l1:.3f} | "
                         f"{statistics.median(ts):.2f} | {len(ts)} |")
        peers = [lib for lib in libs if lib != "medrobust"]
        if peers:
            s, l2, l1 = stats[(attack, "medrobust")]
            t = statistics.median(times[(attack, "medrobust")])
            best_s = max(stats[(attack, p)][0] for p in peers)
            col = 2 if attack == "EAD" else 1
            best_n = min(stats[(attack, p)][col] for p in peers)
            fastest = min(statistics.median(times[(attack, p)]) for p in peers)
            mine = l1 if attack == "EAD" else l2
            lines.append(
                f"| {attack} | **ratio** | {s - best_s:+.3f} vs best | "
                f"{'' if col == 2 else f'{mine / best_n:.3f}'} | "
                f"{f'{mine / best_n:.3f}' if col == 2 else ''} | {t / fastest:.3f} | |")
    lines.append("")
    lines.append(f"Total wall time {time.time() - t0:.0f} s; torch {torch.__version__}.")
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
