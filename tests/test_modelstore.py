"""Saved model folders: round trips, user factories, every bad folder; preprocessing configs."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest
import torch

from medrobust.modelstore import (
    ModelError,
    atomic_directory,
    load_from_factory,
    load_model,
    save_model,
)
from medrobust.nets import build_network
from medrobust.preprocessing import (
    Compose,
    IntensityWindow,
    PreprocessingError,
    Resize,
    from_config,
)


def _net(seed: int = 0) -> torch.nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return build_network("smallcnn", in_channels=1, num_classes=2, width=4).eval()


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    d = tmp_path / "model"
    save_model(d, _net(), bounds=(-1000.0, 1000.0), units="HU", mean=0.4, std=0.2,
               preprocess=Compose([IntensityWindow(40, 400), Resize(16)]),
               class_names=["normal", "lesion"], data={"dataset": "phantom", "sha256": "ab"})
    return d


# --------------------------------------------------------------------------- round trips
def test_round_trip_gives_identical_logits(saved: Path) -> None:
    net = _net()
    loaded = load_model(saved)
    clf = loaded.classifier
    assert clf is not None
    assert clf.bounds == (-1000.0, 1000.0) and clf.num_classes == 2
    assert loaded.units == "HU" and loaded.class_names == ["normal", "lesion"]
    x = torch.linspace(-1000, 1000, 3 * 40 * 40).reshape(3, 1, 40, 40)
    # the same pipeline by hand: window -> resize -> normalize -> net
    ref = net(((Resize(16)(IntensityWindow(40, 400)(x))) - 0.4) / 0.2)
    assert torch.equal(clf.logits(x), ref.detach())
    meta = json.loads((saved / "model.json").read_text())
    assert meta["architecture"]["name"] == "smallcnn"
    assert meta["input"] == {"bounds": [-1000.0, 1000.0], "units": "HU", "channels": 1,
                             "spatial_dims": 2, "size": [16, 16]}
    assert meta["preprocessing"]["mean"] == [0.4] and meta["data"]["sha256"] == "ab"
    assert meta["medrobust_version"] and meta["task"] == "binary"
    assert sorted(os.listdir(saved)) == [".medrobust-written.json", "model.json",
                                         "weights.safetensors"]
    assert load_model(saved, device="auto").classifier is not None
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="CUDA is not available"):
            load_model(saved, device="cuda")


def test_round_trip_segmentation_unet(tmp_path: Path) -> None:
    with torch.random.fork_rng():
        torch.manual_seed(1)
        net = build_network("unet", in_channels=1, num_classes=3, channels=[4, 8]).eval()
    save_model(tmp_path / "seg", net, class_names=["bg", "a", "b"])
    loaded = load_model(tmp_path / "seg")
    assert loaded.task == "segmentation" and loaded.classifier is None
    x = torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded.module(x), net(x))


def test_overwrite_rules_and_atomicity(saved: Path, tmp_path: Path) -> None:
    before = (saved / "weights.safetensors").read_bytes()
    with pytest.raises(ModelError, match="not empty"):
        save_model(saved, _net(1))
    assert (saved / "weights.safetensors").read_bytes() == before
    # an error while writing leaves neither the folder nor a temporary folder behind
    with pytest.raises(ModelError, match="JSON"):
        save_model(tmp_path / "bad", _net(), data={"x": object()})
    assert not (tmp_path / "bad").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    save_model(saved, _net(1), overwrite=True)
    assert (saved / "weights.safetensors").read_bytes() != before
    with pytest.raises(RuntimeError), atomic_directory(tmp_path / "x") as tmp:
        (tmp / "f").write_text("half")
        raise RuntimeError("boom")
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_user_factory_with_pt_and_safetensors(tmp_path: Path, monkeypatch) -> None:
    pkg = tmp_path / "src"
    pkg.mkdir()
    (pkg / "my_medrobust_net.py").write_text(textwrap.dedent("""
        import torch
        def make(width=3):
            return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, width))
    """))
    monkeypatch.syspath_prepend(str(pkg))
    import my_medrobust_net

    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = my_medrobust_net.make(width=3)
    torch.save({"state_dict": net.state_dict()}, tmp_path / "w.pt")
    loaded = load_from_factory("my_medrobust_net:make", tmp_path / "w.pt", args={"width": 3},
                               class_names=["a", "b", "c"])
    x = torch.rand(2, 1, 4, 4)
    assert loaded.classifier is not None
    assert torch.equal(loaded.classifier.logits(x), net(x).detach())
    save_model(tmp_path / "m", loaded.module, factory="my_medrobust_net:make",
               arch_args={"width": 3}, class_names=["a", "b", "c"])
    with pytest.raises(ModelError, match="factory.*code.*--trust-code.*trust_code=True"):
        load_model(tmp_path / "m")  # a folder naming code runs it only when trusted
    again = load_model(tmp_path / "m", trust_code=True)
    assert again.metadata["architecture"] == {"factory": "my_medrobust_net:make",
                                              "args": {"width": 3}}
    assert torch.equal(again.classifier.logits(x), net(x).detach())  # type: ignore[union-attr]
    # a pickle holding an arbitrary object is refused (weights_only=True)
    torch.save({"state_dict": net.state_dict(), "obj": Path("/etc")}, tmp_path / "evil.pt")
    with pytest.raises(ModelError, match="evil.pt.*weights_only"):
        load_from_factory("my_medrobust_net:make", tmp_path / "evil.pt", args={"width": 3})
    for spec, msg in [("nocolon", "package.module:function"),
                      ("no_such_module_xyz:f", "cannot import"),
                      ("my_medrobust_net:nothing", "no attribute")]:
        with pytest.raises(ModelError, match=msg):
            load_from_factory(spec, tmp_path / "w.pt")


# --------------------------------------------------------------------------- bad folders
def _edit_json(d: Path, **changes: object) -> None:
    meta = json.loads((d / "model.json").read_text())
    for key, value in changes.items():
        meta[key] = value
    (d / "model.json").write_text(json.dumps(meta))


def test_missing_dir_and_files(saved: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="nowhere.*not found"):
        load_model(tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ModelError, match="file.*not a directory"):
        load_model(tmp_path / "file")
    (saved / "weights.safetensors").unlink()
    with pytest.raises(ModelError, match="weights.safetensors: weights file missing"):
        load_model(saved)
    (saved / "model.json").unlink()
    with pytest.raises(ModelError, match="model.json: missing"):
        load_model(saved)


def test_malformed_json(saved: Path) -> None:
    (saved / "model.json").write_text('{"architecture": {"name": "smallcnn",')
    with pytest.raises(ModelError, match=r"model.json: malformed JSON at line 1"):
        load_model(saved)
    (saved / "model.json").write_text("[1, 2]")
    with pytest.raises(ModelError, match="expected a JSON object"):
        load_model(saved)


def test_unknown_architecture_and_bad_args(saved: Path) -> None:
    _edit_json(saved, architecture={"name": "vgg99", "args": {}})
    with pytest.raises(ModelError, match="model.json: unknown architecture 'vgg99'"):
        load_model(saved)
    _edit_json(saved, architecture={"name": "smallcnn", "args": {"depth": 3}})
    with pytest.raises(ModelError, match="cannot build 'smallcnn'.*depth"):
        load_model(saved)
    _edit_json(saved, architecture={"name": "smallcnn", "args": {}}, weights="../escape")
    with pytest.raises(ModelError, match="'weights' must be a file name"):
        load_model(saved)


def test_weights_that_do_not_match(saved: Path) -> None:
    from safetensors.torch import load_file, save_file

    w = saved / "weights.safetensors"
    state = load_file(str(w))
    # a hand-written folder records no sha256 (a saved one does: see test_trust_modelstore.py)
    _edit_json(saved, weights_sha256=None)
    # shape mismatch: a wider network's weights
    _edit_json(saved, architecture={"name": "smallcnn", "args": {"width": 8}})
    with pytest.raises(ModelError, match="do not match.*shape mismatch"):
        load_model(saved)
    _edit_json(saved, architecture={"name": "smallcnn", "args": {"width": 4}})
    missing = dict(state)
    missing.pop("head.3.bias")
    save_file(missing, str(w))
    with pytest.raises(ModelError, match=r"1 missing key\(s\): head.3.bias"):
        load_model(saved)
    extra = dict(state)
    extra["surprise"] = torch.zeros(1)
    save_file(extra, str(w))
    with pytest.raises(ModelError, match=r"unexpected key\(s\): surprise"):
        load_model(saved)
    w.write_bytes(b"\x00\x01 not safetensors")
    with pytest.raises(ModelError, match="weights.safetensors: not a readable safetensors"):
        load_model(saved)


def test_bad_preprocessing_and_format(saved: Path) -> None:
    meta = json.loads((saved / "model.json").read_text())
    meta["preprocessing"]["steps"] = {"type": "sharpen"}
    (saved / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="unknown preprocessing step type 'sharpen'"):
        load_model(saved)
    _edit_json(saved, format_version=99)
    with pytest.raises(ModelError, match="newer"):
        load_model(saved)


# --------------------------------------------------------------------------- preprocessing
def test_preprocessing_config_round_trip_and_gradients() -> None:
    chain = Compose([IntensityWindow(lo=-100, hi=100), Resize([6, 6, 6])])
    cfg = chain.to_config()
    assert json.loads(json.dumps(cfg)) == cfg
    rebuilt = from_config(cfg)
    x = torch.linspace(-300, 300, 8 ** 3).reshape(1, 1, 8, 8, 8).requires_grad_(True)
    assert torch.equal(rebuilt(x), chain(x))  # type: ignore[misc]
    assert rebuilt(x).shape == (1, 1, 6, 6, 6)  # type: ignore[misc]
    w = IntensityWindow(0, 200)
    y = w(x)
    (g,) = torch.autograd.grad(y.sum(), x)
    inside = (x.detach() > -100) & (x.detach() < 100)
    assert torch.allclose(g[inside], torch.full_like(g[inside], 1 / 200))
    assert (g[~inside] == 0).all() and y.min() == 0 and y.max() == 1
    assert w.to_config() == {"type": "window", "lo": -100.0, "hi": 100.0}
    assert from_config(None) is None and from_config([]) is None
    for bad, msg in [({"type": "window", "lo": 1, "hi": 1}, "lo < hi"),
                     ({"type": "resize", "size": [0]}, "positive"),
                     ({"type": "window", "centre": 1}, "invalid arguments"),
                     ({"type": "blur"}, "unknown preprocessing step")]:
        with pytest.raises(PreprocessingError, match=msg):
            from_config(bad)
