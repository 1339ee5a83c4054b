"""``medrobust evaluate`` on a detector: FROC points (sensitivity at fixed false positives per
volume) with bootstrap intervals over volumes, clean and under DAG and PGD on detection, in
results.json and report.html.

The detector is MONAI's RetinaNet trained here in a few seconds on 32-px CT phantoms with
lesions (:mod:`medrobust.detection_training`), saved as the folder ``medrobust train --task
detection`` writes."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from medrobust.boxes import sensitivity_at_fp
from medrobust.detection_training import detection_phantoms, train_detector
from medrobust.evaluation.froc import at_threshold, froc
from medrobust.models.detector import load_detector, save_detector

from test_report_browser import CHROMIUM, _dump_dom  # isort: skip
from test_segmentation_report import Dom, same  # isort: skip

EPS = [0.0, 40.0]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def det_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    tr, trb = detection_phantoms(96, 32, dim=2, seed=0, split="train")
    res = train_detector(tr.images, trb, epochs=3, batch_size=16, lr=3e-3, seed=0)
    out = tmp_path_factory.mktemp("det") / "det"
    save_detector(out, res.detector, arch_args=res.arch_args, class_names=["lesion"],
                  data={"name": "phantom", "size": 32}, training={"seed": 0})
    return out


@pytest.fixture(scope="module")
def evaluated(det_dir: Path, tmp_path_factory: pytest.TempPathFactory
              ) -> tuple[Path, dict[str, Any], str]:
    from medrobust.cli import main

    out = tmp_path_factory.mktemp("deteval")
    torch.set_num_threads(1)
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["evaluate", "--model", str(det_dir), "--data", "phantom", "--limit", "12",
                   "--attacks", "dag-detection,pgd-detection", "--eps", "0,40", "--steps", "5",
                   "--out", str(out), "--quiet"])
    assert rc == 0
    return out, json.loads((out / "results.json").read_text()), buf.getvalue()


def _toy() -> tuple[list[dict[str, torch.Tensor]], list[dict[str, torch.Tensor]]]:
    truth = [{"boxes": torch.tensor([[0.0, 0.0, 4.0, 4.0]]), "labels": torch.tensor([0])},
             {"boxes": torch.tensor([[10.0, 10.0, 14.0, 14.0]]), "labels": torch.tensor([0])},
             {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}]
    dets = [
        {"boxes": torch.tensor([[0.0, 0.0, 4.0, 4.0], [20.0, 20.0, 24.0, 24.0]]),
         "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([0, 0])},
        {"boxes": torch.tensor([[30.0, 30.0, 34.0, 34.0], [10.0, 10.0, 14.0, 14.0]]),
         "scores": torch.tensor([0.7, 0.3]), "labels": torch.tensor([0, 0])},
        {"boxes": torch.tensor([[1.0, 1.0, 3.0, 3.0]]), "scores": torch.tensor([0.7]),
         "labels": torch.tensor([0])},
    ]
    return dets, truth


# ------------------------------------------------------------------------------ FROC
def test_froc_closed_form_and_the_boxes_oracle() -> None:
    dets, truth = _toy()
    # ranked: TP .9, FP .8, FP .7 + FP .7 (a tie: kept together), TP .3; 3 volumes
    f = froc(dets, truth, (0.25, 0.5, 1.0, 2.0), n_boot=200, seed=0)
    got = [p["sensitivity"] for p in f["points"]]
    assert got == [0.5, 0.5, 1.0, 1.0]
    # the tie at 0.7 brings 3 FP (1 FP/volume) in at once: at 1/2 FP/volume only 0.8 is kept
    assert f["points"][1]["threshold"] == pytest.approx(0.8)
    assert f["cpm"]["value"] == pytest.approx(0.75)
    for p in f["points"]:
        lo, hi = p["ci95"]
        assert 0.0 <= lo <= p["sensitivity"] <= hi <= 1.0
    for r, p in zip((0.25, 0.5, 1.0, 2.0), f["points"], strict=True):
        ref = sensitivity_at_fp(dets, truth, r)
        assert p["sensitivity"] == ref["sensitivity"]
        assert p["threshold"] == pytest.approx(ref["threshold"])
    # a fixed operating point: the detections at >= 0.7 find one lesion of two with 3 FPs
    fixed = at_threshold(dets, truth, 0.7, n_boot=200)
    assert fixed["sensitivity"] == 0.5 and fixed["fp_per_volume"] == pytest.approx(1.0)
    assert at_threshold(dets, truth, None, n_boot=0)["sensitivity"] == 0.0
    with pytest.raises(ValueError, match="3 volumes"):
        froc(dets[:2], truth)


def test_froc_equals_the_reference_on_a_trained_detector(det_dir: Path) -> None:
    det = load_detector(det_dir)
    te, teb = detection_phantoms(12, 32, dim=2, seed=0, split="test")
    dets = det.detect(te.images)
    rates = (0.125, 0.5, 1.0, 4.0)
    f = froc(dets, teb, rates, n_boot=100)
    for r, p in zip(rates, f["points"], strict=True):
        assert p["sensitivity"] == sensitivity_at_fp(dets, teb, r)["sensitivity"]
    s = [p["sensitivity"] for p in f["points"]]
    assert s == sorted(s)  # more false positives allowed, never fewer lesions found
    assert s[-1] >= 0.7  # the detector works


# ------------------------------------------------------------------------------ evaluate
def test_cli_evaluate_on_a_detector(det_dir: Path, evaluated: tuple[Path, dict[str, Any], str]
                                    ) -> None:
    out, doc, text = evaluated
    assert doc["kind"] == "detection" and doc["n"] == 12 and doc["budget_units"] == "HU"
    assert [e["value"] for e in doc["eps"]] == EPS
    assert doc["fp_rates"] == [0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0] and doc["fp_rate"] == 1.0
    # the clean numbers are those of an independent pass of the detector on the same volumes
    det = load_detector(det_dir)
    data, boxes = detection_phantoms(12, 32, dim=2, seed=0, split="test")
    ref = sensitivity_at_fp(det.detect(data.images), boxes, 1.0)
    clean = doc["clean"]["at_fp_rate"]
    assert clean["sensitivity"] == ref["sensitivity"] >= 0.7
    assert clean["threshold"] == pytest.approx(ref["threshold"])
    assert doc["lesions"] == int(sum(len(b["boxes"]) for b in boxes))
    for name in ("dagdetection", "pgddetection"):
        per = doc["attacks"][name]["per_eps"]
        assert per[0]["froc"] == doc["clean"]["froc"]  # eps 0 is the clean detector
        assert per[-1]["linf_max"] <= 40.0 + 1e-3
        for e in per:
            lo, hi = e["at_fp_rate"]["ci95"]
            assert lo <= e["at_fp_rate"]["sensitivity"] <= hi
    # PGD at 40 HU hides lesions: the sensitivity falls, at the re-tuned and at the fixed
    # operating point, and the strongest attack is at least as strong as each
    pgd = doc["attacks"]["pgddetection"]["per_eps"][-1]
    assert pgd["at_fp_rate"]["sensitivity"] < clean["sensitivity"]
    assert pgd["at_clean_threshold"]["sensitivity"] < doc["clean"]["at_clean_threshold"][
        "sensitivity"]
    assert 0.0 <= pgd["vanished"] <= 1.0
    strongest = doc["strongest"][-1]["at_fp_rate"]["sensitivity"]
    assert strongest <= min(a["per_eps"][-1]["at_fp_rate"]["sensitivity"]
                            for a in doc["attacks"].values())
    assert "strongest attack" in text and f"report: {out / 'report.html'}" in text


def test_detection_report_numbers_are_those_of_the_results(
        evaluated: tuple[Path, dict[str, Any], str]) -> None:
    out, doc, _ = evaluated
    page = (out / "report.html").read_text(encoding="utf-8")
    dom = Dom(page)
    assert dom.find("body")[0]["data-kind"] == "detection"
    imgs = dom.find("img")
    assert {i["id"] for i in imgs} == {"figure-froc", "figure-sensitivity-vs-eps"}
    assert all(i["src"].startswith("data:image/png;base64,") for i in imgs)
    assert "http://" not in page and "https://" not in page
    assert same(dom.find(id="det-clean-sensitivity")[0]["data-value"],
                doc["clean"]["at_fp_rate"]["sensitivity"])
    assert same(dom.find(id="det-clean-cpm")[0]["data-value"], doc["clean"]["cpm"]["value"])
    assert dom.find(id="det-budgets")[0]["data-units"] == "HU" and "40 HU" in page
    for name in doc["attacks"]:
        rows = dom.find("tr", class_="det-row", **{"data-attack": name})
        assert [float(r["data-eps"]) for r in rows] == EPS
    cells = dom.find("td", class_="sensitivity")
    want = [doc["clean"]["at_fp_rate"]["sensitivity"]]
    want += [e["at_fp_rate"]["sensitivity"] for a in doc["attacks"].values() for e in a["per_eps"]]
    want += [s["at_fp_rate"]["sensitivity"] for s in doc["strongest"]]
    assert len(cells) == len(want)
    assert all(same(c["data-value"], v) for c, v in zip(cells, want, strict=True))
    froc_cells = dom.find("td", class_="froc", **{"data-fp": "0.125"})
    assert same(froc_cells[0]["data-value"], doc["clean"]["froc"][0]["sensitivity"])
    assert len(dom.find("td", class_="froc")) == 7 * (1 + 2 * len(EPS))


def test_rerun_reuses_every_unit_and_errors_are_clear(
        det_dir: Path, evaluated: tuple[Path, dict[str, Any], str], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    from medrobust.cli import main
    from medrobust.data.base import ImageData
    from medrobust.evaluation.detection import evaluate_detection
    from medrobust.evaluation.errors import EvaluationError

    first, doc, _ = evaluated
    out = tmp_path / "rerun"  # a copy: the other tests read the first run's files
    shutil.copytree(first, out)
    data, boxes = detection_phantoms(12, 32, dim=2, seed=0, split="test")
    again = evaluate_detection(str(det_dir), data, "dag-detection,pgd-detection", eps="0,40",
                               out=out, boxes=boxes, steps=5, figures=False, units="HU")
    assert again["units"]["computed"] == 0 and again["units"]["reused"] > 0
    assert again["attacks"] == json.loads(json.dumps(doc["attacks"]))
    with pytest.raises(EvaluationError, match="cannot attack a detector"):
        evaluate_detection(str(det_dir), data, "pgd", boxes=boxes)
    labels = ImageData(images=data.images, labels=torch.zeros(12, dtype=torch.long),
                       bounds=(-1024.0, 3071.0), units="HU", task="binary",
                       class_names=["no lesion", "lesion"])
    with pytest.raises(EvaluationError, match="lesion masks"):
        evaluate_detection(str(det_dir), labels, "pgd-detection")
    with pytest.raises(EvaluationError, match="fp_rate"):
        evaluate_detection(str(det_dir), data, "pgd-detection", boxes=boxes, fp_rate=0)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "results.json").write_text('{"kind": "classifier"}')
    with pytest.raises(EvaluationError, match="not replaced"):
        evaluate_detection(str(det_dir), data, "pgd-detection", eps="0", boxes=boxes,
                           out=theirs)
    assert (theirs / "results.json").read_text() == '{"kind": "classifier"}'
    rc = main(["evaluate", "--model", str(det_dir), "--data", "phantom-ct-32", "--limit", "4",
               "--out", str(tmp_path / "x"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "lesion boxes" in err and len(err.strip().splitlines()) == 1
    rc = main(["evaluate", "--model", str(det_dir), "--data", "phantom3d", "--limit", "4",
               "--out", str(tmp_path / "x"), "--quiet"])
    assert rc == 2 and "is 3D but the detector is 2D" in capsys.readouterr().err


def test_box_roi_confines_the_detection_attacks(det_dir: Path) -> None:
    from medrobust.boxes import pack_boxes
    from medrobust.evaluation.budgets import Budget
    from medrobust.evaluation.detection import DetectionFamily, _box_roi, _specs
    from medrobust.evaluation.families.base import UnitJob
    from medrobust.evaluation.roi import parse_roi

    det = load_detector(det_dir)
    data, boxes = detection_phantoms(6, 32, dim=2, seed=0, split="test")
    y = pack_boxes(boxes, 2)
    x = data.images
    region = parse_roi("box:2", x)
    inside = _box_roi(y, x, 2) != 0
    positive = np.array([len(b["boxes"]) > 0 for b in boxes])
    assert positive.any() and not positive.all()
    with det.attack_mode():
        clean = det.logits(x).float()
    for spec in _specs("dag-detection,pgd-detection", "linf", None, 2):
        spec.detection_roi = region  # type: ignore[attr-defined]
        job = UnitJob(clf=det, x=x, y=y, idx=torch.arange(6),  # type: ignore[arg-type]
                      budget=Budget(40.0, "40"), norm="linf", seed=0, span=4095.0,
                      large=False, clean_logits=clean, num_classes=1)
        res = DetectionFamily().run(spec, job)
        assert res.adversarial is not None
        delta = res.adversarial - x
        assert float(delta[~inside].abs().max()) == 0.0, spec.name
        assert float(delta.abs().max()) <= 40.0 + 1e-3
        # volumes without lesions are not attacked
        assert float(delta[torch.from_numpy(~positive)].abs().max()) == 0.0
        assert res.record["attacked"].tolist() == positive.tolist()


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install "
                    "chromium); the report browser test needs a real headless browser")
def test_detection_report_in_headless_chromium(evaluated: tuple[Path, dict[str, Any], str],
                                               tmp_path: Path) -> None:
    out, doc, _ = evaluated
    dom = Dom(_dump_dom(out / "report.html", tmp_path / "profile"))
    body = dom.find("body")[0]
    assert body.get("data-images-total") == "2" and body.get("data-images-loaded") == "2", body
    assert same(dom.find(id="det-clean-sensitivity")[0]["data-value"],
                doc["clean"]["at_fp_rate"]["sensitivity"])


def test_evaluate_detection_on_volumes() -> None:
    """3D: an untrained RetinaNet with a low score threshold detects everywhere; the evaluation
    keeps medrobust's (D, H, W) box order, eps 0 equals the clean pass, the budget holds."""
    import medrobust as mr
    from medrobust.data.base import ImageData
    from medrobust.evaluation.detection import evaluate_detection
    from medrobust.models.detector import build_retinanet

    with torch.random.fork_rng():
        torch.manual_seed(1)
        det = mr.Detector(build_retinanet(spatial_dims=3), bounds=(-1024.0, 3071.0),
                          score_thresh=0.005, max_detections=20)
        x = torch.full((3, 1, 16, 16, 16), 40.0) + 10 * torch.randn(3, 1, 16, 16, 16)
    masks = torch.zeros(3, 16, 16, 16, dtype=torch.long)
    masks[0, 4:10, 5:9, 6:12] = 1
    masks[1, 8:14, 2:6, 3:7] = 1
    data = ImageData(images=x, labels=masks, bounds=(-1024.0, 3071.0), units="HU",
                     task="segmentation", class_names=["background", "lesion"])
    doc = evaluate_detection(det, data, "pgd-detection", eps="0,20", steps=1, n_boot=50)
    assert doc["spatial_dims"] == 3 and doc["positives"] == 2 and doc["lesions"] == 2
    per = doc["attacks"]["pgddetection"]["per_eps"]
    assert per[0]["froc"] == doc["clean"]["froc"]
    assert 0 < per[1]["linf_max"] <= 20.0 + 1e-3
    # the boxes are the masks' in (D, H, W) order: the clean FROC against them equals the
    # reference matching of the detector's own detections
    dets = det.detect(x)
    boxes = [{"boxes": torch.tensor([[4.0, 5.0, 6.0, 10.0, 9.0, 12.0]]),
              "labels": torch.tensor([0])},
             {"boxes": torch.tensor([[8.0, 2.0, 3.0, 14.0, 6.0, 7.0]]),
              "labels": torch.tensor([0])},
             {"boxes": torch.zeros(0, 6), "labels": torch.zeros(0, dtype=torch.long)}]
    for p in doc["clean"]["froc"]:
        assert p["sensitivity"] == sensitivity_at_fp(dets, boxes, p["fp_per_volume"])[
            "sensitivity"]
    # found at 8 FP/volume clean, hidden by one PGD step of 20 HU
    assert doc["clean"]["froc"][-1]["sensitivity"] > per[1]["froc"][-1]["sensitivity"]
