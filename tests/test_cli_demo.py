"""``medrobust demo`` end to end (the reduced ``--quick`` run in a subprocess), its folder rules,
and the full default run, the README's first command (about a minute of CPU)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medrobust._files import mark_folder_written
from medrobust.cli import main


def _demo(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "medrobust.cli", "demo", *map(str, args)],
        capture_output=True, text=True, timeout=600, cwd=cwd,
    )


def _check_output(out: Path, stdout: str) -> dict:
    for name in ("report.html", "results.json", "demo.json", "model/model.json"):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    marker = json.loads((out / "demo.json").read_text())
    assert marker["kind"] == "medrobust-demo" and marker["complete"] is True
    assert set(results["attacks"]) == {"fgsm", "pgd"}
    html = (out / "report.html").read_text()
    assert "<html" in html.lower() and "data:image/png;base64" in html
    assert str((out / "report.html").resolve()) in stdout
    assert "FGSM" in stdout and "PGD" in stdout and "worst case" in stdout
    return results


def test_quick_demo_replaces_an_earlier_demo(tmp_path: Path) -> None:
    out = tmp_path / "medrobust-demo"
    out.mkdir()
    (out / "demo.json").write_text(json.dumps({"kind": "medrobust-demo"}))
    (out / "stale.txt").write_text("from an earlier demo")
    mark_folder_written(out)  # an earlier demo's manifest: every file in it is the demo's
    r = _demo("--quick", "--overwrite", cwd=tmp_path)  # the default --out, in the cwd
    assert r.returncode == 0, r.stderr
    results = _check_output(out, r.stdout)
    assert not (out / "stale.txt").exists()
    assert results["config"]["units"] == "HU"
    assert results["clean"]["accuracy"]["value"] > 0.7  # the small CNN learned the phantoms
    assert not list(tmp_path.glob(".medrobust-demo.*"))  # no leftovers beside it


def test_demo_folder_rules(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # a folder the demo did not write is never touched, even with --overwrite
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    for extra in ([], ["--overwrite"]):
        assert main(["demo", "--out", str(other), "--quick", *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "did not write" in err
    assert [p.name for p in other.iterdir()] == ["notes.txt"]
    # an earlier demo needs --overwrite
    demo = tmp_path / "demo"
    demo.mkdir()
    (demo / "demo.json").write_text(json.dumps({"kind": "medrobust-demo"}))
    assert main(["demo", "--out", str(demo), "--quick"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    # ... and --overwrite replaces it only when it holds nothing but what the demo wrote: a file
    # added by the user (or one without the demo's manifest) keeps the folder as it is
    mark_folder_written(demo)
    (demo / "my-notes.txt").write_text("mine")
    assert main(["demo", "--out", str(demo), "--quick", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "my-notes.txt" in err and "never replaced" in err
    assert (demo / "my-notes.txt").read_text() == "mine" and (demo / "demo.json").is_file()
    # a file in the way
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["demo", "--out", str(f)]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_demo_pneumoniamnist_missing(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDROBUST_DATA", str(tmp_path / "nowhere"))
    monkeypatch.setenv("MEDROBUST_CACHE", str(tmp_path / "cache"))
    assert main(["demo", "--out", str(tmp_path / "d"), "--data", "pneumoniamnist"]) == 2
    err = capsys.readouterr().err
    assert "MEDROBUST_DATA" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "d").exists()


@pytest.mark.slow
def test_full_default_demo(tmp_path: Path) -> None:
    t0 = time.perf_counter()
    r = _demo(cwd=tmp_path)
    wall = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr
    results = _check_output(tmp_path / "medrobust-demo", r.stdout)
    assert results["clean"]["accuracy"]["value"] > 0.9
    print(f"the default demo took {wall:.0f} s")  # timed in benchmarks, not asserted here
