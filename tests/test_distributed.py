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
