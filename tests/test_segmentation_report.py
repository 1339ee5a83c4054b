"""The segmentation report (``report.html`` of ``medrobust evaluate`` on a segmenter) and the region
of interest of dense evaluations: every number on the page is the one of
segmentation_results.json, the figures are embedded, the budgets are stated in the volume's units
(HU for CT) and the ROI confines the perturbation.

The segmenter is a tiny 3D fully convolutional network trained here in about two seconds on
phantom volumes (as in test_segmentation.py)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import medrobust as mr
from medrobust.data.base import ImageData
from medrobust.data.phantoms import make_phantoms
from medrobust.evaluation.errors import EvaluationError
from medrobust.evaluation.roi import box_mask, parse_roi

from test_report_browser import CHROMIUM, _dump_dom  # isort: skip
from test_segmentation import _fcn, _train  # isort: skip


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Dom(HTMLParser):
    """Every element's tag and attributes (the report's stable hooks)."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str]]] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, {k: v or "" for k, v in attrs}))

    def find(self, tag: str | None = None, **attrs: str) -> list[dict[str, str]]:
        return [a for t, a in self.elements if (tag is None or t == tag) and all(
            (k == "class_" and v in a.get("class", "").split()) or a.get(k) == v
            for k, v in attrs.items())]


def same(value: str, number: float | None) -> bool:
    return (number is None and value == "null") or (
        number is not None and value != "null" and float(value) == float(number))


def _segmenter() -> tuple[mr.Segmenter, ImageData]:
    """The 3D phantom segmenter of test_segmentation.py (its ``seg3d``), 4 held-out volumes."""
    d = make_phantoms(24, 16, dim=3, task="segmentation", seed=1, lesion_fraction=1.0,
                      lesion_contrast=40.0, lesion_radius=(0.15, 0.25), n_organs=0, noise=4.0,
                      texture=4.0)
    mean, std = float(d.images.mean()), float(d.images.std())
    with torch.random.fork_rng():
        torch.manual_seed(1)
        net = _fcn(3, 4)
    net = _train(net, d.images[:20], d.labels[:20], mean, std, epochs=15, seed=1, batch=4)
    model = mr.Segmenter(net, bounds=(0.0, 1.0), mean=mean, std=std, num_classes=2,
                         chunk_size=2)
    data = ImageData(images=d.images[20:], labels=d.labels[20:], bounds=(0.0, 1.0),
                     units="intensity", task="segmentation", class_names=["background", "lesion"])
    return model, data


@pytest.fixture(scope="module")
def seg() -> tuple[mr.Segmenter, ImageData]:
    return _segmenter()


@pytest.fixture(scope="module")
def evaluated(seg: tuple[mr.Segmenter, ImageData], tmp_path_factory: pytest.TempPathFactory
              ) -> tuple[Path, dict[str, Any]]:
    from medrobust.evaluation.segmentation import evaluate_segmentation

    model, data = seg
    out = tmp_path_factory.mktemp("segreport")
    kw = {"pgd": {"steps": 3}, "cospgd": {"steps": 3}, "dag": {"max_iter": 3}}
    evaluate_segmentation(model, data, "pgd,cospgd,dag", eps="0,4/255,16/255", out=out,
                          batch_size=2, attack_kwargs=kw, roi="box:2")
    return out, json.loads((out / "segmentation_results.json").read_text())


# ------------------------------------------------------------------------------ the report
def test_report_numbers_are_those_of_the_results(evaluated: tuple[Path, dict[str, Any]]) -> None:
    out, doc = evaluated
    text = (out / "report.html").read_text(encoding="utf-8")
    dom = Dom(text)
    assert dom.find("body")[0]["data-kind"] == "segmentation"
    # self-contained: both figures embedded, nothing fetched from elsewhere
    imgs = dom.find("img")
    assert {i["id"] for i in imgs} == {"figure-dice-vs-eps", "figure-overlays"}
    assert all(i["src"].startswith("data:image/png;base64,") for i in imgs)
    assert "http://" not in text and "https://" not in text
    # clean Dice and HD95 per foreground class
    row = dom.find("tr", class_="clean-row", **{"data-class": "lesion"})
    assert len(row) == 1
    assert same(dom.find("td", class_="clean-dice")[0]["data-value"],
                doc["clean"]["lesion"]["dice"]["mean"])
    assert same(dom.find("td", class_="clean-hd95")[0]["data-value"],
                doc["clean"]["lesion"]["hd95"]["mean"])
    # Dice under each attack and eps, then the worst case, in the order of the results
    cells = dom.find("td", class_="dice", **{"data-class": "lesion"})
    want = [e["dice"]["lesion"]["mean"] for a in doc["attacks"].values() for e in a["per_eps"]]
    want += [w["dice"]["lesion"]["mean"] for w in doc["worst_case"]]
    assert len(cells) == len(want) == 3 * 3 + 3
    assert all(same(c["data-value"], v) for c, v in zip(cells, want, strict=True))
    rows = dom.find("tr", class_="dice-row", **{"data-attack": "worst-case"})
    assert [float(r["data-eps"]) for r in rows] == [e["value"] for e in doc["eps"]]
    # per case: clean and worst at the largest budget, the largest drop from clean first
    worst = doc["per_case"]["worst_dice"][doc["worst_case"][-1]["eps"]]
    clean = doc["per_case"]["clean_dice"]
    shown = dom.find("tr", class_="case-row")
    assert len(shown) == doc["n"]
    cases = [int(r["data-case"]) for r in shown]
    drops = [clean[i][1] - worst[i][1] for i in cases]
    assert drops == sorted(drops, reverse=True) and drops[0] > 0
    for c, cell in zip(cases, dom.find("td", class_="case-worst"), strict=True):
        assert same(cell["data-value"], worst[c][1])
    # budgets and region as evaluated
    assert dom.find(id="seg-budgets")[0]["data-units"] == "intensity"
    assert "4/255 (0.01569 of [0, 1])" in text
    assert dom.find(id="seg-roi")[0]["data-kind"] == "box" == doc["roi"]["kind"]
    assert doc["roi"]["margin"] == 2 and 0 < doc["roi"]["fraction"] < 1
    # the overlay was made on the case hurt most, on the three planes of a volume
    assert doc["figures"]["overlay_planes"] == "axial,coronal,sagittal"
    assert doc["figures"]["overlay_case"] == str(cases[0])


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install "
                    "chromium); the report browser test needs a real headless browser")
def test_report_in_headless_chromium(evaluated: tuple[Path, dict[str, Any]], tmp_path: Path
                                     ) -> None:
    out, doc = evaluated
    dom = Dom(_dump_dom(out / "report.html", tmp_path / "profile"))
    body = dom.find("body")[0]
    assert body.get("data-images-total") == "2" and body.get("data-images-loaded") == "2", body
    assert same(dom.find("td", class_="clean-dice")[0]["data-value"],
                doc["clean"]["lesion"]["dice"]["mean"])


def test_report_states_hounsfield_budgets(evaluated: tuple[Path, dict[str, Any]]) -> None:
    from medrobust.evaluation.report_segmentation import render_segmentation_report

    _, doc = evaluated
    ct = json.loads(json.dumps(doc))
    ct["budget_units"], ct["bounds"] = "HU", [-1024.0, 3071.0]
    ct["eps"] = [{"label": "0", "value": 0.0}, {"label": "4", "value": 4.0},
                 {"label": "16", "value": 16.0}]
    for a in ct["attacks"].values():
        for e, b in zip(a["per_eps"], ct["eps"], strict=True):
            e["eps"], e["value"] = b["label"], b["value"]
    text = render_segmentation_report(ct, {})
    dom = Dom(text)
    assert dom.find(id="seg-budgets")[0]["data-units"] == "HU"
    assert "Hounsfield units" in text and "[-1024, 3071]" in text
    assert "Budgets:\n0 HU, 4 HU, 16 HU." in text
    assert not dom.find("img")  # no figures given, none shown


def test_a_report_medrobust_did_not_write_is_kept(evaluated: tuple[Path, dict[str, Any]],
                                                  tmp_path: Path) -> None:
    from medrobust.evaluation.report_segmentation import write_segmentation_report

    _, doc = evaluated
    mine = tmp_path / "report.html"
    mine.write_text("<html>my notes</html>")
    with pytest.raises(EvaluationError, match="not replaced"):
        write_segmentation_report(doc, mine)
    assert mine.read_text() == "<html>my notes</html>"


def test_a_results_file_medrobust_did_not_write_is_kept(seg: tuple[mr.Segmenter, ImageData],
                                                        tmp_path: Path) -> None:
    from medrobust.evaluation.segmentation import evaluate_segmentation

    model, data = seg
    mine = tmp_path / "segmentation_results.json"
    mine.write_text('{"my": "notes"}')
    with pytest.raises(EvaluationError, match="not replaced"):
        evaluate_segmentation(model, data, "fgsm", eps="4/255", out=tmp_path, batch_size=2)
    assert mine.read_text() == '{"my": "notes"}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["segmentation_results.json"]


# ------------------------------------------------------------------------------ the ROI
def test_the_case_hurt_most_is_the_largest_drop() -> None:
    from medrobust.evaluation.segmentation import hurt_most

    nan = float("nan")
    # case 0 was never segmented (no drop possible); case 2 drops most; case 3 has no structure
    assert hurt_most(np.array([0.0, 0.9, 0.8, nan]), np.array([0.0, 0.7, 0.2, nan])) == 2
    # a tie in the drop goes to the lower worst Dice
    assert hurt_most(np.array([0.75, 0.5]), np.array([0.5, 0.25])) == 1
    assert hurt_most(np.array([nan]), np.array([nan])) is None


def test_box_roi_closed_form_and_errors() -> None:
    labels = torch.zeros(2, 8, 10, 12, dtype=torch.int64)
    labels[0, 3:5, 4:6, 5:7] = 2
    m = box_mask(labels, 1)
    want = torch.zeros_like(m)
    want[0, 2:6, 3:7, 4:8] = True
    want[1] = True  # no foreground: the whole volume
    assert torch.equal(m, want)
    assert box_mask(labels, 100)[0].all()  # clipped to the volume
    images = torch.zeros(2, 1, 8, 10, 12)
    assert parse_roi("box", images).margin == 4 and parse_roi(" box:7 ", images).margin == 7
    assert parse_roi(None, images).mask(images, labels) is None
    shared = parse_roi(torch.ones(8, 10, 12), images)
    assert shared.mask(images, labels).shape == (1, 1, 8, 10, 12)
    with pytest.raises(EvaluationError, match="unknown roi 'lesion'"):
        parse_roi("lesion", images)
    with pytest.raises(EvaluationError, match=r"roi mask has shape \(8, 10\)"):
        parse_roi(torch.ones(8, 10), images)
    with pytest.raises(EvaluationError, match="empty"):
        parse_roi(torch.zeros(8, 10, 12), images)
    with pytest.raises(EvaluationError, match="NaN"):
        parse_roi(torch.full((8, 10, 12), float("nan")), images)


def test_the_roi_confines_every_attack(seg: tuple[mr.Segmenter, ImageData]) -> None:
    """A unit of the segmentation family perturbs only inside the case's box."""
    from medrobust.evaluation.budgets import Budget
    from medrobust.evaluation.families.base import UnitJob
    from medrobust.evaluation.segmentation import SegmentationFamily, _specs

    model, data = seg
    x, y = data.images[:2], data.labels[:2]
    region = parse_roi("box:1", data.images)
    inside = box_mask(y, 1).unsqueeze(1)
    assert not inside.all()
    for spec in _specs("pgd,cospgd,dag", "linf", {"dag": {"max_iter": 3}}, 3, None):
        spec.segmentation_roi = region  # type: ignore[attr-defined]
        with model.attack_mode():
            clean = model.logits(x).float()
        job = UnitJob(clf=model, x=x, y=y, idx=torch.arange(2),  # type: ignore[arg-type]
                      budget=Budget(16 / 255, "16/255"), norm="linf", seed=0, span=1.0,
                      large=False, clean_logits=clean, num_classes=2)
        out = SegmentationFamily().run(spec, job)
        assert out.adversarial is not None
        delta = out.adversarial - x
        assert float(delta[~inside].abs().max()) == 0.0, spec.name
        assert float(delta[inside].abs().max()) > 0.0, spec.name
        assert float(delta.abs().max()) <= 16 / 255 + 1e-6


# ------------------------------------------------------------------------------ the CLI
def test_cli_evaluate_writes_the_report_in_hounsfield_units(tmp_path: Path, capsys) -> None:
    from medrobust.cli import main
    from medrobust.modelstore import save_model
    from medrobust.nets import build_network
    from medrobust.preprocessing import IntensityWindow
    from medrobust.training import seeded

    with seeded(0):
        net = build_network("unet", in_channels=1, num_classes=2, spatial_dims=2,
                            channels=[4, 8], num_res_units=0)
    save_model(tmp_path / "unet", net.eval(), bounds=(-1024.0, 3071.0), units="HU",
               class_names=["background", "lesion"],
               preprocess=IntensityWindow(40.0, 400.0))
    out = tmp_path / "eval"
    rc = main(["evaluate", "--model", str(tmp_path / "unet"), "--data", "phantom-ct-seg-32",
               "--limit", "2", "--attacks", "pgd,dag", "--eps", "0,4", "--steps", "1",
               "--roi", "box:3", "--out", str(out), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    assert f"report: {out / 'report.html'}" in text
    doc = json.loads((out / "segmentation_results.json").read_text())
    assert doc["budget_units"] == "HU" and doc["bounds"] == [-1024.0, 3071.0]
    assert doc["roi"]["kind"] == "box" and doc["roi"]["margin"] == 3
    page = (out / "report.html").read_text()
    dom = Dom(page)
    assert dom.find(id="seg-budgets")[0]["data-units"] == "HU"
    assert "4 HU" in page and dom.find(id="seg-roi")[0]["data-kind"] == "box"
    # --roi is for dense models; a typo is one clear line
    rc = main(["evaluate", "--model", str(tmp_path / "unet"), "--data", "phantom-ct-seg-32",
               "--limit", "2", "--attacks", "pgd", "--eps", "0,4", "--roi", "lesion",
               "--out", str(tmp_path / "e2"), "--quiet"])
    assert rc == 2 and "unknown roi 'lesion'" in capsys.readouterr().err
    with seeded(0):
        cnn = build_network("smallcnn", in_channels=1, num_classes=2, width=2)
    save_model(tmp_path / "cnn", cnn.eval(), bounds=(0.0, 1.0), class_names=["a", "b"],
               task="binary")
    rc = main(["evaluate", "--model", str(tmp_path / "cnn"), "--data", "phantom", "--limit", "4",
               "--attacks", "fgsm", "--eps", "0,1/255", "--roi", "box", "--out",
               str(tmp_path / "e3"), "--quiet"])
    assert rc == 2 and "--roi applies to segmenters and detectors" in capsys.readouterr().err
    assert not (tmp_path / "e3").exists()
