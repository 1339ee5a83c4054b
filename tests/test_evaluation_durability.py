"""Durability of ``evaluate`` and the pre-flight checks: one run per output folder (an OS lock that
dies with its process), a full disk or a permission error leaves nothing half-written and is one
clear line, a model that raises mid-run is named with its batch and the units before are kept;
randomized, probability-output and constant models are caught before their numbers are trusted."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import medrobust as mr
import medrobust.evaluation.output as output
from medrobust.cli import main
from medrobust.evaluation import EvaluationError, EvaluationResult

from evaluation_helpers import Linear, linear_data, linear_model, weights  # isort: skip

ARGS = {"attacks": ["fgsm", "pgd"], "eps": [0.0, 0.02, 0.05], "batch_size": 16,
        "progress": False, "attack_kwargs": {"pgd": {"steps": 5}}, "gallery": 1}


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _eval(model: mr.Classifier | None = None, **kw: object) -> EvaluationResult:
    args = dict(ARGS)
    args.update(kw)
    return mr.evaluate(model or linear_model(), linear_data(), **args)  # type: ignore[arg-type]


def _leftovers(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if ".tmp" in p.name or p.name.startswith(".medrobust-write-test"))


# ---------------------------------------------------------------------------------- the lock
def test_a_second_run_into_the_same_folder_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    fd = os.open(out / output.LOCK_NAME, os.O_RDWR | os.O_CREAT)
    try:  # another process (here: another open file description) holds the folder
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, b"4242")
        with pytest.raises(EvaluationError, match=r"another medrobust evaluate is writing into "
                                                  r"this folder \(process 4242\)"):
            _eval(out=out)
        assert not (out / "results.json").exists() and not (out / "results.sqlite").exists()
    finally:
        os.close(fd)  # closing drops the lock, as a process's death does
    res = _eval(out=out)
    assert res.results["run"]["units_computed"] > 0 and (out / "report.html").is_file()
    # the lock file stays, unlocked: a later run (or the resume of a killed one) goes ahead
    assert (out / output.LOCK_NAME).exists()
    assert _eval(out=out).results["run"]["units_computed"] == 0


# ----------------------------------------------------------------------- full disk, permissions
def _failing_writer(fail_on: int, err: OSError) -> object:
    calls = {"n": 0}
    real = output.write_bytes

    def write(path: Path, data: bytes) -> None:
        calls["n"] += 1
        if calls["n"] >= fail_on:
            with open(path, "wb") as f:  # half the file, then the disk is full
                f.write(data[: len(data) // 2])
            raise err
        real(path, data)

    return write


@pytest.mark.parametrize(("err", "message"), [
    (OSError(errno.ENOSPC, "No space left on device"), "no space left on the device"),
    (PermissionError(errno.EACCES, "Permission denied"), "permission denied"),
])
@pytest.mark.parametrize("fail_on", [1, 3, 4])
def test_write_errors_leave_nothing_half_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 err: OSError, message: str, fail_on: int
                                                 ) -> None:
    out = tmp_path / "out"
    monkeypatch.setattr(output, "write_bytes", _failing_writer(fail_on, err))
    with pytest.raises(EvaluationError, match=f"cannot write the results \\({message}\\)"):
        _eval(out=out)
    assert not (out / "results.json").exists() and not (out / "report.html").exists()
    assert not (out / "figures" / "gallery.png").exists()
    assert _leftovers(out) == []
    # the units are kept: once the disk has room, the rerun only writes the outputs
    monkeypatch.undo()
    res = _eval(out=out)
    assert res.results["run"]["units_computed"] == 0 and res.results["run"]["units_reused"] > 0
    assert (out / "results.json").is_file() and (out / "report.html").is_file()


def test_cli_write_error_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from medrobust.modelstore import save_model
    from medrobust.nets import build_network

    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = build_network("smallcnn", in_channels=1, num_classes=2, width=2).eval()
    model_dir = save_model(tmp_path / "m", net, bounds=(0.0, 1.0), units="intensity",
                           class_names=["normal", "lesion"], task="binary")
    monkeypatch.setattr(output, "write_bytes",
                        _failing_writer(2, OSError(errno.ENOSPC, "No space left on device")))
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(["evaluate", "--model", str(model_dir), "--data", "phantom-16", "--limit", "8",
                   "--attacks", "fgsm", "--eps", "0,2/255", "--quiet", "--gallery", "1",
                   "--out", str(tmp_path / "o")])
    lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err.getvalue(), err.getvalue()
    assert "no space left on the device" in lines[0]
    assert _leftovers(tmp_path / "o") == [] and not (tmp_path / "o" / "results.json").exists()


# ----------------------------------------------------------------------- a model that raises
class Flaky(Linear):
    """The linear model, raising on its ``fail_at``-th forward call (not in the state dict)."""

    def __init__(self, fail_at: int) -> None:
        w, b = weights()
        super().__init__(w, b)
        self.fail_at = fail_at
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return super().forward(x)


def test_a_model_that_raises_is_named_with_its_batch_and_units_are_kept(tmp_path: Path) -> None:
    net = Flaky(fail_at=40)
    model = mr.Classifier(net, bounds=(0.0, 1.0), num_classes=2)
    with pytest.raises(EvaluationError) as info:
        _eval(model, out=tmp_path)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith("model Flaky failed on batch ")
    assert "(samples " in msg and "illegal memory access" in msg and "rerun" in msg
    with sqlite3.connect(tmp_path / "results.sqlite") as con:
        kept = con.execute("SELECT COUNT(*) FROM batches").fetchone()[0]
    assert kept > 0 and not (tmp_path / "results.json").exists()
    net.fail_at = -1  # the fault is gone: the rerun continues from the stored units
    res = _eval(model, out=tmp_path)
    assert res.results["run"]["units_reused"] == kept


# ------------------------------------------------------------------------------- pre-flight
def test_preflight_flags_a_constant_model() -> None:
    w, _ = weights()
    model = mr.Classifier(Linear(w, -100.0), bounds=(0.0, 1.0), num_classes=2)
    res = _eval(model, attacks=["fgsm"])
    st = {c["id"]: c for c in res.results["sanity"]["checks"]}
    assert st["constant_prediction"]["status"] == "fail"
    assert "class 0 for all 40 samples" in st["constant_prediction"]["detail"]
    assert not res.results["sanity"]["passed"] and not res.results["headline"][0]["reliable"]
    assert st["classes"]["status"] == "info"  # binary: the margin loss stands in for DLR


class Noisy(Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + 0.5 * torch.randn(x.shape[0], 1)


class Softmaxed(Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = super().forward(x)
        return torch.softmax(torch.cat([-z, z], 1), 1)


def test_preflight_flags_randomness_and_probability_outputs(tmp_path: Path) -> None:
    w, b = weights()
    noisy = _eval(mr.Classifier(Noisy(w, b), bounds=(0.0, 1.0), num_classes=2),
                  attacks=["fgsm"], gallery=0)
    st = {c["id"]: c["status"] for c in noisy.results["sanity"]["checks"]}
    assert st["randomness"] == "fail" and "randomness" in noisy.results["sanity"]["failed"]
    soft = _eval(mr.Classifier(Softmaxed(w, b), bounds=(0.0, 1.0), num_classes=2),
                 attacks=["fgsm", "pgd"], out=tmp_path)
    s = soft.results["sanity"]
    st = {c["id"]: c["status"] for c in s["checks"]}
    assert st["probabilities"] == "warn" and st["randomness"] == "pass"
    assert "probabilities" in s["warnings"]
    html = (tmp_path / "report.html").read_text()
    # a warning is not a clean pass: no green banner
    assert "All sanity checks passed" not in html
    assert s["passed"] and s["warnings"] == ["probabilities"]
    assert 'data-state="warnings"' in html and "passed with 1 warning: probabilities" in html
    plain = _eval()
    assert plain.results["sanity"]["passed"] and not plain.results["sanity"]["warnings"]
    assert {c["id"]: c["status"] for c in plain.results["sanity"]["checks"]}["probabilities"] \
        == "pass"
