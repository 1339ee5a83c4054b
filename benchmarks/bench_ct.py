"""Benchmark: the phantom lesion detector (clean and under DAG) and CT-GAN tampering quality.

Writes benchmarks/RESULTS_ct.md. One CPU thread; a few minutes of CPU (more wall time when the
machine is shared). Everything is seeded.

1. Detector: a 3D RetinaNet (medrobust.detection_training) trained on 32^3 CT phantoms with
   lesions; sensitivity at 1 false positive per volume on held-out phantoms, clean and with DAG
   (Xie et al. 2017; 150 iterations at most, unbounded as in the paper, and within 20 HU L-inf)
   applied to every volume that holds a lesion.
2. Tampering: the conditional in-painting generator trained on 32^3 cubes of 48^3 phantoms;
   reconstruction error in HU inside the hole on held-out cubes (inject condition on lesion cubes,
   remove condition on healthy ones), the change outside the hole (zero by construction), and the
   verdicts of a 3D UNet segmenter (trained here on the same phantoms) and of the detector on
   injected and removed lesions, without and with adversarial refinement (20 HU).

Run: PYTHONPATH=src python benchmarks/bench_ct.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

torch.set_num_threads(1)
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from medrobust.attacks import DAGDetection  # noqa: E402
from medrobust.boxes import sensitivity_at_fp  # noqa: E402
from medrobust.data.phantoms import make_phantoms  # noqa: E402
from medrobust.detection_training import (  # noqa: E402
    detection_phantoms,
    evaluate_detector,
    train_detector,
)
from medrobust.tamper import refine, tamper_volume  # noqa: E402
from medrobust.tamper.training import phantom_cubes, train_inpainter  # noqa: E402


def clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def since(t: tuple[float, float]) -> str:
    w, c = clock()
    return f"{w - t[0]:.0f} s wall, {c - t[1]:.0f} s CPU"


def bench_detector(q: bool) -> tuple[dict, object, list[str]]:
    lines = []
    n_train, n_test, epochs = (32, 8, 1) if q else (64, 16, 4)
    t = clock()
    tr, trb = detection_phantoms(n_train, 32, dim=3, seed=0, split="train")
    te, teb = detection_phantoms(n_test, 32, dim=3, seed=0, split="test")
    res = train_detector(tr.images, trb, epochs=epochs, batch_size=8, lr=3e-3, seed=0)
    det = res.detector
    train_time = since(t)
    clean = evaluate_detector(det, te.images, teb)
    clean_dets = det.detect(te.images)
    pos = [i for i in range(n_test) if teb[i]["boxes"].shape[0]]
    rows = []
    runs = (("DAG, unbounded, <= 150 iterations (paper)", {}),
            ("DAG, L-inf <= 20 HU, <= 20 iterations", {"eps": 20.0, "max_iter": 20}))
    for label, kw in runs:
        t = clock()
        adv = te.images.clone()
        r = DAGDetection(**kw)(det, te.images[pos], [teb[i] for i in pos])
        adv[pos] = r.adversarial
        dets = det.detect(adv)
        at_clean_thr = sensitivity_at_fp(
            [{k: v[d["scores"] >= clean["threshold"]] for k, v in d.items()} for d in dets],
            teb, fp_per_volume=1e9)["sensitivity"]
        s = sensitivity_at_fp(dets, teb, 1.0)
        linf = r.perturbation_norms["linf"]
        rows.append((label, s["sensitivity"], at_clean_thr, float(r.success.float().mean()),
                     float(linf.median()), float(linf.max()),
                     float(r.extra["iterations"].float().median()), since(t)))
    print(f"[detector] trained ({train_time}); clean {clean}; DAG done", flush=True)
    lines += [
        "## 1. Lesion detector (3D RetinaNet on CT phantoms)",
        "",
        f"Trained on {n_train} phantoms of 32^3 voxels in HU ({sum(len(b['boxes']) for b in trb)} "
        f"lesions; {epochs} epochs, batch 8, Adam 3e-3 cosine; {train_time}); architecture "
        f"`retinanet` {res.arch_args}. Test: {n_test} held-out phantoms, {len(pos)} with a "
        "lesion. A detection is a hit at IoU >= 0.1 with a lesion box.",
        "",
        f"- **Clean sensitivity at 1 false positive per volume: {clean['sensitivity']:.3f}** "
        f"(score threshold {clean['threshold']:.3f}, {clean['fp_per_volume']:.2f} FP/volume at "
        f"that threshold; {int(clean['lesions'])} lesions).",
        "",
        "DAG on every test volume with a lesion (negatives left clean):",
        "",
        "| attack | sensitivity at 1 FP/vol | sensitivity at the clean threshold | DAG success "
        "(no post-NMS box on the lesion) | median L-inf (HU) | max L-inf (HU) | median "
        "iterations | time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(f"| {row[0]} | {row[1]:.3f} | {row[2]:.3f} | {row[3]:.3f} | {row[4]:.1f} | "
                     f"{row[5]:.1f} | {row[6]:.0f} | {row[7]} |")
    lines.append("")
    del clean_dets
    return clean, det, lines


def _train_segmenter(q: bool):
    """A 3D UNet (MONAI, 8-16-32) on 48^3 phantoms with lesions, Dice + CE loss (MONAI's
    DiceCELoss: the lesion is a few hundred voxels of 110 000, too rare for plain CE in a few
    steps), inputs through the soft-tissue window; returns a HU -> logits function and its
    validation Dice."""
    from monai.losses import DiceCELoss

    from medrobust.nets import build_network
    from medrobust.preprocessing import IntensityWindow
    from medrobust.training import seeded

    n, steps = (8, 10) if q else (48, 160)
    kw = {"units": "HU", "task": "segmentation", "lesion_fraction": 1.0,
          "lesion_radius": (0.08, 0.13)}
    tr = make_phantoms(n, 48, dim=3, seed=11, split="train", **kw)
    va = make_phantoms(8, 48, dim=3, seed=11, split="val", **kw)
    with seeded(0):
        net = build_network("unet", in_channels=1, num_classes=2, spatial_dims=3,
                            channels=[8, 16, 32])
    pre = IntensityWindow(40, 400)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    net.train()
    for _ in range(steps):
        idx = torch.randint(n, (4,), generator=g)
        loss = loss_fn(net(pre(tr.images[idx])), tr.labels[idx][:, None])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        pred = net(pre(va.images)).argmax(1)
    inter = float(((pred == 1) & (va.labels == 1)).sum())
    dice = 2 * inter / max(float((pred == 1).sum() + (va.labels == 1).sum()), 1.0)

    def segment(x: torch.Tensor) -> torch.Tensor:
        return net(pre(x))

    return segment, {"val_dice_lesion": round(dice, 3), "steps": steps, "volumes": n}


def bench_tamper(q: bool, det, clean) -> list[str]:
    t = clock()
    n_vol, steps = (16, 10) if q else (64, 400)
    cubes, cond = phantom_cubes(n_vol, size=48, cube=32, seed=0)
    tr = train_inpainter(cubes, cond, steps=steps, batch_size=4, lr=5e-4, seed=0,
                         arch_args={"channels": [8, 16, 32]}, log_every=max(1, steps // 4),
                         on_log=lambda r: print("[generator]", r, flush=True))
    gen = tr.generator
    gen_time = since(t)
    # held-out cubes: reconstruction error inside the hole, per condition
    hc, hcond = phantom_cubes(16, size=48, cube=32, seed=99)
    a, b = (32 - 16) // 2, (32 - 16) // 2 + 16
    errs = {0: [], 1: []}
    for i in range(hc.shape[0]):
        out = gen.inpaint(hc[i : i + 1], bool(hcond[i]))[0, 0]
        err = (out - hc[i, 0])[a:b, a:b, a:b].abs().mean()
        errs[int(hcond[i])].append(float(err))
    t = clock()
    segment, seg_metrics = _train_segmenter(q)
    seg_time = since(t)
    print(f"[segmenter] {seg_time} {seg_metrics}", flush=True)

    vols = make_phantoms(12 if not q else 4, 48, dim=3, seed=123, split="test", units="HU",
                         task="segmentation", lesion_fraction=0.5, lesion_radius=(0.08, 0.13))
    g = torch.Generator().manual_seed(0)
    results = {("inject", False): [], ("inject", True): [], ("remove", False): [],
               ("remove", True): []}
    outside = 0.0
    dets_thr = clean["threshold"]
    for i in range(vols.images.shape[0]):
        vol = vols.images[i, 0]
        mask = vols.labels[i]
        if mask.any():
            mode = "remove"
            loc = tuple(mask.nonzero().float().mean(0).round().long().tolist())
        else:
            mode = "inject"
            inner = (vol[12:-12, 12:-12, 12:-12] > 0).nonzero()
            loc = tuple((inner[torch.randint(inner.shape[0], (1,), generator=g)][0] + 12).tolist())
        res = tamper_volume(vol, loc, gen, mode, seed=i)
        diff = (res.volume - vol).abs()
        lo = [max(0, v - 8) for v in loc]
        hole = torch.zeros_like(diff, dtype=torch.bool)
        hole[lo[0]:loc[0] + 8, lo[1]:loc[1] + 8, lo[2]:loc[2] + 8] = True
        outside = max(outside, float(diff[~hole].max()))
        for refined in (False, True):
            v = res
            if refined:
                v = refine(res, None, eps=20.0, steps=10, segment=segment)
            with torch.no_grad():
                pred = segment(v.volume[None, None]).argmax(1)[0]
            in_hole = int(pred[hole].sum())
            d = det.detect(v.volume[None, None])[0]
            ctr = torch.tensor(loc, dtype=torch.float32)
            hit = bool(((d["scores"] >= dets_thr)
                        & ((d["boxes"][:, :3] <= ctr) & (d["boxes"][:, 3:] > ctr)).all(1)).any())
            ok_seg = in_hole >= 10 if mode == "inject" else in_hole < 10
            ok_det = hit if mode == "inject" else not hit
            results[(mode, refined)].append((ok_seg, ok_det))
    lines = [
        "## 2. CT tampering (CT-GAN)",
        "",
        f"Generator: conditional 3D U-Net (`ctgan-unet3d`, channels 8-16-32, cube 32, hole 16) "
        f"trained as pix2pix (adversarial + 100 x L1, Adam 5e-4) for {steps} steps of batch 4 "
        f"on {cubes.shape[0]} cubes from {n_vol} phantoms of 48^3 ("
        f"{int(cond.sum())} lesion-centred, {int((1 - cond).sum())} healthy); {gen_time}.",
        "",
        "Reconstruction of held-out cubes (hole only, HU, mean absolute error):",
        "",
        f"- inject condition on lesion cubes: {sum(errs[1]) / max(len(errs[1]), 1):.1f} HU "
        f"({len(errs[1])} cubes)",
        f"- remove condition on healthy cubes: {sum(errs[0]) / max(len(errs[0]), 1):.1f} HU "
        f"({len(errs[0])} cubes)",
        f"- largest change outside the 16^3 hole after pasting: {outside:.1f} HU (blending is "
        "confined to the hole by construction)",
        "",
        f"Verdicts on {vols.images.shape[0]} held-out 48^3 phantoms (inject at a random body "
        "location of lesion-free ones, remove at the lesion centre of the others). Segmenter: "
        f"a 3D UNet (8-16-32; Dice+CE, 160 steps of batch 4 on 48 phantoms) trained here "
        f"({seg_time}; validation "
        f"{seg_metrics}); 'lesion "
        "present' = at least 10 voxels predicted lesion in the hole. Detector: section 1's, "
        "'present' = a box at the clean 1-FP/volume threshold containing the location.",
        "",
        "| task | refinement | n | segmenter agrees | detector agrees |",
        "|---|---|---|---|---|",
    ]
    for (mode, refined), vals in results.items():
        n = len(vals)
        if n == 0:
            continue
        s = sum(v[0] for v in vals) / n
        d = sum(v[1] for v in vals) / n
        lines.append(f"| {mode} | {'segmenter, 20 HU, 10 steps' if refined else 'none'} | {n} | "
                     f"{s:.2f} | {d:.2f} |")
    lines.append("")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="a smoke run (not for RESULTS)")
    args = ap.parse_args()
    t0 = clock()
    clean, det, lines1 = bench_detector(args.quick)
    lines2 = bench_tamper(args.quick, det, clean)
    head = [
        "# CT benchmarks: lesion detector and CT-GAN tampering",
        "",
        f"Measured by `benchmarks/bench_ct.py`{' --quick' if args.quick else ''} on "
        f"{platform.machine()} CPU, torch {torch.__version__}, one thread; the machine was "
        f"loaded (2 cores shared with other jobs), so wall times are longer than CPU times. "
        f"Total: {since(t0)}. Seeded; small models and data so that it runs in minutes.",
        "",
    ]
    text = "\n".join(head + lines1 + lines2)
    print(text)
    if not args.quick:
        (HERE / "RESULTS_ct.md").write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
