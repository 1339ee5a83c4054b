"""medrobust's ``standard`` ensemble against torchattacks' ``AutoAttack(version='standard')`` at
full strength (APGD-CE, APGD-T, FAB-T with 100 steps, Square with 5000 queries) and the reference
AutoAttack (Croce & Hein's code, PyPI ``pyautoattack``), on small CNNs trained here on
PneumoniaMNIST (binary) and RetinaMNIST (RGB, 5 grades), L-inf eps 1, 2, 4, 8 /255.

Robust accuracy is over all evaluated test images (a misclassified clean image counts as broken).
medrobust runs through ``medrobust.evaluate`` (the product, with its clean pass, pre-flight checks
and bookkeeping; no large-eps check, no gallery). torchattacks' AutoAttack indexes a third class
and fails on two-class models: the error is caught and reported in the table.

Run: ``PYTHONPATH=src python benchmarks/bench_autoattack.py [n_images] [eps,...] [data]`` (eps in
1/255, data ``pneumonia`` or ``retina`` to run one of the two); the table goes
to stdout and into ``RESULTS_autoattack.md`` (copied by hand with the machine's load noted).
``torchattacks`` and ``pyautoattack`` are benchmark-only comparisons, never dependencies.
"""

from __future__ import annotations

import sys
import time
import warnings
from typing import Any

import numpy as np
import torch
from _common import DATA, fit, load_pneumonia

import medrobust as mr
from medrobust.data import ImageData
from medrobust.nets import smallcnn

try:
    import torchattacks
    from pyautoattack import AutoAttack as ReferenceAutoAttack
except ImportError as e:  # pragma: no cover - benchmark only
    raise SystemExit("pip install --no-deps torchattacks pyautoattack to run this") from e


def load_retina(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    with np.load(DATA / "retinamnist.npz") as f:
        x = torch.from_numpy(f[f"{split}_images"]).float().div(255.0).permute(0, 3, 1, 2)
        y = torch.from_numpy(f[f"{split}_labels"][:, 0].astype(np.int64))
    return x.contiguous(), y


def accuracy(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((net(x).argmax(1) == y).float().mean())


def run_medrobust(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, k: int,
                  eps: float) -> tuple[float, float, dict[str, Any]]:
    names = ["normal", "pneumonia"] if k == 2 else [f"grade {i}" for i in range(k)]
    data = ImageData(x, y, (0.0, 1.0), "intensity", "binary" if k == 2 else "ordinal", names)
    model = mr.Classifier(net, bounds=(0.0, 1.0), num_classes=k)
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = mr.evaluate(model, data, "standard", eps=[eps], batch_size=len(x), seed=0,
                          progress=False, large_eps=False, gallery=0, robust_auc=False)
    dt = time.perf_counter() - t
    e = res.results["attacks"]["standard"]["per_eps"][0]
    info = {"broken_by": e["broken_by"],
            "seconds": res.results["run"]["timing"]["standard"]["components"]}
    return float(e["robust_accuracy"]["value"]), dt, info


def run_torchattacks(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, k: int,
                     eps: float) -> tuple[float | None, float, str]:
    aa = torchattacks.AutoAttack(net, norm="Linf", eps=eps, version="standard", n_classes=k,
                                 seed=0)
    for atk in aa._autoattack.attacks:  # full strength: 100 steps, Square 5000 queries
        if hasattr(atk, "steps"):
            atk.steps = 100
        if hasattr(atk, "n_queries"):
            atk.n_queries = 5000
    t = time.perf_counter()
    try:
        adv = aa(x, y)
    except Exception as err:  # torchattacks fails on two classes (IndexError)
        return None, time.perf_counter() - t, f"{type(err).__name__}: {str(err)[:60]}"
    return accuracy(net, adv, y), time.perf_counter() - t, ""


def run_reference(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, k: int,
                  eps: float) -> tuple[float | None, float, str]:
    aa = ReferenceAutoAttack(net, norm="Linf", eps=eps, version="standard", device="cpu",
                             seed=0)
    # the reference asks for 9 target classes whatever K; K - 1 is all there are (on K = 2 its
    # targeted DLR loss still needs a third class and fails)
    aa.apgd_targeted.n_target_classes = min(9, k - 1)
    aa.fab.n_target_classes = min(9, k - 1)
    t = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            adv = aa.run_standard_evaluation(x.clone(), y.clone(), batch_size=len(x))
        if isinstance(adv, tuple):  # pyautoattack returns (adversarial, labels)
            adv = adv[0]
    except Exception as err:
        return None, time.perf_counter() - t, f"{type(err).__name__}: {str(err)[:60]}"
    return accuracy(net, adv, y), time.perf_counter() - t, ""


def main() -> None:
    torch.set_num_threads(1)
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    eps_list = ([float(e) / 255 for e in sys.argv[2].split(",")] if len(sys.argv) > 2
                else [1 / 255, 2 / 255, 4 / 255, 8 / 255])
    only = sys.argv[3] if len(sys.argv) > 3 else ""
    todo = []
    if only in ("", "pneumonia"):
        xp, yp = load_pneumonia("train")
        pneu = fit(lambda: smallcnn(in_channels=1, num_classes=2, width=8), xp, yp, epochs=2,
                   lr=2e-3)
        todo.append(("PneumoniaMNIST", pneu, load_pneumonia("test"), 2))
    if only in ("", "retina"):
        xr, yr = load_retina("train")
        retina = fit(lambda: smallcnn(in_channels=3, num_classes=5, width=16), xr, yr,
                     epochs=12, lr=2e-3)
        todo.append(("RetinaMNIST", retina, load_retina("test"), 5))
    rows = []
    for name, net, (xt, yt), k in todo:
        g = torch.Generator().manual_seed(0)
        idx = torch.randperm(len(xt), generator=g)[:n]
        x, y = xt[idx].contiguous(), yt[idx].contiguous()
        print(f"{name}: clean accuracy {accuracy(net, x, y):.3f} on {n} test images",
              flush=True)
        for eps in eps_list:
            ra, t, broken = run_medrobust(net, x, y, k, eps)
            print(f"    medrobust {ra:.3f} ({t:.1f} s) {broken}", flush=True)
            ta, tt, terr = run_torchattacks(net, x, y, k, eps)
            print(f"    torchattacks {ta} ({tt:.1f} s) {terr}", flush=True)
            rr, rt, rerr = run_reference(net, x, y, k, eps)
            rows.append((name, eps, ra, t, broken, ta, tt, terr, rr, rt, rerr))
            print(f"  eps {eps * 255:.0f}/255: medrobust {ra:.3f} ({t:.1f} s, {broken}); "
                  f"torchattacks {ta if ta is None else f'{ta:.3f}'} ({tt:.1f} s) {terr}; "
                  f"reference {rr if rr is None else f'{rr:.3f}'} ({rt:.1f} s) {rerr}",
                  flush=True)
    print("\n| data | eps | medrobust RA | torchattacks RA | reference RA | medrobust s | "
          "torchattacks s | reference s | medrobust / torchattacks time | medrobust / "
          "reference time |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, eps, ra, t, _, ta, tt, terr, rr, rt, rerr in rows:
        tcell = f"{ta:.3f}" if ta is not None else f"fails ({terr})"
        rcell = f"{rr:.3f}" if rr is not None else f"fails ({rerr})"
        ratio_t = f"{t / tt:.2f}" if ta is not None else "n/a"
        ratio_r = f"{t / rt:.2f}" if rr is not None else "n/a"
        print(f"| {name} | {eps * 255:.0f}/255 | {ra:.3f} | {tcell} | {rcell} | {t:.1f} | "
              f"{tt:.1f} | {rt:.1f} | {ratio_t} | {ratio_r} |")
    print("\nmedrobust per component (samples broken; seconds):")
    for name, eps, _, _, broken, *_ in rows:
        print(f"  {name} eps {eps * 255:.0f}/255: {broken}")


if __name__ == "__main__":
    main()
