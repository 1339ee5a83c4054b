"""PGD-Linf speed and strength: medrobust vs the textbook PyTorch loop vs peer libraries.

Setting (issue 2): 20 steps, eps 0.1, step 0.01, uniform random start; a small CNN on a batch of 256
and a ResNet-18 for 28x28 inputs (MedMNIST v2 variant) on a batch of 64, both trained briefly on
PneumoniaMNIST when the file is found (``MEDROBUST_DATA``), so that robust accuracy means something.
Runs are interleaved (each repetition times every method once, in turn) and the median of
``--reps`` is reported, as ratios to the plain loop measured in the same run. medrobust's time
includes everything it spends beyond the loop (input checks, the final forward pass that computes
``success``). torchattacks, foolbox and adversarial-robustness-toolbox are timed when installed.

    python benchmarks/bench_pgd.py [--reps 3] [--threads N] [--out benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from _common import PNEUMONIA, REPO, fit, load_pneumonia  # noqa: E402  (benchmarks/ is on sys.path)

import medrobust as mr
from medrobust.attacks import PGD
from medrobust.nets import build_network

EPS, STEP, STEPS = 0.1, 0.01, 20
def load_or_none(split: str, n: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    return load_pneumonia(split, n) if PNEUMONIA.is_file() else None


def train_briefly(net: torch.nn.Module, n: int, epochs: int) -> str:
    data = load_or_none("train", n)
    if data is None:
        return "untrained (PneumoniaMNIST not found)"
    fit(lambda: net, *data, epochs=epochs, lr=1e-3)
    return f"trained {epochs} epoch(s) on {len(data[0])} PneumoniaMNIST images"


def plain_pgd(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, g: torch.Generator
              ) -> torch.Tensor:
    """The textbook loop: one forward and one input gradient per step, sign step, clamp."""
    delta = (torch.rand(x.shape, generator=g) * 2 - 1) * EPS
    xa = (x + delta).clamp(0, 1)
    for _ in range(STEPS):
        xa.requires_grad_(True)
        loss = F.cross_entropy(net(xa), y)
        (grad,) = torch.autograd.grad(loss, xa)
        xa = xa.detach() + STEP * grad.sign()
        xa = torch.min(torch.max(xa, x - EPS), x + EPS).clamp(0, 1)
    return xa.detach()


def accuracy(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((net(x).argmax(1) == y).float().mean())


def peers(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor
          ) -> dict[str, Callable[[], torch.Tensor]]:
    out: dict[str, Callable[[], torch.Tensor]] = {}
    try:
        import torchattacks

        ta = torchattacks.PGD(net, eps=EPS, alpha=STEP, steps=STEPS, random_start=True)
        out["torchattacks"] = lambda: ta(x, y)
    except Exception as err:  # noqa: BLE001 - an optional peer; report and go on
        print(f"torchattacks unavailable: {err}", file=sys.stderr)
    try:
        import foolbox as fb

        fmodel = fb.PyTorchModel(net, bounds=(0, 1))
        fa = fb.attacks.LinfPGD(abs_stepsize=STEP, steps=STEPS, random_start=True)
        out["foolbox"] = lambda: fa(fmodel, x, y, epsilons=EPS)[1]
    except Exception as err:  # noqa: BLE001
        print(f"foolbox unavailable: {err}", file=sys.stderr)
    try:
        from art.attacks.evasion import ProjectedGradientDescentPyTorch
        from art.estimators.classification import PyTorchClassifier

        clf = PyTorchClassifier(
            net, loss=torch.nn.CrossEntropyLoss(), input_shape=tuple(x.shape[1:]),
            nb_classes=2, clip_values=(0.0, 1.0), device_type="cpu",
        )
        aa = ProjectedGradientDescentPyTorch(
            clf, norm=np.inf, eps=EPS, eps_step=STEP, max_iter=STEPS, num_random_init=1,
            batch_size=len(x), verbose=False,
        )
        xn, yn = x.numpy(), y.numpy()
        out["adversarial-robustness-toolbox"] = lambda: torch.from_numpy(aa.generate(xn, yn))
    except Exception as err:  # noqa: BLE001
        print(f"adversarial-robustness-toolbox unavailable: {err}", file=sys.stderr)
    return out


def bench(name: str, net: torch.nn.Module, batch: int, reps: int, note: str) -> list[str]:
    data = load_or_none("test", batch)
    if data is None:
        g = torch.Generator().manual_seed(0)
        x, y = torch.rand(batch, 1, 28, 28, generator=g), torch.randint(0, 2, (batch,), generator=g)
    else:
        x, y = data
    net.eval()
    model = mr.Classifier(net, bounds=(0.0, 1.0), chunk_size=batch)
    results: dict[str, dict[str, float]] = {}

    def mr_run(early: bool) -> Callable[[], torch.Tensor]:
        attack = PGD(eps=EPS, steps=STEPS, step_size=STEP, random_start=True, seed=0,
                     early_stop=early)

        def run() -> torch.Tensor:
            res = attack(model, x, y)
            results.setdefault(f"medrobust{' early_stop' if early else ''}", {})[
                "reported_acc"] = res.robust_accuracy
            return res.adversarial
        return run

    g = torch.Generator()
    methods: dict[str, Callable[[], torch.Tensor]] = {
        "plain PyTorch loop": lambda: plain_pgd(net, x, y, g.manual_seed(0)),
        "medrobust": mr_run(False),
        "medrobust early_stop": mr_run(True),
    }
    methods.update(peers(net, x, y))
    times: dict[str, list[float]] = {k: [] for k in methods}
    advs: dict[str, torch.Tensor] = {}
    for k, fn in methods.items():  # warm-up, untimed
        advs[k] = fn()
    for _ in range(reps):
        for k, fn in methods.items():
            t0 = time.perf_counter()
            advs[k] = fn()
            times[k].append(time.perf_counter() - t0)
    base = statistics.median(times["plain PyTorch loop"])
    lines = [
        f"### {name}, batch {batch} ({note})",
        "",
        f"clean accuracy {accuracy(net, x, y):.3f}",
        "",
        "| method | median time / plain loop | robust accuracy | max Linf |",
        "|---|---|---|---|",
    ]
    for k in methods:
        adv = advs[k].detach().float()
        acc = accuracy(net, adv, y)
        linf = float((adv - x).abs().amax())
        ratio = statistics.median(times[k]) / base
        lines.append(f"| {k} | {ratio:.3f} | {acc:.3f} | {linf:.4f} |")
    lines.append("")
    print("\n".join(lines), flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "RESULTS.md"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        small = build_network("smallcnn", in_channels=1, num_classes=2, width=16)
        resnet = build_network("resnet18", in_channels=1, num_classes=2)
    sections = [
        bench("small CNN", small, 256, args.reps, train_briefly(small, 4708, 2)),
        bench("ResNet-18 (28 px)", resnet, 64, args.reps, train_briefly(resnet, 2048, 2)),
    ]
    header = [
        "# PGD-Linf benchmark (issue 2)",
        "",
        f"PGD-Linf, {STEPS} steps, eps {EPS}, step {STEP}, random start. Ratios are median time "
        f"over {args.reps} interleaved repetitions divided by the plain PyTorch loop's median in "
        "the same run (lower is faster). Robust accuracy is measured by the benchmark on each "
        "method's output.",
        "",
        f"Machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"python {platform.python_version()}.",
        "",
    ]
    Path(args.out).write_text("\n".join(header + [s for sec in sections for s in sec]) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
