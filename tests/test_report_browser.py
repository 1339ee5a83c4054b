"""The HTML report in a real headless browser (Debian's chromium): every image decodes, and the
summary numbers on the page are those of results.json."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import torch

import medrobust as mr

from evaluation_helpers import linear_data, linear_model  # isort: skip


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None


CHROMIUM = _chromium()
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="chromium is not installed (Debian: apt-get install chromium); the report browser "
           "test needs a real headless browser",
)


class _Collect(HTMLParser):
    """Every element's tag and attributes, and the text inside elements that have an id."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, {k: v or "" for k, v in attrs}))

    def find(self, tag: str | None = None, **attrs: str) -> list[dict[str, str]]:
        out = []
        for t, a in self.elements:
            if tag is not None and t != tag:
                continue
            if all((k == "class_" and v in a.get("class", "").split()) or a.get(k) == v
                   for k, v in attrs.items()):
                out.append(a)
        return out


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, Any]]]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("report")
        res = mr.evaluate(linear_model(), linear_data(), ["fgsm", "pgd"],
                          eps="0,1/255,2/255,4/255,8/255", out=out, batch_size=16,
                          progress=False, attack_kwargs={"pgd": {"steps": 10}}, gallery=3)
    finally:
        torch.set_num_threads(n)
    yield out / "report.html", res.results


def _dump_dom(page: Path, profile: Path) -> str:
    assert CHROMIUM is not None
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", f"--user-data-dir={profile}", "--virtual-time-budget=10000",
           "--dump-dom", page.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def _same(value: str, number: float | None) -> bool:
    return (number is None and value == "null") or (
        number is not None and value != "null" and float(value) == float(number))


def test_report_in_headless_chromium(report: tuple[Path, dict[str, Any]], tmp_path: Path
                                     ) -> None:
    page, doc = report
    dom = _Collect()
    dom.feed(_dump_dom(page, tmp_path / "profile"))
    # every image decoded (the page's script counts naturalWidth > 0 after load)
    body = dom.find("body")[0]
    n_img = len(dom.find("img"))
    assert n_img == 2  # the curves and the gallery
    assert body.get("data-images-total") == str(n_img), body
    assert body.get("data-images-loaded") == str(n_img), body
    assert all(img["src"].startswith("data:image/png;base64,") for img in dom.find("img"))
    # the summary numbers are those of results.json
    acc = dom.find(id="summary-clean-accuracy")[0]
    assert _same(acc["data-value"], doc["clean"]["accuracy"]["value"])
    assert _same(dom.find(id="summary-clean-auc")[0]["data-value"], doc["clean"]["auc"]["value"])
    assert dom.find(id="summary-n")[0]["data-value"] == str(doc["clean"]["n"])
    rows = dom.find("tr", class_="summary-row")
    assert [float(r["data-eps"]) for r in rows] == doc["config"]["eps"]
    worst = dom.find("td", class_="worst-case-accuracy")
    assert len(worst) == len(doc["worst_case"])
    for cell, w in zip(worst, doc["worst_case"], strict=True):
        assert _same(cell["data-value"], w["robust_accuracy"]["value"])
    for name, a in doc["attacks"].items():
        cells = dom.find("td", class_="attack-accuracy", **{"data-attack": name})
        assert [float(c["data-value"]) for c in cells] == [
            e["robust_accuracy"]["value"] for e in a["per_eps"]]
    # the sanity checks as reported
    sanity = dom.find(id="sanity")[0]
    assert sanity["data-passed"] == ("true" if doc["sanity"]["passed"] else "false")
    shown = {c["data-check-id"]: c["data-status"] for c in dom.find("li", class_="sanity-check")}
    assert shown == {c["id"]: c["status"] for c in doc["sanity"]["checks"]}
    # the "All numbers" table fits the page (it wraps instead of scrolling sideways)
    assert body.get("data-numbers-overflow") == "false", body
    # the banner says what the checks say: green only when nothing failed or warned
    banner = dom.find(id="sanity-banner")[0]
    want = ("failed" if not doc["sanity"]["passed"] else
            "warnings" if doc["sanity"]["warnings"] else "passed")
    assert banner["data-state"] == want
    # the robust accuracy falls: the numbers compared above are not all equal
    assert len({w["robust_accuracy"]["value"] for w in doc["worst_case"]}) > 2
    assert json.loads(json.dumps(doc)) == doc
