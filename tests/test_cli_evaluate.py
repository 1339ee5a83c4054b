"""``medrobust evaluate``: a saved model on the built-in phantoms; clear one-line errors; a run
killed with SIGKILL continues where it stopped and ends with the results of an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from medrobust.cli import main
from medrobust.evaluation import stable_view
from medrobust.modelstore import save_model
from medrobust.nets import build_network

REPO = Path(__file__).resolve().parents[1]
DATA = "phantom-16"
# 24 samples in 3 batches; 3 budgets (+ the large one) x 2 attacks + clean = 27 units. The
# untrained model fails the large-eps check, so the engine also runs its fallback attacks (one
# ensemble at the 3 budgets): 9 more units, stored and resumed like the others.
ARGS = ["--data", DATA, "--split", "test", "--limit", "24", "--batch-size", "8",
        "--attacks", "fgsm,pgd", "--eps", "0,1/255,4/255", "--steps", "5", "--gallery", "2"]
UNITS = 3 * (1 + 2 * 4) + 3 * 3


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _save(folder: Path, in_channels: int = 1, num_classes: int = 2) -> Path:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = build_network("smallcnn", in_channels=in_channels, num_classes=num_classes,
                            width=2)
    net.eval()
    names = ["normal", "lesion", "other"][:num_classes]
    return save_model(folder, net, bounds=(0.0, 1.0), units="intensity", class_names=names,
                      task="binary" if num_classes == 2 else "multi-class")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save(tmp_path_factory.mktemp("models") / "phantom-cnn")


def _cli(*argv: str) -> tuple[int, str, str]:
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(argv))
    return rc, out.getvalue(), err.getvalue()


def _one_line_error(rc: int, err: str, pattern: str) -> None:
    assert rc == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("medrobust evaluate: error: ")
    assert re.search(pattern, lines[0]), lines[0]


# ----------------------------------------------------------------------------------- errors
def test_errors_are_one_line_without_traceback(model_dir: Path, tmp_path: Path) -> None:
    base = ["evaluate", "--model", str(model_dir), *ARGS[:6], "--quiet"]
    out = ["--out", str(tmp_path / "o")]
    rc, _, err = _cli(*base, *out, "--attacks", "fgsm,zap")
    _one_line_error(rc, err, r"unknown attack\(s\) zap")
    rc, _, err = _cli(*base, *out, "--eps", "0,8/2x55")
    _one_line_error(rc, err, r"malformed eps '8/2x55'")
    rc, _, err = _cli(*base, *out, "--eps", "0,,1")
    _one_line_error(rc, err, r"malformed eps list")
    rc, _, err = _cli("evaluate", "--model", str(tmp_path / "missing"), "--data", DATA, *out)
    _one_line_error(rc, err, r"model directory not found")
    rc, _, err = _cli("evaluate", "--model", str(model_dir), "--data", "nosuchdata", *out)
    _one_line_error(rc, err, r"nosuchdata")
    # a model that does not match the data: channels, classes
    rgb = _save(tmp_path / "rgb", in_channels=3)
    rc, _, err = _cli("evaluate", "--model", str(rgb), *base[3:], *out)
    _one_line_error(rc, err, r"3-channel inputs but the data has 1")
    three = _save(tmp_path / "three", num_classes=3)
    rc, _, err = _cli("evaluate", "--model", str(three), *base[3:], *out)
    _one_line_error(rc, err, r"3 classes but the data has 2")
    # an output folder that cannot be written
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    rc, _, err = _cli(*base, "--out", str(blocker / "out"))
    _one_line_error(rc, err, r"not writable")
    # a corrupted results database is reported, and kept
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "results.sqlite").write_bytes(b"\x00garbage" * 64)
    rc, _, err = _cli(*base, "--out", str(bad))
    _one_line_error(rc, err, r"results.sqlite: .*corrupted")
    assert (bad / "results.sqlite").read_bytes().startswith(b"\x00garbage")


def test_existing_results_are_kept_without_overwrite(model_dir: Path, tmp_path: Path) -> None:
    base = ["evaluate", "--model", str(model_dir), "--data", DATA, "--limit", "8",
            "--attacks", "fgsm", "--eps", "0,2/255", "--quiet", "--gallery", "1",
            "--out", str(tmp_path)]
    rc, out, err = _cli(*base)
    assert rc == 0, err
    assert "report: " in out and "worst case" in out
    before = (tmp_path / "results.json").read_text()
    rc, _, err = _cli(*base[:-2], "--eps", "0,4/255", "--out", str(tmp_path))
    _one_line_error(rc, err, r"another evaluation.*overwrite")
    assert (tmp_path / "results.json").read_text() == before
    rc, _, err = _cli(*base[:-2], "--eps", "0,4/255", "--out", str(tmp_path), "--overwrite")
    assert rc == 0, err
    assert json.loads((tmp_path / "results.json").read_text())["config"]["eps"] == [0, 4 / 255]


# ------------------------------------------------------------------------------ resumability
def _command(model_dir: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "medrobust.cli", "evaluate", "--model", str(model_dir),
            *ARGS, "--out", str(out)]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


def _rows(db: Path) -> int:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
            return int(con.execute("SELECT COUNT(*) FROM batches").fetchone()[0])
    except sqlite3.Error:
        return 0


def test_killed_run_continues_and_equals_an_uninterrupted_run(model_dir: Path,
                                                              tmp_path: Path) -> None:
    out = tmp_path / "killed"
    db = out / "results.sqlite"
    # slow each unit down a little so that the run is still going when it is killed
    proc = subprocess.Popen(_command(model_dir, out), env=_env(_MEDROBUST_TEST_UNIT_DELAY="0.3"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 90
        while _rows(db) < 3 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        if proc.stderr is not None:
            proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    stored = _rows(db)
    assert 3 <= stored < UNITS
    assert not (out / "results.json").exists()

    second = subprocess.run(_command(model_dir, out), env=_env(), capture_output=True,
                            text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    m = re.search(r"units computed: (\d+), reused: (\d+)", second.stdout)
    assert m, second.stdout
    computed, reused = int(m.group(1)), int(m.group(2))
    assert reused == stored and computed == UNITS - stored  # no stored unit redone
    doc = json.loads((out / "results.json").read_text())
    with sqlite3.connect(db) as con:
        by_second = con.execute("SELECT COUNT(*) FROM batches WHERE run_id=?",
                                (doc["run"]["run_id"],)).fetchone()[0]
    assert by_second == computed

    # the uninterrupted reference: the same command, in this process (saves a start-up)
    fresh = tmp_path / "uninterrupted"
    rc, _, err = _cli(*_command(model_dir, fresh)[3:], "--quiet")
    assert rc == 0, err
    ref = json.loads((fresh / "results.json").read_text())
    assert ref["run"]["units_computed"] == UNITS
    assert stable_view(doc) == stable_view(ref)
    assert (out / "report.html").is_file() and (out / "figures" / "gallery.png").is_file()
