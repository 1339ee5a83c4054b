"""Model folders are data, never code (issue 8): a folder naming code runs it only when trusted;
weights are checked (sha256, dtype, NaN/Inf); ``overwrite`` replaces only what medrobust wrote; a
killed write leaves no hidden folder behind after the next one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from medrobust._files import MANIFEST, sha256_of
from medrobust.cli import main
from medrobust.modelstore import ModelError, atomic_directory, load_model, save_model
from medrobust.nets import build_network


def _net(seed: int = 0) -> torch.nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return build_network("smallcnn", in_channels=1, num_classes=2, width=4).eval()


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    return save_model(tmp_path / "model", _net(), class_names=["normal", "lesion"],
                      input_size=[16, 16])


def _edit(d: Path, **changes: object) -> None:
    meta = json.loads((d / "model.json").read_text())
    meta.update(changes)
    (d / "model.json").write_text(json.dumps(meta))


# --------------------------------------------------------------------------- no code
def test_a_factory_in_model_json_is_not_run(saved: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "pwned"
    # os:system with a command as its argument, and a module that acts when imported
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "evil_medrobust_mod.py").write_text(textwrap.dedent(f"""
        from pathlib import Path
        Path({str(marker)!r}).write_text("imported")
        def make(**kw):
            raise SystemExit("ran")
    """))
    monkeypatch.syspath_prepend(str(pkg))
    for factory, args in (("os:system", {"command": f"touch {marker}"}),
                          ("evil_medrobust_mod:make", {})):
        _edit(saved, architecture={"factory": factory, "args": args})
        with pytest.raises(ModelError, match=r"code.*--trust-code.*trust_code=True"):
            load_model(saved)
        assert not marker.exists()
        assert "evil_medrobust_mod" not in sys.modules
        # the command line: exit 2, one line naming the flag, nothing run
        for cmd in (["evaluate", "--model", str(saved), "--data", "phantom-16",
                     "--out", str(tmp_path / "ev"), "--quiet"],
                    ["attack", "--model", str(saved), "--input", str(tmp_path / "x.npy"),
                     "--out", str(tmp_path / "adv.npy"), "--eps", "1/255"]):
            if cmd[0] == "attack":
                import numpy as np

                np.save(tmp_path / "x.npy", np.zeros((16, 16), dtype=np.float32))
            assert main(cmd) == 2
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1 and "--trust-code" in err
            assert "trust_code=True" not in err  # the CLI names its flag
            assert not marker.exists()


def test_trusted_factory_loads(saved: Path, tmp_path: Path,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "my_trusted_net.py").write_text(
        "from medrobust.nets import smallcnn\n"
        "def make(**kw):\n    return smallcnn(in_channels=1, num_classes=2, width=4)\n")
    monkeypatch.syspath_prepend(str(pkg))
    _edit(saved, architecture={"factory": "my_trusted_net:make", "args": {}})
    loaded = load_model(saved, trust_code=True)
    x = torch.rand(2, 1, 16, 16)
    assert torch.equal(loaded.module(x), _net()(x))


def test_preprocessing_names_resolve_to_no_code(saved: Path) -> None:
    # already held on main: preprocessing steps come from a fixed list, never imported by name
    meta = json.loads((saved / "model.json").read_text())
    meta["preprocessing"]["steps"] = {"type": "os:system", "command": "true"}
    (saved / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="unknown preprocessing step type 'os:system'"):
        load_model(saved)


# --------------------------------------------------------------------------- the weights
def test_weights_sha256_recorded_and_checked(saved: Path) -> None:
    meta = json.loads((saved / "model.json").read_text())
    w = saved / "weights.safetensors"
    assert meta["weights_sha256"] == sha256_of(w)
    # other valid weights of the same network put in place: refused, naming both files
    save_file({k: v.contiguous() for k, v in _net(seed=1).state_dict().items()}, str(w))
    with pytest.raises(ModelError, match=r"weights.safetensors: sha256 .* recorded in model.json"):
        load_model(saved)


def test_integer_weights_over_float_refused(saved: Path) -> None:
    w = saved / "weights.safetensors"
    state = load_file(str(w))
    state["head.3.weight"] = state["head.3.weight"].to(torch.int64)  # loads as rounded ints
    save_file(state, str(w))
    _edit(saved, weights_sha256=sha256_of(w))
    with pytest.raises(ModelError, match=r"dtype mismatch.*head.3.weight: file torch.int64 vs "
                                         r"model torch.float32"):
        load_model(saved)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_weights_refused(saved: Path, bad: float) -> None:
    w = saved / "weights.safetensors"
    state = load_file(str(w))
    state["head.3.bias"][0] = bad
    save_file(state, str(w))
    _edit(saved, weights_sha256=sha256_of(w))
    with pytest.raises(ModelError, match=r"NaN or infinite values in 1 tensor\(s\): head.3.bias"):
        load_model(saved)


# --------------------------------------------------------------------------- overwrite
def test_overwrite_replaces_only_what_medrobust_wrote(saved: Path) -> None:
    assert (saved / MANIFEST).is_file()
    # a folder medrobust wrote, unchanged: replaced
    save_model(saved, _net(seed=2), overwrite=True)
    assert load_model(saved).module.state_dict()["head.3.bias"].equal(
        _net(seed=2).state_dict()["head.3.bias"])
    # a file of the user's in it: never replaced, even with overwrite; nothing touched
    (saved / "notes.txt").write_text("mine")
    before = (saved / "weights.safetensors").read_bytes()
    with pytest.raises(ModelError, match=r"did not write.*notes.txt.*never replaced"):
        save_model(saved, _net(seed=3), overwrite=True)
    assert (saved / "notes.txt").read_text() == "mine"
    assert (saved / "weights.safetensors").read_bytes() == before
    # a file medrobust wrote but the user changed counts as the user's
    (saved / "notes.txt").unlink()
    (saved / "model.json").write_text((saved / "model.json").read_text() + " ")
    with pytest.raises(ModelError, match="model.json"):
        save_model(saved, _net(seed=3), overwrite=True)
    # a folder without a manifest (not medrobust's)
    other = saved.parent / "other"
    other.mkdir()
    (other / "model.json").write_text("{}")
    with pytest.raises(ModelError, match="did not write"):
        save_model(other, _net(), overwrite=True)
    assert (other / "model.json").read_text() == "{}"


def test_train_overwrite_refuses_a_foreign_folder(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "data.csv").write_text("patient,label\n")
    assert main(["train", "--data", "phantom-16", "--epochs", "1", "--limit", "16",
                 "--out", str(out), "--overwrite", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "data.csv" in err and "never replaced, even with --overwrite" in err
    assert "overwrite=True" not in err
    assert [p.name for p in out.iterdir()] == ["data.csv"]


# --------------------------------------------------------------------------- killed writes
_KILLED = """
import os, signal, sys
from medrobust.modelstore import atomic_directory
with atomic_directory(sys.argv[1]) as tmp:
    (tmp / "weights.safetensors").write_bytes(b"half")
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_killed_write_leaves_no_hidden_folder_after_the_next(tmp_path: Path) -> None:
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", _KILLED, str(out)], env=env, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left and all(n.startswith(".run.") for n in left)  # what a killed run leaves
    # the next run into the same --out (medrobust train, here in-process) removes it
    assert main(["train", "--data", "phantom-16", "--epochs", "1", "--limit", "16",
                 "--out", str(out), "--device", "cpu", "--no-progress", "--no-test"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert load_model(out).classifier is not None


def test_a_live_write_is_left_alone(tmp_path: Path) -> None:
    from medrobust.modelstore import _clean_stale

    out = tmp_path / "run"
    with atomic_directory(out) as tmp:
        (tmp / "a").write_text("1")
        _clean_stale(out.absolute())  # what another write to the same target does first
        assert (tmp / "a").is_file()  # its lock is held: not a dead run's folder
    assert (out / "a").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
