"""CT tampering (CT-GAN): the phantom series, the generator, the tampered DICOM series, bad inputs.

The generator is trained for a few steps only (its quality is measured in benchmarks/bench_ct.py).
The verdict "lesion present / absent" on the re-read series is a simple intensity criterion (a 3^3
mean above 90 HU over most of a small ball at the location; the phantoms' tissue is 40 HU, their
lesions 140 HU): the Segmenter of the segmentation work had not landed when this was written. The
same criterion, as a differentiable two-class "segmenter", is the model the tampering is refined
against, so the test checks the whole pipeline (in-paint, paste, refine, write, re-read).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pydicom
import pytest
import torch
import torch.nn.functional as F

from medrobust.cli import main
from medrobust.data.dicom import load_dicom
from medrobust.data.phantoms import write_phantom_series
from medrobust.modelstore import ModelError
from medrobust.tamper import HistogramEqualizer, load_generator, refine, save_generator
from medrobust.tamper.dicom_out import write_tampered_series
from medrobust.tamper.inpaint import blend_weight, tamper_volume
from medrobust.tamper.training import phantom_cubes, train_inpainter

torch.set_num_threads(1)
THRESH = 90.0


def intensity_segmenter(x: torch.Tensor) -> torch.Tensor:
    """Two-class logits: lesion where the 3^3 mean exceeds 90 HU (differentiable)."""
    sm = F.avg_pool3d(x, 3, 1, 1, count_include_pad=False)
    return torch.cat([torch.zeros_like(sm), (sm - THRESH) / 5.0], 1)


def lesion_fraction(vol: torch.Tensor, loc: tuple[int, int, int], r: float = 2.0) -> float:
    """Fraction of the ball of radius ``r`` at ``loc`` that the intensity segmenter calls lesion."""
    pred = intensity_segmenter(vol[None, None].float()).argmax(1)[0]
    zz, yy, xx = torch.meshgrid(*[torch.arange(s) for s in vol.shape], indexing="ij")
    ball = ((zz - loc[0]) ** 2 + (yy - loc[1]) ** 2 + (xx - loc[2]) ** 2).float() <= r * r
    return float(pred[ball].float().mean())


@pytest.fixture(scope="module")
def generator_dir(tmp_path_factory):
    cubes, cond = phantom_cubes(12, size=32, cube=16, seed=0, lesion_radius=(0.1, 0.14),
                                lesion_contrast=100.0)
    res = train_inpainter(cubes, cond, steps=30, batch_size=6, lr=1e-3, seed=0,
                          arch_args={"channels": [8, 16]})
    d = tmp_path_factory.mktemp("gen") / "G"
    save_generator(d, res.generator, arch_args=res.arch_args)
    return d


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    """Two 32^3 phantom series, with and without a lesion (100 HU contrast)."""
    root = tmp_path_factory.mktemp("series")
    les = write_phantom_series(root / "lesion", size=32, seed=3, lesion=True,
                               lesion_radius=(0.08, 0.1), lesion_contrast=100.0)
    free = write_phantom_series(root / "free", size=32, seed=4, lesion=False)
    centre = tuple(les.labels[0].nonzero().float().mean(0).round().long().tolist())
    return root, les, free, centre


# --------------------------------------------------------------------------- phantom series
def test_phantom_series_reads_back_as_ct(series):
    root, les, _, centre = series
    data = load_dicom(root / "lesion")
    assert data.units == "HU" and data.meta["modality"] == "CT"
    assert data.images.shape == (1, 1, 32, 32, 32)
    assert torch.equal(data.images, les.images)
    uids = {d.SOPInstanceUID for d in data.meta["datasets"]}
    assert len(uids) == 32
    assert lesion_fraction(data.images[0, 0], centre) > 0.5  # the criterion sees the lesion
    with pytest.raises(ModelError, match="not empty"):
        write_phantom_series(root / "lesion", size=16)


# --------------------------------------------------------------------------- building blocks
def test_equalizer_round_trip_and_range():
    x = torch.cat([torch.full((500,), -1000.0), 40 + 20 * torch.randn(2000), 300 * torch.rand(300)])
    eq = HistogramEqualizer.fit(x, levels=256)
    z = eq.equalize(x)
    assert float(z.min()) >= -1 and float(z.max()) <= 1
    inside = (x > -900) & (x < float(x.max()))
    assert torch.allclose(eq.dequalize(z)[inside], x[inside], atol=2.0)
    # equalization spreads the soft-tissue peak: its share of [-1, 1] is about its share of voxels
    tissue = (x > 0) & (x < 80)
    assert float(z[tissue].max() - z[tissue].min()) > 1.0


def test_blend_weight():
    w = blend_weight(16, 8, 2)
    assert float(w.min()) == 0.0 and float(w[8, 8, 8]) == 1.0
    assert float(w[:4].abs().max()) == 0.0 and float(w[:, :, 12:].abs().max()) == 0.0
    assert ((w >= 0) & (w <= 1)).all()


# --------------------------------------------------------------------------- tampering
@pytest.mark.parametrize("mode", ["inject", "remove"])
def test_tamper_writes_a_derived_series_with_the_verdict(generator_dir, series, tmp_path, mode):
    root, les, free, centre = series
    src = root / ("free" if mode == "inject" else "lesion")
    data = load_dicom(src)
    vol = data.images[0, 0]
    loc = centre if mode == "remove" else (16, 16, 16)
    before = lesion_fraction(vol, loc)
    assert (before < 0.1) if mode == "inject" else (before > 0.5)
    gen = load_generator(generator_dir)
    res = tamper_volume(vol, loc, gen, mode, seed=0)
    res = refine(res, None, eps=150.0, steps=10, segment=intensity_segmenter)
    out = tmp_path / "out"
    vol0 = vol.clone()
    write_tampered_series(out, res.volume, data.meta, f"test {mode}")
    assert torch.equal(vol, vol0)  # the input volume is not changed
    back = load_dicom(out)
    after = back.images[0, 0]
    verdict = lesion_fraction(after, loc)
    assert (verdict > 0.5) if mode == "inject" else (verdict < 0.1)
    # only the in-painted hole (8^3 around the location) changes; the rest is bit-identical HU
    changed = (after != vol).nonzero()
    assert changed.numel() > 0
    for axis in range(3):
        assert int((changed[:, axis] - loc[axis]).abs().max()) <= 4
    # derived identity: new UIDs, DERIVED\SECONDARY, description, source references
    originals = {d.SOPInstanceUID for d in data.meta["datasets"]}
    files = sorted(out.glob("*.dcm"))
    assert len(files) == 32
    ds = [pydicom.dcmread(f) for f in files]
    assert {d.SOPInstanceUID for d in ds}.isdisjoint(originals)
    assert len({d.SeriesInstanceUID for d in ds}) == 1
    assert ds[0].SeriesInstanceUID != data.meta["datasets"][0].SeriesInstanceUID
    assert all(list(d.ImageType)[:2] == ["DERIVED", "SECONDARY"] for d in ds)
    assert all(d.DerivationDescription == f"test {mode}" for d in ds)
    refs = {d.SourceImageSequence[0].ReferencedSOPInstanceUID for d in ds}
    assert refs == originals
    # the originals are untouched on disk
    assert torch.equal(load_dicom(src).images, data.images)


def test_tamper_cli_end_to_end_and_report(generator_dir, series, tmp_path):
    root, _, _, centre = series
    out = tmp_path / "t"
    at = ",".join(str(v) for v in centre)
    rc = main(["tamper", "--input", str(root / "lesion"), "--generator", str(generator_dir),
               "--remove", "--at", at, "--out", str(out)])
    assert rc == 0
    rec = json.loads((out / "tamper.json").read_text())
    assert rec["mode"] == "remove" and rec["location"] == list(centre) and rec["cube"] == 16
    assert (out / "report.png").stat().st_size > 1000
    back = load_dicom(out)
    assert back.images.shape == (1, 1, 32, 32, 32)
    assert list(back.meta["datasets"][0].ImageType)[:2] == ["DERIVED", "SECONDARY"]


# --------------------------------------------------------------------------- bad inputs
def _tamper(args: list[str], capsys) -> tuple[int, str]:
    rc = main(["tamper", *args])
    return rc, capsys.readouterr().err


def test_tamper_bad_inputs(generator_dir, series, tmp_path, capsys):
    root, _, _, _ = series
    base = ["--input", str(root / "free"), "--generator", str(generator_dir), "--inject"]
    rc, err = _tamper([*base, "--at", "16,16,40", "--out", str(tmp_path / "a")], capsys)
    assert rc == 2 and "outside the volume" in err and "x=40" in err
    rc, err = _tamper([*base, "--at", "1,1,1", "--out", str(tmp_path / "a")], capsys)
    assert rc == 2 and "air" in err
    rc, err = _tamper([*base, "--at", "16,16", "--out", str(tmp_path / "a")], capsys)
    assert rc == 2 and "three integers" in err
    rc, err = _tamper([*base, "--at", "16,16,16", "--cube", "32", "--out", str(tmp_path / "a")],
                      capsys)
    assert rc == 2 and "16^3" in err
    # --out must not be or lie inside the input, and an existing non-empty folder is refused
    rc, err = _tamper([*base, "--at", "16,16,16", "--out", str(root / "free")], capsys)
    assert rc == 2 and "must not be" in err
    rc, err = _tamper([*base, "--at", "16,16,16", "--out", str(root / "free" / "x")], capsys)
    assert rc == 2 and "must not be" in err
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    rc, err = _tamper([*base, "--at", "16,16,16", "--out", str(keep)], capsys)
    assert rc == 2 and "never overwrites" in err
    assert (keep / "notes.txt").read_text() == "mine" and len(list(keep.iterdir())) == 1
    assert not (tmp_path / "a").exists()


def test_tamper_refuses_a_non_ct_series(generator_dir, series, tmp_path, capsys):
    root, _, _, _ = series
    mr_dir = tmp_path / "mr"
    mr_dir.mkdir()
    for f in sorted((root / "free").glob("*.dcm")):
        ds = pydicom.dcmread(f)
        ds.Modality = "MR"
        ds.save_as(mr_dir / f.name)
    rc, err = _tamper(["--input", str(mr_dir), "--generator", str(generator_dir), "--inject",
                       "--at", "16,16,16", "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and "MR series" in err and "CT" in err


def test_generator_folder_of_the_wrong_kind(generator_dir, series, tmp_path, capsys):
    root, _, _, _ = series
    wrong = tmp_path / "clf"
    wrong.mkdir()
    doc = json.loads((generator_dir / "model.json").read_text())
    clf = copy.deepcopy(doc)
    del clf["kind"]
    clf["task"] = "binary"
    (wrong / "model.json").write_text(json.dumps(clf))
    rc, err = _tamper(["--input", str(root / "free"), "--generator", str(wrong), "--inject",
                       "--at", "16,16,16", "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and "kind 'classifier'; expected kind 'inpainting-generator'" in err
    # an unregistered architecture is refused (files are data, never code)
    bad = tmp_path / "bad"
    bad.mkdir()
    doc["architecture"] = {"name": "os:system", "args": {}}
    (bad / "model.json").write_text(json.dumps(doc))
    with pytest.raises(ModelError, match="unknown inpainting-generator architecture"):
        load_generator(bad)
    assert not Path(tmp_path / "o").exists()


def test_train_cli_inpaint(tmp_path, capsys):
    out = tmp_path / "G"
    rc = main(["train", "--task", "inpaint", "--data", "phantom3d", "--size", "48", "--limit", "4",
               "--epochs", "1", "--out", str(out)])
    assert rc == 0
    gen = load_generator(out)
    assert gen.cube == 32 and gen.hole == 16
    meta = json.loads((out / "model.json").read_text())
    assert meta["kind"] == "inpainting-generator" and meta["architecture"]["name"] == "ctgan-unet3d"
    # the equalizer was fitted on the training cubes (not the placeholder ramp)
    assert float(gen.quantiles[0]) < -900 and float(gen.quantiles[-1]) < 1000
    from medrobust.models.detector import load_detector

    with pytest.raises(ModelError, match="kind 'inpainting-generator'; expected kind 'detector'"):
        load_detector(out)
