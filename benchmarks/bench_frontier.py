"""The minimum-norm frontier (DDN, FMN, ALMA) against foolbox, adv-lib and medrobust's C&W.

Two small CNNs (``medrobust.nets.smallcnn``) are trained inside the script: one on PneumoniaMNIST
(binary, width 8, 2 epochs) and one on RetinaMNIST (RGB, 5 grades, width 16, 10 epochs). Each is
attacked on ``--n`` correctly classified test images with the L2 attacks below, at equal steps
between libraries. Reported: success rate, median L2 (failures count as +inf, so an attack cannot
look smaller by failing) and wall and CPU time: median of ``--repeats`` interleaved runs (every
attack once per repetition, in turn), one CPU thread.

adv-lib is imported with stub ``torchvision`` and ``visdom`` modules (it imports them at module
level for LPIPS and its plotting callback, neither used here); medrobust never imports adv-lib.

    python benchmarks/bench_frontier.py [--n 100] [--repeats 3] [--out FILE]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import types
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from _common import DATA, REPO, fit, load_pneumonia  # noqa: E402  (benchmarks/ is on sys.path)

import medrobust as mr
from medrobust.attacks import ALMA, DDN, FMN, CarliniWagnerL2
from medrobust.nets import smallcnn

Runner = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def load_retina(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """RetinaMNIST ``split`` as float (N, 3, 28, 28) in [0, 1] and int64 grades (N,)."""
    path = DATA / "retinamnist.npz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (set MEDROBUST_DATA)")
    with np.load(path) as f:
        x = torch.from_numpy(f[f"{split}_images"]).float().div(255.0).permute(0, 3, 1, 2)
        y = torch.from_numpy(f[f"{split}_labels"][:, 0].astype(np.int64))
    return x.contiguous(), y


def models(which: list[str]) -> dict[str, tuple[torch.nn.Module, torch.Tensor, torch.Tensor]]:
    out = {}
    if "pneumonia" in which:
        x, y = load_pneumonia("train")
        net = fit(lambda: smallcnn(in_channels=1, num_classes=2, width=8), x, y, epochs=2,
                  lr=2e-3)
        out["PneumoniaMNIST"] = (net, *load_pneumonia("test"))
    if "retina" in which:
        x, y = load_retina("train")
        net = fit(lambda: smallcnn(in_channels=3, num_classes=5, width=16), x, y, epochs=10,
                  lr=2e-3)
        out["RetinaMNIST"] = (net, *load_retina("test"))
    return out


def correct_subset(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, n: int
                   ) -> tuple[torch.Tensor, torch.Tensor, float]:
    with torch.no_grad():
        ok = net(x).argmax(1) == y
    idx = ok.nonzero().flatten()
    idx = idx[torch.randperm(idx.numel(), generator=torch.Generator().manual_seed(0))[:n]]
    return x[idx].contiguous(), y[idx].contiguous(), float(ok.float().mean())


def adv_lib_attacks() -> dict[str, Callable[..., torch.Tensor]] | None:
    for name in ("torchvision", "torchvision.models", "visdom"):
        if name not in sys.modules:
            stub = types.ModuleType(name)
            stub.models = types.ModuleType("models")  # type: ignore[attr-defined]
            stub.Visdom = object  # type: ignore[attr-defined]
            sys.modules[name] = stub
    try:
        from adv_lib.attacks.augmented_lagrangian import alma
        from adv_lib.attacks.decoupled_direction_norm import ddn
        from adv_lib.attacks.fast_minimum_norm import fmn
    except ImportError as e:
        print("adv-lib unavailable:", e, file=sys.stderr)
        return None
    finally:
        for name in ("torchvision", "torchvision.models", "visdom"):
            if isinstance(sys.modules.get(name), types.ModuleType) and not hasattr(
                    sys.modules[name], "__file__"):
                del sys.modules[name]
    return {"alma": alma, "ddn": ddn, "fmn": fmn}


def runners(net: torch.nn.Module, cw_steps: int, cw_bs: int) -> dict[str, Runner]:
    model = mr.Classifier(net, bounds=(0.0, 1.0))

    def ours(atk: mr.attacks.Attack) -> Runner:
        return lambda x, y: atk(model, x, y).adversarial

    out: dict[str, Runner] = {
        "medrobust DDN-100": ours(DDN(steps=100)),
        "medrobust FMN-100": ours(FMN("l2", steps=100)),
        "medrobust ALMA-100": ours(ALMA(steps=100, alpha=0.5)),
        "medrobust ALMA-1000": ours(ALMA(steps=1000)),
    }
    try:
        import foolbox as fb

        fmodel = fb.PyTorchModel(net, bounds=(0, 1))

        def fool(atk: object) -> Runner:
            def run(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
                _, adv, _ = atk(fmodel, x, y, epsilons=None)  # type: ignore[operator]
                return adv

            return run

        out["foolbox DDN-100"] = fool(fb.attacks.DDNAttack(steps=100))
        out["foolbox DDN-1000"] = fool(fb.attacks.DDNAttack(steps=1000))
        out["foolbox FMN-100"] = fool(fb.attacks.L2FMNAttack(steps=100))
    except ImportError as e:
        print("foolbox unavailable:", e, file=sys.stderr)
    lib = adv_lib_attacks()
    if lib is not None:
        alma, ddn, fmn = lib["alma"], lib["ddn"], lib["fmn"]
        out["adv-lib DDN-100"] = lambda x, y: ddn(net, x, y, steps=100, levels=None)
        out["adv-lib FMN-100"] = lambda x, y: fmn(net, x, y, norm=2, steps=100)
        out["adv-lib ALMA-100"] = lambda x, y: alma(net, x, y, num_steps=100, α=0.5,
                                                    init_lr_distance=0.1)
        out["adv-lib ALMA-1000"] = lambda x, y: alma(net, x, y, num_steps=1000, α=0.9,
                                                     init_lr_distance=0.1)
    out[f"medrobust C&W {cw_bs}x{cw_steps}"] = ours(
        CarliniWagnerL2(binary_search_steps=cw_bs, steps=cw_steps))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cw-steps", type=int, default=1000)
    ap.add_argument("--cw-bs", type=int, default=9)
    ap.add_argument("--only", nargs="+", default=None,
                    help="run only the attacks whose name contains one of these strings")
    ap.add_argument("--models", nargs="+", default=["pneumonia", "retina"],
                    choices=["pneumonia", "retina"])
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "RESULTS_frontier.md")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    t0 = time.time()
    lines = [
        "# Minimum-norm frontier: DDN, FMN, ALMA vs foolbox, adv-lib and C&W",
        "",
        f"{args.n} correctly classified test images per model; L2 attacks at equal steps; one CPU "
        "thread (`torch.set_num_threads(1)`) on a shared 2-core machine that was loaded by other "
        "jobs while this ran (timings noisy; ratios measured interleaved, so the load hits every "
        f"attack alike). Time: median of {args.repeats} interleaved repetitions, as wall time and "
        "as the process's CPU time (`time.process_time`, one thread: close to what the run takes "
        "on an idle core; the ratios use it). Median L2 counts "
        "a failure as +inf. ALMA-100 uses alpha 0.5, ALMA-1000 alpha 0.9, both with "
        "init_lr_distance 0.1 (the authors' presets); adv-lib's DDN without quantization "
        f"(levels=None), like foolbox's and medrobust's. C&W: medrobust's defaults "
        f"({args.cw_bs} binary-search steps x {args.cw_steps} Adam steps, abort early).",
        "",
    ]
    goal_lines = []
    for mname, (net, xt, yt) in models(args.models).items():
        x, y, acc = correct_subset(net, xt, yt, args.n)
        print(f"{mname}: clean accuracy {acc:.3f}; {len(x)} images", flush=True)
        table = runners(net, args.cw_steps, args.cw_bs)
        if args.only:
            table = {k: v for k, v in table.items() if any(o in k for o in args.only)}
        times: dict[str, list[float]] = {}
        cpu: dict[str, list[float]] = {}
        stats: dict[str, tuple[float, float]] = {}
        errors: dict[str, str] = {}
        for rep in range(args.repeats):
            for name, run in table.items():
                if name in errors:
                    continue
                torch.manual_seed(rep)
                start, start_cpu = time.perf_counter(), time.process_time()
                try:
                    adv = run(x.clone(), y.clone()).detach()
                except Exception as e:  # a peer that cannot run this model: say so in the table
                    errors[name] = f"{type(e).__name__}: {e}"
                    print(f"  {name}: {errors[name]}", flush=True)
                    continue
                dt = time.perf_counter() - start
                times.setdefault(name, []).append(dt)
                cpu.setdefault(name, []).append(time.process_time() - start_cpu)
                adv = adv.clamp(0, 1)
                with torch.no_grad():
                    succ = net(adv).argmax(1) != y
                l2 = (adv - x).flatten(1).norm(dim=1)
                l2 = torch.where(succ, l2, torch.full_like(l2, float("inf")))
                stats[name] = (float(succ.float().mean()), float(l2.median()))
                print(f"  rep {rep} {name:24s} {dt:8.2f}s cpu {cpu[name][-1]:8.2f}s success "
                      f"{stats[name][0]:.3f} median L2 {stats[name][1]:.4f}", flush=True)
        cw = next(k for k in table if "C&W" in k)
        t_cw = statistics.median(cpu[cw]) if cw in cpu else float("nan")
        lines += [f"## {mname} (clean accuracy {acc:.3f})", "",
                  "| attack | success | median L2 | wall (s) | CPU (s) | CPU / C&W |",
                  "|---|---|---|---|---|---|"]
        for name in table:
            if name in errors:
                lines.append(f"| {name} | fails: `{errors[name]}` | | | | |")
                continue
            s, med = stats[name]
            t, c = statistics.median(times[name]), statistics.median(cpu[name])
            lines.append(f"| {name} | {s:.3f} | {med:.4f} | {t:.2f} | {c:.2f} | "
                         f"{c / t_cw:.3f} |")
        lines.append("")
        if "foolbox DDN-1000" in stats and cw in stats:
            ref = stats["foolbox DDN-1000"][1]
            for name in ("medrobust FMN-100", "medrobust ALMA-100", "medrobust ALMA-1000"):
                if name not in stats:
                    continue
                s, med = stats[name]
                r = statistics.median(cpu[name]) / t_cw
                met = "met" if med <= ref and r <= 0.2 else "not met"
                goal_lines.append(f"| {mname} | {name} | {med:.4f} | {ref:.4f} | {r:.3f} | "
                                  f"{met} |")
    lines += ["## Goal: ALMA or FMN median L2 <= foolbox DDN-1000's, at <= 0.2x C&W's time", "",
              "| model | attack | median L2 | foolbox DDN-1000 | CPU time / C&W | goal |",
              "|---|---|---|---|---|---|", *goal_lines, "",
              f"Total wall time {time.time() - t0:.0f} s; torch {torch.__version__}."]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
