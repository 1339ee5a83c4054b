"""First contact (issue 8): dependencies a medical user needs, local MedMNIST copies before any
download and a failed download that says where it looked, progress of long work in a terminal and
when redirected, ``--version``, defaults and attack names in every ``--help``, messages that name
CLI flags."""

from __future__ import annotations

import io
import re
import sys
from pathlib import Path

import pytest
import torch

from medrobust import progress
from medrobust.attacks import ATTACKS, EAD, LBFGS, CarliniWagnerL2, OnePixel
from medrobust.cli import build_parser, cli_wording, main
from medrobust.data.errors import DataError
from medrobust.data.medmnist import load_medmnist
from medrobust.models import Classifier

REPO = Path(__file__).resolve().parents[1]


def test_dependencies_in_pyproject() -> None:
    text = (REPO / "pyproject.toml").read_text()
    block = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M)
    assert block is not None
    listed = re.findall(r'^\s*"([^"]+)"', block.group(1), re.M)
    deps = {re.split(r"[<>=!~ \[]", d)[0].lower(): d for d in listed}
    assert deps["torch"].replace(" ", "") == "torch>=2.6"  # weights_only=True is sound from 2.6
    assert "pydicom" in deps and "nibabel" in deps  # DICOM and NIfTI out of the box


# --------------------------------------------------------------------------- MedMNIST
def test_local_copy_before_download(data_dir: Path, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # already held on main: MEDROBUST_DATA is looked in first; the (dead) server is never asked
    monkeypatch.setenv("MEDROBUST_DATA", str(data_dir))
    monkeypatch.setenv("MEDROBUST_CACHE", str(tmp_path / "cache"))
    d = load_medmnist("pneumoniamnist", "test", limit=3, base_url="http://127.0.0.1:9/")
    assert len(d) == 3 and d.source.startswith(str(data_dir))


def test_failed_download_says_where_it_looked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    empty, cache = tmp_path / "data", tmp_path / "cache"
    empty.mkdir()
    monkeypatch.setenv("MEDROBUST_DATA", str(empty))
    monkeypatch.setenv("MEDROBUST_CACHE", str(cache))
    monkeypatch.setenv("MEDROBUST_MEDMNIST_URL", "http://127.0.0.1:9/{file}")
    with pytest.raises(DataError) as err:
        load_medmnist("pneumoniamnist", "test")
    msg = str(err.value)
    assert f"not found in {empty}, {cache}" in msg and "download" in msg
    assert "set MEDROBUST_DATA to that folder" in msg
    with pytest.raises(DataError, match="downloading is off.*MEDROBUST_DATA"):
        load_medmnist("pneumoniamnist", "test", download=False)
    assert main(["evaluate", "--model", str(tmp_path), "--data", "pneumoniamnist"]) == 2
    assert "download=False" not in capsys.readouterr().err


# --------------------------------------------------------------------------- progress
def test_progress_lines_when_redirected() -> None:
    out = io.StringIO()
    with progress.shown(interval=0.0):
        items = list(progress.track(range(4), "work", file=out))
    assert items == [0, 1, 2, 3]
    assert out.getvalue().splitlines() == [
        "work: 1/4 (25%)", "work: 2/4 (50%)", "work: 3/4 (75%)", "work: 4/4 (100%)"]
    # at most one line per interval, but always the first and the last step
    out = io.StringIO()
    with progress.shown(interval=3600.0):
        tick = progress.callback("evaluate", total=50, file=out)
        for i in range(50):
            tick(1, f"unit {i + 1}")
        tick.close()
    assert out.getvalue().splitlines() == ["evaluate: 1/50 (2%) unit 1",
                                           "evaluate: 50/50 (100%) unit 50"]
    # off unless switched on: library calls print nothing
    out = io.StringIO()
    list(progress.track(range(3), "quiet", file=out))
    assert out.getvalue() == ""


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_in_a_terminal() -> None:
    term = _Terminal()
    with progress.shown():
        for _ in progress.track(range(3), "epoch 1/1", file=term, unit="batch"):
            pass
    text = term.getvalue()
    assert "epoch 1/1" in text and "0/3" in text and "\r" in text  # tqdm's bar, redrawn


@pytest.mark.parametrize("attack, name", [
    (CarliniWagnerL2(binary_search_steps=2, steps=3), "C&W"),
    (EAD(binary_search_steps=2, steps=3), "EAD"),
    (LBFGS(search_steps=2, steps=3), "L-BFGS"),
    (OnePixel(population=8, generations=2, seed=0), "One-Pixel"),
])
def test_long_attacks_report_their_steps(attack: object, name: str,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
    model = Classifier(net, bounds=(0.0, 1.0))
    x, y = torch.rand(3, 1, 4, 4), torch.tensor([0, 1, 0])
    attack(model, x, y)  # type: ignore[operator]
    assert capsys.readouterr().err == ""  # quiet by default
    with progress.shown(interval=0.0):
        attack(model, x, y)  # type: ignore[operator]
    err = capsys.readouterr().err
    assert re.search(rf"^{re.escape(name)} \(3 samples\): 1/\d+", err, re.M), err


# --------------------------------------------------------------------------- the command line
def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from medrobust import __version__

    with pytest.raises(SystemExit) as err:
        main(["--version"])
    assert err.value.code == 0 and capsys.readouterr().out.strip() == f"medrobust {__version__}"


def test_every_help_shows_defaults_and_attack_names() -> None:
    parser, _ = build_parser()
    names = sorted(ATTACKS)
    assert all(n in parser.format_help() for n in names)
    sub = next(a for a in parser._actions if a.dest == "command")
    for cmd, p in sub.choices.items():  # type: ignore[union-attr]
        text = " ".join(p.format_help().split())
        formatter = p._get_formatter()
        for action in p._actions:
            if not action.option_strings or action.dest == "help" or action.required:
                continue
            if action.default in (None, False):
                continue  # off / not given: nothing to show
            help_text = formatter._get_help_string(action)  # type: ignore[attr-defined]
            assert "default" in help_text.lower(), (
                f"{cmd} {action.option_strings[0]}: no default in its help")
            shown = str(action.default)
            assert shown in text, f"{cmd} {action.option_strings[0]}: {shown!r} not shown"
        if cmd in ("attack", "evaluate"):
            assert all(n in text for n in names), cmd


def test_messages_name_cli_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_wording("choose another folder or pass overwrite to replace them") == (
        "choose another folder or use --overwrite to replace them")
    assert cli_wording("(use overwrite=True)") == "(use --overwrite)"
    # the engine's message about earlier results, through the command line
    from medrobust.modelstore import save_model
    from medrobust.nets import build_network

    model = save_model(tmp_path / "m", build_network("smallcnn", in_channels=1, num_classes=2,
                                                     width=4), class_names=["normal", "lesion"])
    base = ["evaluate", "--model", str(model), "--data", "phantom-16", "--limit", "4",
            "--attacks", "fgsm", "--out", str(tmp_path / "ev"), "--quiet", "--gallery", "0"]
    assert main([*base, "--eps", "0,1/255"]) == 0
    capsys.readouterr()
    assert main([*base, "--eps", "0,2/255"]) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and not re.search(r"\bpass overwrite\b", err)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__]))
