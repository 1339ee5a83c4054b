"""`medrobust train` end to end: a PneumoniaMNIST subset in a subprocess, phantoms, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medrobust.cli import main
from medrobust.modelstore import load_model


def test_train_pneumoniamnist_subprocess(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "runs" / "pneu"
    env = {**os.environ, "MEDROBUST_DATA": str(data_dir), "OMP_NUM_THREADS": "2"}
    cmd = [sys.executable, "-m", "medrobust.cli", "train", "--data", "pneumoniamnist",
           "--model", "smallcnn", "--epochs", "2", "--batch-size", "16", "--limit", "160",
           "--seed", "3", "--device", "cpu", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert "val acc" in proc.stdout and "val auc" in proc.stdout and "saved" in proc.stdout
    # redirected output: the batches of each epoch as plain lines (a tqdm bar in a terminal)
    assert "epoch 1/2: 1/10 (10%)" in proc.stderr and "epoch 2/2: 10/10 (100%)" in proc.stderr
    assert sorted(os.listdir(out)) == [".medrobust-written.json", "metrics.jsonl", "model.json",
                                       "weights.safetensors"]
    assert [p.name for p in out.parent.iterdir()] == ["pneu"]  # no temporary folder left
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]
    meta = json.loads((out / "model.json").read_text())
    assert meta["data"]["dataset"] == "pneumoniamnist"
    assert meta["data"]["sha256"] == (
        "e1792d3f03751cb101e99f19a63b3c1941436c988665f47853417b05be250cd8")
    assert meta["class_names"] == ["normal", "pneumonia"] and meta["task"] == "binary"
    assert meta["training"]["seed"] == 3 and meta["training"]["test"] is not None
    best = max(log, key=lambda r: r["val_auc"])
    assert meta["training"]["best_epoch"] == best["epoch"]
    loaded = load_model(out)
    assert loaded.classifier is not None and loaded.classifier.bounds == (0.0, 1.0)
    assert loaded.classifier.predict(torch.rand(4, 1, 28, 28)).shape == (4,)

    # an existing non-empty --out needs --overwrite: exit 2, one line, no traceback
    before = (out / "weights.safetensors").read_bytes()
    assert main(cmd[3:]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "--overwrite" in err
    assert (out / "weights.safetensors").read_bytes() == before


def test_train_phantom_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ph"
    rc = main(["train", "--data", "phantom", "--size", "16", "--limit", "48", "--epochs", "1",
               "--batch-size", "16", "--device", "cpu", "--no-progress", "--out", str(out),
               "--input-size", "12"])
    assert rc == 0, capsys.readouterr().err
    loaded = load_model(out)
    assert loaded.metadata["input"]["size"] == [12, 12]
    assert loaded.classifier is not None
    x = torch.rand(2, 1, 16, 16)
    assert loaded.classifier.logits(x).shape == (2, 2)
    # --overwrite replaces it
    rc = main(["train", "--data", "phantom", "--size", "16", "--limit", "48", "--epochs", "1",
               "--device", "cpu", "--out", str(out), "--overwrite", "--no-test"])
    assert rc == 0


def test_train_segmentation_phantom(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "seg"
    rc = main(["train", "--data", "phantom-seg", "--model", "unet", "--size", "16", "--limit",
               "16", "--epochs", "1", "--batch-size", "8", "--device", "cpu", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert "val dice" in capsys.readouterr().out
    loaded = load_model(out)
    assert loaded.task == "segmentation" and loaded.classifier is None
    assert loaded.module(torch.rand(1, 1, 16, 16)).shape == (1, 2, 16, 16)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--data", "no_such_dataset_xyz"], "no_such_dataset_xyz"),
        (["--data", "phantom", "--model", "vgg"], "unknown --model 'vgg'"),
        (["--data", "phantom", "--model", "resnet18_3d"], "3D network"),
        (["--data", "phantom", "--model", "unet"], "segmentation network"),
        (["--data", "phantom", "--epochs", "0"], "--epochs"),
        (["--data", "phantom", "--window", "40"], "--window"),
        (["--data", "phantom", "--model", "nomodule_xyz:f"], "cannot import"),
    ],
)
def test_user_errors_exit_2_and_leave_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    out = tmp_path / "out"
    rc = main(["train", "--out", str(out), "--limit", "16", "--size", "16", "--device", "cpu",
               *extra])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.startswith("medrobust train: error:")
    assert list(tmp_path.iterdir()) == []


def test_bad_data_file_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "broken.npz"
    bad.write_bytes(b"PK\x03\x04 truncated")
    rc = main(["train", "--data", str(bad), "--out", str(tmp_path / "o"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "broken.npz" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.npz"]
