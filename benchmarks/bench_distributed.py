"""Scaling out with torchrun on this machine: speed-up of 2 processes over 1 for ``evaluate`` and
for ``train --adversarial pgd``, and peak memory per process against the data set's size.

    PYTHONPATH=src python benchmarks/bench_distributed.py [--reps 3] [--sizes 10000,50000,100000]

Writes ``benchmarks/RESULTS_distributed.md`` (and the raw figures as JSON beside it).

* Speed: the 1- and 2-process runs alternate (1, 2, 1, 2, ...), ``--reps`` times each, and the
  median is reported. Two figures per run: the wall time of the whole command (process start,
  imports and the rendezvous included) and the time inside it (``evaluate``: the ``duration_s`` of
  results.json; training: the sum of the epochs' ``time_s``), which is what more processes can
  shorten. Every process runs torch on one thread.
* Memory: ``evaluate`` (FGSM, one small CNN, batches of 256) on 10k / 50k / 100k phantoms of
  16 x 16 generated when read (``phantom-16-n<N>-stream``), on 2 ranks; each rank reports its peak
  resident set size (``ru_maxrss``). For contrast, the same phantoms generated whole
  (``make_phantoms(stream=False)``) in one process.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT_MD = REPO / "benchmarks" / "RESULTS_distributed.md"
OUT_JSON = REPO / "benchmarks" / "RESULTS_distributed.json"
ENV_DROP = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ENV_DROP}
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                "PYTHONPATH": str(REPO / "src")})
    return env


def _launch(nproc: int, argv: list[str]) -> list[str]:
    """``python -m medrobust ...`` (one process) or torchrun with ``nproc`` processes."""
    if nproc == 1:
        return [sys.executable, *argv]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={nproc}", *argv]


CPU_S: list[float] = []  # CPU seconds (user + system) of every process of the last run


def _run(cmd: list[str], timeout: float = 900) -> tuple[float, str]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=str(REPO),
                          timeout=timeout)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    CPU_S[:] = [(after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)]
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return wall, proc.stdout


# --------------------------------------------------------------------------- worker modes
def worker_eval(args: argparse.Namespace) -> None:
    """One rank of an evaluation (under torchrun) or the single process."""
    import torch

    from medrobust import distributed
    from medrobust.data import load_dataset
    from medrobust.data.phantoms import make_phantoms
    from medrobust.evaluation import evaluate

    ctx = distributed.init("cpu")
    torch.set_num_threads(1)
    if args.eager:
        data = make_phantoms(n=args.count, size=args.size, seed=0, split="test")
    else:
        data = load_dataset(f"phantom-{args.size}-n{args.count}-stream", split="test")
    res = evaluate(args.model, data, attacks=args.attacks, eps=[0, 2 / 255], steps=args.steps,
                   batch_size=args.batch_size, out=args.out, progress=False, large_eps=False,
                   gallery=0, overwrite=True)
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    rank = 0 if ctx is None else ctx.rank
    line = {"rank": rank, "rss_mib": rss_mib}
    if rank == 0:
        line["duration_s"] = res.results["run"]["duration_s"]
    print("BENCH " + json.dumps(line), flush=True)
    distributed.shutdown()


def _model(folder: Path) -> Path:
    """A small CNN trained briefly on phantoms of 16 px (so that no sanity check fails and no
    fallback attack runs)."""
    import torch

    from medrobust.data.phantoms import make_phantoms
    from medrobust.modelstore import save_model
    from medrobust.nets import build_network
    from medrobust.training import train

    torch.set_num_threads(1)
    tr = make_phantoms(n=512, size=16, seed=0, split="train")
    va = make_phantoms(n=128, size=16, seed=0, split="val")
    torch.manual_seed(0)
    net = build_network("smallcnn", in_channels=1, num_classes=2, width=8)
    train(net, tr, va, epochs=4, batch_size=64, lr=3e-3, seed=0, progress=False)
    net.eval()
    return save_model(folder, net, bounds=(0.0, 1.0), units="intensity",
                      class_names=["normal", "lesion"], task="binary")


def _eval_cmd(nproc: int, model: Path, out: Path, n: int, *, attacks: str, steps: int,
              batch: int, eager: bool = False) -> list[str]:
    argv = [str(Path(__file__).resolve()), "worker-eval", "--model", str(model), "--out",
            str(out), "--count", str(n), "--size", "16", "--attacks", attacks, "--steps",
            str(steps), "--batch-size", str(batch)] + (["--eager"] if eager else [])
    return _launch(nproc, argv)


def _bench_lines(stdout: str) -> list[dict[str, float]]:
    return [json.loads(line[6:]) for line in stdout.splitlines() if line.startswith("BENCH ")]


def speed_evaluate(tmp: Path, model: Path, reps: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"wall_1": [], "wall_2": [], "inner_1": [], "inner_2": [],
                                   "cpu_1": [], "cpu_2": []}
    for _ in range(reps):
        for nproc in (1, 2):
            cmd = _eval_cmd(nproc, model, tmp / f"ev{nproc}", 1024, attacks="pgd", steps=10,
                            batch=64)
            wall, stdout = _run(cmd)
            inner = next(b["duration_s"] for b in _bench_lines(stdout) if b["rank"] == 0)
            out[f"wall_{nproc}"].append(wall)
            out[f"inner_{nproc}"].append(inner)
            out[f"cpu_{nproc}"].append(CPU_S[0])
            print(f"evaluate nproc={nproc}: wall {wall:.1f} s, evaluate {inner:.1f} s",
                  flush=True)
    return out


def speed_train(tmp: Path, reps: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"wall_1": [], "wall_2": [], "inner_1": [], "inner_2": [],
                                   "cpu_1": [], "cpu_2": []}
    for _ in range(reps):
        for nproc in (1, 2):
            folder = tmp / f"tr{nproc}"
            argv = ["-m", "medrobust", "train", "--data", "phantom", "--size", "16", "--limit",
                    "512", "--epochs", "2", "--batch-size", "32", "--device", "cpu",
                    "--no-progress", "--no-test", "--adversarial", "pgd", "--eps", "2/255",
                    "--attack-steps", "5", "--out", str(folder), "--overwrite"]
            wall, _ = _run(_launch(nproc, argv))
            lines = (folder / "metrics.jsonl").read_text().splitlines()
            inner = sum(float(json.loads(x).get("time_s", 0.0)) for x in lines)
            out[f"wall_{nproc}"].append(wall)
            out[f"inner_{nproc}"].append(inner)
            out[f"cpu_{nproc}"].append(CPU_S[0])
            print(f"train nproc={nproc}: wall {wall:.1f} s, epochs {inner:.1f} s", flush=True)
    return out


def memory(tmp: Path, model: Path, sizes: list[int]) -> list[dict[str, float]]:
    rows = []
    for n in sizes:
        for eager, nproc in ((False, 2), (True, 1)):
            cmd = _eval_cmd(nproc, model, tmp / f"mem{n}{eager}", n, attacks="fgsm", steps=1,
                            batch=256, eager=eager)
            wall, stdout = _run(cmd)
            lines = _bench_lines(stdout)
            rss = {int(b["rank"]): float(b["rss_mib"]) for b in lines}
            row = {"n": n, "mode": "generated whole, 1 process" if eager else
                   "streamed, 2 ranks", "wall_s": wall, "rss_mib": [rss[r] for r in sorted(rss)]}
            rows.append(row)
            print(f"memory n={n} {row['mode']}: peak RSS {row['rss_mib']} MiB, wall {wall:.0f} s",
                  flush=True)
    return rows


def _med(v: list[float]) -> float:
    return float(statistics.median(v))


def write(results: dict[str, object], started: float) -> None:
    ev, tr, mem = results["evaluate"], results["train"], results["memory"]
    assert isinstance(ev, dict) and isinstance(tr, dict) and isinstance(mem, list)
    load = os.getloadavg()
    lines = [
        "# Scaling out with torchrun: speed-up on 2 processes, memory against data size",
        "",
        f"Measured by `benchmarks/bench_distributed.py` on x86_64 CPU ({os.cpu_count()} cores), "
        f"torch {results['torch']}, gloo backend, one torch thread per process. **The machine was "
        f"loaded**: it is shared with 5 other jobs (load average {load[0]:.1f} / {load[1]:.1f} / "
        f"{load[2]:.1f} at the end, 1 / 5 / 15 min), so the absolute times are long and noisy; "
        "read the ratios. 1- and 2-process runs alternated, "
        f"{results['reps']} repetitions each, medians. Total {time.time() - started:.0f} s.",
        "No GPU here: the NCCL path (one GPU per local rank, SyncBatchNorm) is not measured.",
        "",
        "## Speed-up of 2 processes over 1",
        "",
        "| workload | 1 process (median) | 2 processes (median) | speed-up | CPU s of all "
        "processes, 1 / 2 (median) |",
        "|---|---|---|---|---|",
    ]
    for name, d, what in (
        ("evaluate: PGD-10 at eps 0 and 2/255 + clean, 1024 phantoms 16 px, batches of 64, "
         "small CNN", ev, "evaluate"),
        ("train --adversarial pgd (5 steps, eps 2/255): 2 epochs, 512 phantoms 16 px, batch 32, "
         "small CNN", tr, "epochs"),
    ):
        assert isinstance(d, dict)
        for kind, label in (("inner", f"time inside ({what})"), ("wall", "whole command")):
            a, b = _med(d[f"{kind}_1"]), _med(d[f"{kind}_2"])
            cpu = (f"{_med(d['cpu_1']):.1f} / {_med(d['cpu_2']):.1f}" if kind == "wall"
                   else "")
            lines.append(f"| {name}: {label} | {a:.1f} s | {b:.1f} s | {a / b:.2f}x | {cpu} |")
    lines += [
        "",
        "Runs (s): " + "; ".join(
            f"{w} {k}: " + ", ".join(f"{v:.1f}" for v in d[k])
            for w, d in (("evaluate", ev), ("train", tr)) for k in sorted(d)),
        "",
        "## Peak memory per process against data size (evaluate, FGSM, batches of 256)",
        "",
        "| phantoms (16 x 16) | data | peak RSS per process (MiB) | wall |",
        "|---|---|---|---|",
    ]
    for r in mem:
        rss = " / ".join(f"{v:.0f}" for v in r["rss_mib"])
        lines.append(f"| {r['n']:,} | {r['mode']} | {rss} | {r['wall_s']:.0f} s |")
    lines += ["", "## Reading", "", str(results.get("reading", "")), ""]
    OUT_MD.write_text("\n".join(lines))
    OUT_JSON.write_text(json.dumps(results, indent=1) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("mode", nargs="?", default="all",
                   choices=["all", "worker-eval", "evaluate", "train", "memory"])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--sizes", default="10000,50000,100000")
    # worker options
    p.add_argument("--model")
    p.add_argument("--out")
    p.add_argument("--count", type=int, default=1024)
    p.add_argument("--size", type=int, default=16)
    p.add_argument("--attacks", default="pgd")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--eager", action="store_true")
    args = p.parse_args()
    if args.mode == "worker-eval":
        worker_eval(args)
        return
    import torch

    started = time.time()
    results: dict[str, object] = {"torch": torch.__version__, "reps": args.reps}
    prior = json.loads(OUT_JSON.read_text()) if OUT_JSON.is_file() else {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        model = _model(tmp / "model")
        modes = ["evaluate", "train", "memory"] if args.mode == "all" else [args.mode]
        for m in ("evaluate", "train", "memory"):
            if m not in modes:
                results[m] = prior.get(m)
        if "evaluate" in modes:
            results["evaluate"] = speed_evaluate(tmp, model, args.reps)
        if "train" in modes:
            results["train"] = speed_train(tmp, args.reps)
        if "memory" in modes:
            results["memory"] = memory(tmp, model, [int(s) for s in args.sizes.split(",")])
    results["reading"] = prior.get("reading", "")
    write(results, started)
    print(OUT_MD.read_text())


if __name__ == "__main__":
    main()
