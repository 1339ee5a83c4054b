"""medrobust's APGD / APGD-T against the reference implementation (Croce & Hein's code, PyPI
``pyautoattack``) at equal eps, steps and restarts, on small CNNs trained here on RetinaMNIST
(RGB, 5 grades) and PneumoniaMNIST (binary).

Robust accuracy is over all evaluated test images (a misclassified clean image counts as broken).
Run: ``PYTHONPATH=src python benchmarks/bench_apgd_reference.py [n_images]``; writes the table to
stdout (copied into ``RESULTS_apgd.md``). ``pyautoattack`` is a benchmark-only comparison, never a
dependency (install it with ``pip install --no-deps pyautoattack``).
"""

from __future__ import annotations

import sys
import time
import warnings

import numpy as np
import torch
from _common import DATA, fit, load_pneumonia

import medrobust as mr
from medrobust.attacks import APGD, APGDT, PGD
from medrobust.nets import smallcnn

try:
    from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted
except ImportError as e:  # pragma: no cover - benchmark only
    raise SystemExit("pip install --no-deps pyautoattack to run this comparison") from e


def load_retina(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    with np.load(DATA / "retinamnist.npz") as f:
        x = torch.from_numpy(f[f"{split}_images"]).float().div(255.0).permute(0, 3, 1, 2)
        y = torch.from_numpy(f[f"{split}_labels"][:, 0].astype(np.int64))
    return x.contiguous(), y


def robust(net: torch.nn.Module, adv: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((net(adv).argmax(1) == y).float().mean())


def reference(net, x, y, eps, norm, loss, steps, targets=None):
    if targets is None:
        atk = APGDAttack(net, n_iter=steps, norm=norm, n_restarts=1, eps=eps, seed=0, loss=loss,
                         device="cpu")
    else:
        atk = APGDAttack_targeted(net, n_iter=steps, norm=norm, n_restarts=1, eps=eps, seed=0,
                                  n_target_classes=targets, device="cpu")
    t = time.perf_counter()
    adv = atk.perturb(x.clone(), y.clone())
    return robust(net, adv, y), time.perf_counter() - t


def ours(attack, net, x, y):
    model = mr.Classifier(net, bounds=(0.0, 1.0))
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = attack(model, x, y)
    return res.robust_accuracy, time.perf_counter() - t, res


def main() -> None:
    torch.set_num_threads(1)
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    steps = 100
    rows = []
    xr, yr = load_retina("train")
    retina = fit(lambda: smallcnn(in_channels=3, num_classes=5, width=16), xr, yr, epochs=12,
                 lr=2e-3)
    xp, yp = load_pneumonia("train")
    pneu = fit(lambda: smallcnn(in_channels=1, num_classes=2, width=8), xp, yp, epochs=2,
               lr=2e-3)
    for name, net, (xt, yt), k in (
        ("RetinaMNIST", retina, load_retina("test"), 5),
        ("PneumoniaMNIST", pneu, load_pneumonia("test"), 2),
    ):
        g = torch.Generator().manual_seed(0)
        idx = torch.randperm(len(xt), generator=g)[:n]
        x, y = xt[idx], yt[idx]
        clean = robust(net, x, y)
        print(f"{name}: clean accuracy {clean:.3f} on {n} test images", flush=True)
        settings = [("Linf", e / 255, "linf") for e in (1, 2, 4, 8)]
        settings += [("L2", 0.25, "l2"), ("L1", 4.0, "l1")]
        for norm_ref, eps, norm in settings:
            cases = [("ce", dict(loss="ce"), "ce", None)]
            if k >= 3 and norm != "l1":
                cases.append(("dlr", dict(loss="dlr"), "dlr", None))
                cases.append(("t", {}, None, min(9, k - 1)))
            for tag, kw, ref_loss, targets in cases:
                if targets is None:
                    atk = APGD(eps, norm, steps=steps, seed=0, **kw)
                    ref = reference(net, x, y, eps, norm_ref, ref_loss, steps)
                else:
                    atk = APGDT(eps, norm, steps=steps, seed=0)
                    ref = reference(net, x, y, eps, norm_ref, None, steps, targets)
                ra, t, _ = ours(atk, net, x, y)
                label = {"ce": "APGD-CE", "dlr": "APGD-DLR", "t": "APGD-T"}[tag]
                rows.append((name, norm, eps, label, ra, ref[0], t, ref[1]))
                print(f"  {norm:4s} eps={eps:.4f} {label:8s} medrobust {ra:.3f} ({t:5.1f} s)   "
                      f"reference {ref[0]:.3f} ({ref[1]:5.1f} s)", flush=True)
            if norm == "linf":
                pra, pt, _ = ours(PGD(eps, norm, steps=steps, seed=0), net, x, y)
                print(f"  {norm:4s} eps={eps:.4f} PGD-CE   medrobust {pra:.3f} ({pt:5.1f} s)",
                      flush=True)
    print("\n| data | norm | eps | attack | medrobust RA | reference RA | medrobust s | ref s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, norm, eps, label, ra, rra, t, rt in rows:
        print(f"| {name} | {norm} | {eps:.4f} | {label} | {ra:.3f} | {rra:.3f} | {t:.1f} | "
              f"{rt:.1f} |")


if __name__ == "__main__":
    main()
