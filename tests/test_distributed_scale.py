"""Scaling out, part two: the transfer matrix on two gloo processes equals the single-process one
(rank 0 writes it), and a distributed evaluation of streamed data has every rank read only its own
batches."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch

from medrobust.cli import main
from medrobust.modelstore import save_model
from medrobust.nets import build_network
from tests.test_distributed import _torchrun


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _model(folder: Path, seed: int) -> Path:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = build_network("smallcnn", in_channels=1, num_classes=2, width=2)
    net.eval()
    return save_model(folder, net, bounds=(0.0, 1.0), units="intensity",
                      class_names=["normal", "lesion"], task="binary")


TRANSFER_ARGS = ["--data", "phantom-16", "--limit", "24", "--batch-size", "8", "--attack", "pgd",
                 "--steps", "3", "--eps", "8/255"]

# one torchrun launch for both checks (starting the ranks is most of the cost): an evaluation of
# streamed phantoms through the library, then ``medrobust transfer`` through the command line
SCRIPT = textwrap.dedent('''
    import json, sys
    import torch
    from medrobust import distributed
    from medrobust.cli import main
    from medrobust.data.phantoms import make_phantoms
    from medrobust.evaluation import evaluate

    ctx = distributed.init("cpu")
    torch.set_num_threads(1)
    out = sys.argv[1]
    data = make_phantoms(n=256, size=16, seed=5, stream=True)
    src = data.images
    rows, blocks = [], []
    real_rows, real_block = src.rows, src.block

    def count_rows(a, b):
        rows.extend(range(a, b))
        return real_rows(a, b)

    def count_block(b):
        if b not in src._cache:
            blocks.append(b)
        return real_block(b)

    src.rows, src.block = count_rows, count_block
    evaluate(f"{out}/m0", data, attacks="fgsm,pgd", eps=[0, 2 / 255], steps=2, batch_size=64,
             out=f"{out}/eval-two", progress=False, large_eps=False, gallery=0)
    with open(f"{out}/rank{ctx.rank}.json", "w") as f:
        json.dump({"rows": sorted(set(rows)), "blocks": sorted(set(blocks))}, f)
    # the command line reuses this process group (and leaves it at the end)
    sys.exit(main(["transfer", "--models", ",".join(f"{out}/m{s}" for s in range(3)),
                   *sys.argv[2:], "--out", f"{out}/transfer-two"]))
''')


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("scale")
    for s in range(3):
        _model(out / f"m{s}", s)
    script = out / "scale.py"
    script.write_text(SCRIPT)
    proc = _torchrun(script, str(out), *TRANSFER_ARGS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_transfer_on_two_ranks_equals_one_process(two_ranks):
    out, proc = two_ranks
    models = ",".join(str(out / f"m{s}") for s in range(3))
    assert main(["transfer", "--models", models, *TRANSFER_ARGS, "--out",
                 str(out / "transfer-one")]) == 0
    ref = json.loads((out / "transfer-one" / "results.json").read_text())
    doc = json.loads((out / "transfer-two" / "results.json").read_text())
    assert doc.pop("extra") == {"world_size": 2} and ref.pop("extra") == {}
    assert doc == ref  # every number of the matrix and of the ensemble table
    assert ref["ensemble"] is not None and len(ref["accuracy"]) == 3
    # white box: each model's own examples fool it at least as well as any other's
    for j in range(3):
        col = [ref["success"][i][j] for i in range(3)]
        if col[j] is not None:
            assert col[j] >= max(c for c in col if c is not None) - 1e-9
    assert (out / "transfer-two" / "report.html").is_file()
    assert proc.stdout.count("| proxy \\ target |") == 1  # rank 0 alone prints the table
    assert not list((out / "transfer-two").glob(".*"))  # no temporary file left by any rank


def test_distributed_evaluation_of_streamed_data_reads_only_each_ranks_batches(two_ranks):
    from medrobust.data.phantoms import make_phantoms
    from medrobust.evaluation import evaluate, stable_view

    out, _ = two_ranks
    # 4 batches of 64: rank 1 computes batches 1 and 3; it also reads one row (row 0) to check
    # that the model takes the data
    r1 = json.loads((out / "rank1.json").read_text())
    assert set(r1["rows"]) <= {0} | set(range(64, 128)) | set(range(192, 256))
    assert set(r1["rows"]) >= set(range(64, 128)) | set(range(192, 256))
    assert r1["blocks"] == [0, 1, 3]  # block 2 (rank 0's batch) was never generated there
    # rank 0 computes batches 0 and 2, then aggregates every unit from the stores: the batches of
    # rank 1 are not read again (nor generated)
    r0 = json.loads((out / "rank0.json").read_text())
    assert set(r0["rows"]) == set(range(0, 64)) | set(range(128, 192))
    assert r0["blocks"] == [0, 2]
    doc = json.loads((out / "eval-two" / "results.json").read_text())
    assert doc["run"]["world_size"] == 2
    ref = evaluate(out / "m0", make_phantoms(n=256, size=16, seed=5, stream=True),
                   attacks="fgsm,pgd", eps=[0, 2 / 255], steps=2, batch_size=64,
                   out=out / "eval-one", progress=False, large_eps=False, gallery=0).results
    assert stable_view(doc) == stable_view(json.loads(json.dumps(ref)))
