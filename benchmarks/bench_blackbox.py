"""Black-box, universal and transfer benchmarks on PneumoniaMNIST (writes RESULTS_blackbox.md).

1. HopSkipJump (L2, untargeted, label-only) against ART's and foolbox's at equal queries: ART and
   foolbox run a fixed number of iterations, their model queries are counted per sample by a
   counting wrapper, and medrobust gets the same per-sample budget (``max_queries``).
2. Universal perturbation (L-inf) against ART's ``UniversalPerturbation`` (DeepFool inside), and
   the adversarial patch against ART's ``AdversarialPatchNumpy`` (ART's PyTorch patch needs
   torchvision, which medrobust does not use): fooling rate / patch success on held-out images.
3. The transfer matrix (PGD-Linf) at eps 2/255 and 8/255 between a small CNN, ResNet-18,
   ResNet-50 and a ViT (all registered networks), each trained briefly on a subset (sizes below).

One thread; timings are wall-clock medians on a shared, loaded machine. Sizes can be raised with
environment variables (``BB_*``) on a quiet machine.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import REPO, fit, load_pneumonia  # noqa: E402  (benchmarks/ is on sys.path)

import medrobust as mr
from medrobust.attacks import AdversarialPatch, HopSkipJump, UniversalPerturbation
from medrobust.nets import build_network

OUT = REPO / "benchmarks" / "RESULTS_blackbox.md"
E = os.environ.get


def cfg(name: str, default: int) -> int:
    return int(E(f"BB_{name}", default))


class Counting(torch.nn.Module):
    """Counts the samples the wrapped network sees (the competitors' queries)."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net
        self.count = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.count += int(x.shape[0])
        return self.net(x.float())


def art_classifier(net: torch.nn.Module) -> Any:
    from art.estimators.classification import PyTorchClassifier

    net = net if isinstance(net, Counting) else Counting(net).eval()
    return PyTorchClassifier(net, loss=torch.nn.CrossEntropyLoss(), input_shape=(1, 28, 28),
                             nb_classes=2, clip_values=(0.0, 1.0))


def section_hsj(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, pool: torch.Tensor,
                lines: list[str]) -> None:
    import foolbox as fb
    from art.attacks.evasion import HopSkipJump as ArtHSJ

    n = len(x)
    # the competitors' starting points: the nearest pool image predicted as the other class (what
    # medrobust's HopSkipJump picks inside the batch); uniform noise alone fails on this model
    with torch.no_grad():
        pp = net(pool).argmax(1)
    d = torch.cdist(x.flatten(1), pool.flatten(1))
    d[pp[None, :] == y[:, None]] = float("inf")
    start = pool[d.argmin(1)]
    iters = cfg("HSJ_ITERS", 10)
    rows = []
    # ART
    cnt = Counting(net).eval()
    t = time.perf_counter()
    adv = ArtHSJ(art_classifier(cnt), norm=2, max_iter=iters, max_eval=10000, init_eval=100,
                 init_size=100, verbose=False).generate(x.numpy(),
                                                                  x_adv_init=start.numpy())
    t_art = time.perf_counter() - t
    q_art = cnt.count / n
    adv_t = torch.from_numpy(adv).float()
    ok = net(adv_t).argmax(1) != y
    d = (adv_t - x).flatten(1).norm(dim=1)
    rows.append(("ART", q_art, ok, d, t_art))
    # foolbox
    cnt = Counting(net).eval()
    fmodel = fb.PyTorchModel(cnt, bounds=(0, 1))
    t = time.perf_counter()
    _, advs, _ = fb.attacks.HopSkipJumpAttack(steps=iters, constraint="l2")(
        fmodel, x, y, epsilons=None, starting_points=start)
    t_fb = time.perf_counter() - t
    q_fb = cnt.count / n
    ok = net(advs).argmax(1) != y
    d = (advs - x).flatten(1).norm(dim=1)
    rows.append(("foolbox", q_fb, ok, d, t_fb))
    # medrobust at each competitor's budget
    for who, q in (("ART", q_art), ("foolbox", q_fb)):
        bb = mr.BlackBox(lambda z: net(z).argmax(1), output="label", num_classes=2,
                         max_queries=int(round(q)))
        t = time.perf_counter()
        res = HopSkipJump("l2", seed=0)(bb, x, y)
        rows.append((f"medrobust (= {who}'s queries)", res.forward_passes / n, res.success,
                     res.perturbation_norms["l2"], time.perf_counter() - t))
    lines += [
        "## 1. HopSkipJump (L2, untargeted, label only) at equal queries",
        "",
        f"Small CNN (width 8, 2 epochs on the 4,708 training images), {n} correctly classified "
        f"test images. ART and foolbox run {iters} iterations (their defaults otherwise: 100 "
        "initial directions, geometric step search) from the nearest of 200 other test images "
        "that the model puts in the other class (medrobust picks such a start inside its batch); "
        "their queries are counted per sample; medrobust gets the same per-sample budget. "
        "'success @ 1.0' is the share of samples with "
        "an adversarial example within L2 = 1.0 (~3.6% of the 28 px image's range norm).",
        "",
        "| implementation | queries / sample | adversarial found | median L2 | success @ L2 1.0 "
        "| time (s) |",
        "|---|---|---|---|---|---|",
    ]
    for who, q, ok, d, secs in rows:
        med = float(d[ok].median()) if ok.any() else float("nan")
        within = float((ok & (d <= 1.0)).float().mean())
        lines.append(f"| {who} | {q:.0f} | {float(ok.float().mean()):.0%} | {med:.3f} | "
                     f"{within:.0%} | {secs:.1f} |")
    lines.append("")


def section_universal(net: torch.nn.Module, xf: torch.Tensor, yf: torch.Tensor,
                      xh: torch.Tensor, yh: torch.Tensor, lines: list[str]) -> None:
    from art.attacks.evasion import AdversarialPatchNumpy
    from art.attacks.evasion import UniversalPerturbation as ArtUAP

    model = mr.Classifier(net, num_classes=2)
    eps = 16 / 255
    rows = []
    for method in ("deepfool", "sgd"):
        t = time.perf_counter()
        u = UniversalPerturbation(eps, method=method, max_passes=5, seed=0).fit(model, xf, yf)
        rows.append((f"medrobust ({method})", u.fooling_rate(model, xh), time.perf_counter() - t))
    t = time.perf_counter()
    art = ArtUAP(art_classifier(net), attacker="deepfool", delta=0.2, max_iter=5, eps=eps,
                 norm=np.inf, verbose=False)
    art.generate(xf.numpy())
    secs = time.perf_counter() - t
    v = torch.from_numpy(art.noise).float()
    pred_clean = model.predict(xh)
    rate = float((model.predict((xh + v).clamp(0, 1)) != pred_clean).float().mean())
    rows.append(("ART (deepfool)", rate, secs))
    lines += [
        "## 2. Universal perturbation and patch against ART",
        "",
        f"Same small CNN. Universal perturbation: L-inf eps = 16/255, fitted on {len(xf)} test "
        f"images (5 passes), fooling rate (prediction changed) on {len(xh)} other test images.",
        "",
        "| implementation | held-out fooling rate | time (s) |",
        "|---|---|---|",
        *[f"| {w} | {r:.1%} | {s:.1f} |" for w, r, s in rows],
        "",
    ]
    ok = model.predict(xh) == yh
    xo, yo = xh[ok], yh[ok]
    normal = yo == 0  # targeted patches send normal images to 'pneumonia' (class 1)
    prow = []
    steps = cfg("PATCH_STEPS", 100)
    for area in (0.05, 0.1, 0.2):
        t = time.perf_counter()
        p = AdversarialPatch(area, steps=steps, seed=0).fit(model, xf, yf, target=1)
        secs = time.perf_counter() - t
        prow.append((f"medrobust, area {area:.0%}", p.success_rate(model, xo[normal],
                                                                   yo[normal], draws=4), secs))
    t = time.perf_counter()
    class PatchNumpy(AdversarialPatchNumpy):  # ART 1.20: np.float32 clip values fail its
        def reset_patch(self, v: Any) -> None:  # isinstance(v, float) check in __init__
            super().reset_patch(float(v) if v is not None and np.ndim(v) == 0 else v)

    ap = PatchNumpy(art_classifier(net), target=1, rotation_max=22.5, scale_min=0.4,
                               scale_max=0.6, learning_rate=5.0, max_iter=steps, batch_size=16,
                               targeted=True, clip_patch=[(0.0, 1.0)], verbose=False)
    yf1 = np.eye(2)[np.ones(len(xf), dtype=int)]
    patch, _ = ap.generate(xf.numpy(), yf1)
    secs = time.perf_counter() - t
    hits = []
    for scale in (0.4, 0.5, 0.6):
        xp = torch.from_numpy(ap.apply_patch(xo[normal].numpy(), scale=scale)).float()
        hits.append(float((model.predict(xp) == 1).float().mean()))
    prow.append(("ART numpy (scale 0.4-0.6, full-image patch)", float(np.mean(hits)), secs))
    lines += [
        f"Adversarial patch, targeted to 'pneumonia', {steps} steps on the same {len(xf)} images; "
        f"success = held-out normal images ({int(normal.sum())}) classified as pneumonia, under "
        "fresh random locations/transformations (medrobust: 4 draws; ART: its apply_patch at 3 "
        "scales). ART's patch covers a fraction 'scale' of the image side, so scale 0.5 is about "
        "25% of the area: compare with medrobust's 20% row.",
        "",
        "| implementation | success | time (s) |",
        "|---|---|---|",
        *[f"| {w} | {r:.1%} | {s:.1f} |" for w, r, s in prow],
        "",
    ]


def section_transfer(lines: list[str]) -> None:
    xtr, ytr = load_pneumonia("train")
    xte, yte = load_pneumonia("test")
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(xtr), generator=g)
    plan = {  # name: (network kwargs, training images, epochs)
        "smallcnn": ({"width": 16}, cfg("N_CNN", 4708), cfg("EP_CNN", 3)),
        "resnet18": ({}, cfg("N_R18", 512), cfg("EP_R18", 1)),
        "resnet50": ({}, cfg("N_R50", 256), cfg("EP_R50", 1)),
        "vit": ({}, cfg("N_VIT", 1024), cfg("EP_VIT", 2)),
    }
    models: dict[str, mr.Classifier] = {}
    trained = []
    for name, (kw, n, ep) in plan.items():
        t = time.perf_counter()
        idx = perm[:n]
        net = fit(lambda name=name, kw=kw: build_network(name, in_channels=1, num_classes=2,
                                                         **kw), xtr[idx], ytr[idx], epochs=ep,
                  lr=1e-3, seed=0)
        models[name] = mr.Classifier(net, num_classes=2)
        trained.append((name, n, ep, time.perf_counter() - t))
    n_att = cfg("N_ATTACK", 64)
    steps = cfg("PGD_STEPS", 5)
    x, y = xte[:n_att], yte[:n_att]
    lines += [
        "## 3. Transfer matrix (PGD-Linf), PneumoniaMNIST",
        "",
        "Each network trained briefly with Adam (lr 1e-3, batch 64) from the registry "
        "(`build_network`), on a random subset of the training images because of the CPU budget "
        "(a loaded 2-core machine): these are weakly trained models, so read the matrix as a "
        "demonstration of the tool, not as figures about the architectures.",
        "",
        "| network | training images | epochs | training time (s) | clean accuracy "
        f"({n_att} test images) |",
        "|---|---|---|---|---|",
    ]
    for name, n, ep, secs in trained:
        acc = float((models[name].predict(x) == y).float().mean())
        lines.append(f"| {name} | {n} | {ep} | {secs:.0f} | {acc:.1%} |")
    lines.append("")
    for eps in (2 / 255, 8 / 255):
        t = time.perf_counter()
        res = mr.transfer(models, (x, y), "pgd", eps=eps, ensemble=E("BB_ENSEMBLE") == "1",
                          attack_kwargs={"steps": steps})
        secs = time.perf_counter() - t
        lines += [
            f"eps = {round(eps * 255)}/255, PGD {steps} steps, {n_att} test images ({secs:.0f} s). "
            "Transfer success (share of the target's correctly classified images that the "
            "examples crafted on the row's proxy fool; diagonal = white box):",
            "",
            res.to_markdown("success"),
            "",
            "Target accuracy on the examples:",
            "",
            res.to_markdown("accuracy"),
            "",
        ]


def main() -> None:
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    lines = [
        "# Black-box, universal and transfer attacks: measured results",
        "",
        "Produced by `python benchmarks/bench_blackbox.py` (one thread, CPU). The machine was "
        "shared with other jobs and heavily loaded while this ran (load average about 10 on 2 "
        "cores), so times are only comparable within a table, and sizes are reduced (stated in "
        "each section).",
        "",
    ]
    xtr, ytr = load_pneumonia("train")
    net = fit(lambda: build_network("smallcnn", in_channels=1, num_classes=2, width=8), xtr, ytr,
              epochs=2, lr=2e-3, seed=0)
    xte, yte = load_pneumonia("test")
    with torch.no_grad():
        ok = (net(xte).argmax(1) == yte).nonzero().flatten()
    g = torch.Generator().manual_seed(0)
    ok = ok[torch.randperm(len(ok), generator=g)]
    sections = E("BB_SECTIONS", "hsj,universal,transfer").split(",")
    if "hsj" in sections:
        n = cfg("N_HSJ", 16)
        section_hsj(net, xte[ok[:n]], yte[ok[:n]], xte[ok[n:n + 200]], lines)
        OUT.write_text("\n".join(lines) + "\n")
    if "universal" in sections:
        allidx = torch.randperm(len(xte), generator=g)
        nf = cfg("N_UAP_FIT", 100)
        section_universal(net, xte[allidx[:nf]], yte[allidx[:nf]], xte[allidx[nf:nf + 256]],
                          yte[allidx[nf:nf + 256]], lines)
        OUT.write_text("\n".join(lines) + "\n")
    if "transfer" in sections:
        section_transfer(lines)
    lines.append(f"Total wall time: {time.perf_counter() - t0:.0f} s.")
    OUT.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
