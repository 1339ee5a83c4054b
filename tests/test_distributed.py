"""medrobust under torchrun: two CPU processes with gloo (torch.distributed.run), the training loop
with DistributedDataParallel, the helpers' errors (incomplete environment, disagreeing ranks, too
few samples for the ranks) and the short collective timeout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from medrobust import distributed

REPO = Path(__file__).resolve().parents[1]


def _torchrun(script: Path, *args: str, nproc: int = 2, env: dict[str, str] | None = None,
              timeout: float = 300) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if k not in distributed.ENV_VARS}
    full.update({"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")})
    full.update(env or {})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", str(script), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full,
                          cwd=str(REPO))


TRAIN_SCRIPT = textwrap.dedent('''
    import json, sys
    import torch
    from medrobust import distributed
    from medrobust.data.phantoms import make_phantoms
    from medrobust.nets import smallcnn
    from medrobust.training import train

    ctx = distributed.init("cpu")
    torch.set_num_threads(1)
    data = make_phantoms(n=96, size=16, seed=1, split="train")
    val = make_phantoms(n=48, size=16, seed=1, split="val")
    torch.manual_seed(0)
    net = smallcnn(in_channels=1, num_classes=2, width=8)
    res = train(net, data, val, epochs=3, batch_size=16, lr=3e-3, seed=0, progress=False)
    flat = torch.cat([p.detach().flatten() for p in net.parameters()])
    sums = [None] * ctx.world_size
    torch.distributed.all_gather_object(sums, flat.double().sum().item())
    if ctx.is_main:
        out = {"world": ctx.world_size, "param_sums": sums,
               "losses": [h["train_loss"] for h in res.history],
               "val_acc": res.history[-1]["val_acc"]}
        open(sys.argv[1], "w").write(json.dumps(out))
    distributed.shutdown()
''')


def test_ddp_training_on_two_gloo_processes(tmp_path):
    script = tmp_path / "train_ddp.py"
    script.write_text(TRAIN_SCRIPT)
    out = tmp_path / "out.json"
    proc = _torchrun(script, str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["world"] == 2
    # DistributedDataParallel keeps the replicas identical: the same weights on both ranks
    assert res["param_sums"][0] == pytest.approx(res["param_sums"][1], rel=0, abs=1e-9)
    # and they learn: the (all-reduced) training loss falls over the epochs
    assert res["losses"][-1] < res["losses"][0]


CHECKS_SCRIPT = textwrap.dedent('''
    import sys
    from medrobust import distributed
    ctx = distributed.init("cpu")
    lines = []
    try:
        distributed.check_same(ctx, {"eps": "4/255", "seed": ctx.rank})
    except distributed.DistributedError as e:
        lines.append(f"ERR {e}")
    try:
        distributed.check_enough_work(1, ctx.world_size)
    except distributed.DistributedError as e:
        lines.append(f"ERR {e}")
    distributed.check_same(ctx, {"eps": "4/255"})
    lines.append(f"batches {ctx.rank} {distributed.batches_for_rank(5, ctx.rank, ctx.world_size)}")
    with open(f"{sys.argv[1]}/rank{ctx.rank}.txt", "w") as f:   # one file per rank: no interleaving
        f.write("\\n".join(lines))
    distributed.shutdown()
''')


def test_disagreeing_ranks_and_too_little_work_are_clear_errors(tmp_path):
    script = tmp_path / "checks.py"
    script.write_text(CHECKS_SCRIPT)
    proc = _torchrun(script, str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank, batches in ((0, "[0, 2, 4]"), (1, "[1, 3]")):
        text = (tmp_path / f"rank{rank}.txt").read_text()
        # every rank gets the same error, naming the key and the rank that differs
        assert "different arguments" in text and "rank 1: seed" in text
        assert "1 samples for 2 ranks" in text
        assert f"batches {rank} {batches}" in text


KILL_SCRIPT = textwrap.dedent('''
    import os, time
    from medrobust import distributed
    ctx = distributed.init("cpu")
    if ctx.rank == 1:
        os._exit(3)          # a rank dies without a word
    t0 = time.time()
    try:
        distributed.barrier(ctx)
    finally:
        print("waited", round(time.time() - t0, 1), flush=True)
''')


def test_a_killed_rank_fails_the_run_in_seconds(tmp_path):
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT)
    proc = _torchrun(script, env={"MEDROBUST_DIST_TIMEOUT": "15"}, timeout=120)
    assert proc.returncode != 0


def test_incomplete_environment_is_named(monkeypatch):
    for v in distributed.ENV_VARS:
        monkeypatch.delenv(v, raising=False)
    assert distributed.launched() is False
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(distributed.DistributedError, match="LOCAL_RANK, MASTER_ADDR, MASTER_PORT"):
        distributed.launched()
    monkeypatch.setenv("MEDROBUST_DIST_TIMEOUT", "soon")
    with pytest.raises(distributed.DistributedError, match="MEDROBUST_DIST_TIMEOUT"):
        distributed._timeout_s()


def test_single_process_helpers():
    assert distributed.batches_for_rank(3, 0, 1) == [0, 1, 2]
    perm = torch.arange(7)
    assert torch.equal(distributed.shard_permutation(perm, None), perm)
    assert distributed.all_reduce_sums(None, 1.5, 2) == [1.5, 2.0]
    with pytest.raises(ValueError):
        distributed.batches_for_rank(3, 2, 2)


# ------------------------------------------------------------------ evaluate under torchrun
def _torchrun_cli(args: list[str], env: dict[str, str] | None = None,
                  timeout: float = 400) -> subprocess.Popen[str]:
    full = {k: v for k, v in os.environ.items() if k not in distributed.ENV_VARS}
    full.update({"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")})
    full.update(env or {})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "medrobust", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=full, cwd=str(REPO))


def _rank_pids(rank: int) -> list[int]:
    """The processes of one torchrun rank running medrobust (found through /proc)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            env = (d / "environ").read_bytes().split(b"\0")
            cmd = (d / "cmdline").read_bytes()
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"medrobust" in cmd and \
                b"torch.distributed.run" not in cmd:
            out.append(int(d.name))
    return out


@pytest.fixture(scope="module")
def eval_model(tmp_path_factory):
    from tests.test_cli_evaluate import _save

    return _save(tmp_path_factory.mktemp("dist") / "phantom-cnn")


def test_evaluate_on_two_ranks_equals_one_process_and_resumes_a_killed_rank(eval_model,
                                                                            tmp_path):
    from medrobust.cli import main
    from medrobust.evaluation import stable_view
    from tests.test_cli_evaluate import ARGS

    args = ["evaluate", "--model", str(eval_model), *ARGS, "--quiet"]
    # the single-process reference
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    ref = json.loads((tmp_path / "one" / "results.json").read_text())
    assert ref["run"]["world_size"] == 1

    # two ranks; rank 1 is killed once it has stored a unit, then the same command is rerun
    out = tmp_path / "two"
    proc = _torchrun_cli([*args, "--out", str(out)], env={"_MEDROBUST_TEST_UNIT_DELAY": "0.3"})
    import sqlite3
    import time

    def rows(db: Path) -> int:
        try:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
                return int(con.execute("SELECT COUNT(*) FROM batches").fetchone()[0])
        except sqlite3.Error:
            return 0

    deadline = time.monotonic() + 240
    while rows(out / "results.rank1.sqlite") < 2 and time.monotonic() < deadline and \
            proc.poll() is None:
        time.sleep(0.05)
    killed = _rank_pids(1)
    assert killed and proc.poll() is None, "rank 1 finished before it could be killed"
    for pid in killed:
        os.kill(pid, 9)
    proc.communicate(timeout=300)
    assert proc.returncode != 0  # the run fails (torchrun stops the other rank)
    assert not (out / "results.json").exists()
    kept = rows(out / "results.rank1.sqlite")
    assert kept >= 2
    with sqlite3.connect(out / "results.rank1.sqlite") as con:
        first_run = {r: c for r, c in con.execute(
            "SELECT run_id, COUNT(*) FROM batches GROUP BY run_id")}
    assert sum(first_run.values()) == kept

    again = _torchrun_cli([*args, "--out", str(out)])
    stdout, stderr = again.communicate(timeout=400)
    assert again.returncode == 0, stderr[-3000:]
    doc = json.loads((out / "results.json").read_text())
    assert doc["run"]["world_size"] == 2
    with sqlite3.connect(out / "results.rank1.sqlite") as con:
        after = {r: c for r, c in con.execute(
            "SELECT run_id, COUNT(*) FROM batches GROUP BY run_id")}
    # the killed rank's stored units were read back, not recomputed
    assert all(after.get(r) == c for r, c in first_run.items())
    assert sum(after.values()) > kept  # and its remaining units were computed on the rerun
    assert stable_view(doc) == stable_view(ref)  # the numbers of a single process
    assert (out / "report.html").is_file()


def test_evaluate_under_torchrun_refuses_too_few_samples(eval_model, tmp_path):
    proc = _torchrun_cli(["evaluate", "--model", str(eval_model), "--data", "phantom-16",
                          "--split", "test", "--limit", "4", "--batch-size", "8",
                          "--attacks", "fgsm", "--eps", "0,1/255", "--quiet",
                          "--out", str(tmp_path / "few")])
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert "1 batches for 2 ranks" in stderr


def test_train_cli_under_torchrun_writes_one_model_folder(tmp_path):
    """``torchrun -m medrobust train --adversarial pgd``: DDP with the attack run on each rank's
    shard; rank 0 alone writes the folder, which loads like any other."""
    out = tmp_path / "ddp-model"
    proc = _torchrun_cli(["train", "--data", "phantom", "--size", "16", "--limit", "64",
                          "--epochs", "2", "--batch-size", "16", "--device", "cpu",
                          "--no-progress", "--no-test", "--adversarial", "pgd", "--eps", "2/255",
                          "--out", str(out)])
    stdout, stderr = proc.communicate(timeout=400)
    assert proc.returncode == 0, stderr[-3000:]
    from medrobust.modelstore import load_model

    loaded = load_model(out)
    assert loaded.classifier is not None
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2  # one line per epoch, written once (by rank 0)
    meta = json.loads((out / "model.json").read_text())
    assert meta["training"]["adversarial"]["method"] == "pgd"
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary folder left by any rank
