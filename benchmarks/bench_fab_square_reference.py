"""medrobust's FAB-T and Square against the reference implementation (PyPI ``pyautoattack``) at
equal eps, steps / queries and targets, on a small CNN trained here on RetinaMNIST (5 grades).

FAB is a minimum-norm attack: a sample counts as broken at ``eps`` when the attack succeeded with a
perturbation of norm at most ``eps`` (the reference keeps only those points). Square is a random
search: the two implementations draw different squares (medrobust one per sample, the reference
one per batch), so equal figures are not expected, only similar ones.

Run: ``PYTHONPATH=src python benchmarks/bench_fab_square_reference.py [n_images]``.
"""

from __future__ import annotations

import sys
import time

import torch
from _common import fit
from bench_apgd_reference import load_retina, robust

import medrobust as mr
from medrobust.attacks import FABT, Square
from medrobust.nets import smallcnn

try:
    from pyautoattack.fab_pt import FABAttack_PT
    from pyautoattack.square import SquareAttack
except ImportError as e:  # pragma: no cover - benchmark only
    raise SystemExit("pip install --no-deps pyautoattack to run this comparison") from e


def main() -> None:
    torch.set_num_threads(1)
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    xr, yr = load_retina("train")
    net = fit(lambda: smallcnn(in_channels=3, num_classes=5, width=16), xr, yr, epochs=12,
              lr=2e-3)
    xt, yt = load_retina("test")
    idx = torch.randperm(len(xt), generator=torch.Generator().manual_seed(0))[:n]
    x, y = xt[idx], yt[idx]
    model = mr.Classifier(net, bounds=(0.0, 1.0))
    print(f"RetinaMNIST: clean accuracy {robust(net, x, y):.3f} on {n} test images")
    rows = []
    for norm, ref_norm, eps in (("linf", "Linf", 2 / 255), ("linf", "Linf", 4 / 255),
                                ("l2", "L2", 0.25)):
        t = time.perf_counter()
        res = FABT(norm, eps=eps, steps=100, n_target_classes=4, final_search_steps=0,
                   seed=0)(model, x, y)
        ours_t = time.perf_counter() - t
        broken = res.success & (res.perturbation_norms[norm] <= eps * (1 + 1e-5))
        ours = 1.0 - float(broken.float().mean())
        ref = FABAttack_PT(net, norm=ref_norm, n_restarts=1, n_iter=100, eps=eps, seed=0,
                           targeted=True, n_target_classes=4, device="cpu")
        t = time.perf_counter()
        ref_ra = robust(net, ref.perturb(x.clone(), y.clone()), y)
        ref_t = time.perf_counter() - t
        rows.append(("FAB-T", norm, eps, ours, ref_ra, ours_t, ref_t))
        print(rows[-1], flush=True)
    for norm, ref_norm, eps in (("linf", "Linf", 4 / 255), ("l2", "L2", 0.25)):
        t = time.perf_counter()
        res = Square(eps, norm, n_queries=1000, p_init=0.8, seed=0)(model, x, y)
        ours_t = time.perf_counter() - t
        ref = SquareAttack(net, norm=ref_norm, n_queries=1000, eps=eps, p_init=0.8, seed=0,
                           resc_schedule=True, device="cpu")
        t = time.perf_counter()
        ref_ra = robust(net, ref.perturb(x.clone(), y.clone()), y)
        ref_t = time.perf_counter() - t
        rows.append(("Square-1000", norm, eps, res.robust_accuracy, ref_ra, ours_t, ref_t))
        print(rows[-1], f"median queries {float(res.extra['queries'].float().median()):.0f}",
              flush=True)
    print("\n| attack | norm | eps | medrobust RA | reference RA | medrobust s | ref s |")
    print("|---|---|---|---|---|---|---|")
    for name, norm, eps, ra, rra, t1, t2 in rows:
        print(f"| {name} | {norm} | {eps:.4f} | {ra:.3f} | {rra:.3f} | {t1:.1f} | {t2:.1f} |")


if __name__ == "__main__":
    main()
