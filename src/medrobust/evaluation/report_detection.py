"""The HTML report of a detector's evaluation (``report.html`` beside ``results.json`` of
:func:`medrobust.evaluation.detection.evaluate_detection`): one self-contained page, figures
embedded as base64 PNG, text escaped, the style and image check of the classifier report.

Stable hooks for tests and tools (``data-value`` holds the exact JSON number, ``null`` for none):

* ``body[data-kind="detection"]`` with ``data-images-loaded`` / ``data-images-total``;
* ``#det-budgets[data-units][data-norm]``, ``#det-roi[data-kind]``;
* ``#det-clean-sensitivity[data-value][data-fp-rate]`` and ``#det-clean-cpm[data-value]``;
* ``#det-table tr.det-row[data-attack][data-eps]`` (``data-attack`` ``clean`` or ``strongest``
  besides the attacks' names) with ``td.sensitivity[data-value]``, ``td.cpm[data-value]`` and
  ``td.vanished[data-value]``;
* ``#det-froc tr.froc-row[data-attack][data-eps]`` with ``td.froc[data-fp][data-value]``;
* ``#figure-froc`` and ``#figure-sensitivity-vs-eps``.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

from medrobust.evaluation.errors import EvaluationError
from medrobust.evaluation.report import _CSS, _SCRIPT, _e, _img, _num
from medrobust.evaluation.report_segmentation import budget_note, eps_text

__all__ = ["render_detection_report", "write_detection_report"]

_WRAP = (
    "#det-table,#det-froc{table-layout:auto;font-size:.85em}"
    "#det-table th,#det-table td,#det-froc th,#det-froc td"
    "{white-space:normal;overflow-wrap:anywhere;padding:3px 5px}"
    "#det-table .ci,#det-froc .ci{display:block}"
)
"""Wrapping cells: the wide tables fit the page instead of scrolling sideways."""


def _fmt(v: Any, fmt: str = "{:.3f}") -> str:
    return "n/a" if v is None else fmt.format(float(v))


def _sens_cell(p: dict[str, Any], cls: str, attrs: str = "") -> str:
    lo, hi = (p.get("ci95") or [None, None])[:2]
    ci = "" if lo is None else f' <span class="ci">[{_fmt(lo)}, {_fmt(hi)}]</span>'
    return (f'<td class="{cls}"{attrs} data-value="{_num(p.get("sensitivity"))}">'
            f'{_fmt(p.get("sensitivity"))}{ci}</td>')


def _cpm_cell(c: dict[str, Any]) -> str:
    lo, hi = (c.get("ci95") or [None, None])[:2]
    ci = "" if lo is None else f' <span class="ci">[{_fmt(lo)}, {_fmt(hi)}]</span>'
    return f'<td class="cpm" data-value="{_num(c.get("value"))}">{_fmt(c.get("value"))}{ci}</td>'


def _fixed_cells(block: dict[str, Any]) -> str:
    f = block.get("at_clean_threshold") or {}
    return (_sens_cell(f, "fixed-sensitivity")
            + f'<td class="fixed-fp" data-value="{_num(f.get("fp_per_volume"))}">'
            f'{_fmt(f.get("fp_per_volume"), "{:.2f}")}</td>')


def _table(doc: dict[str, Any]) -> str:
    units, bounds = doc.get("budget_units"), doc.get("bounds")
    rows = ['<tr class="det-row" data-attack="clean" data-eps="0"><td>clean</td><td></td>'
            + _sens_cell(doc["clean"]["at_fp_rate"], "sensitivity") + _cpm_cell(doc["clean"]["cpm"])
            + _fixed_cells(doc["clean"]) + "<td></td><td></td></tr>"]
    for name, a in doc["attacks"].items():
        for e in a["per_eps"]:
            rows.append(
                f'<tr class="det-row" data-attack="{_e(name)}" data-eps="{_num(e["value"])}">'
                f'<td>{_e(name)}</td><td>{_e(eps_text(e["eps"], e["value"], units, bounds))}</td>'
                + _sens_cell(e["at_fp_rate"], "sensitivity") + _cpm_cell(e["cpm"])
                + _fixed_cells(e) + f'<td class="vanished" data-value="{_num(e.get("vanished"))}">'
                f'{_fmt(e.get("vanished"), "{:.1%}")}</td>'
                f'<td>{_fmt(e.get("linf_max"), "{:.4g}")}</td></tr>')
    for s in doc["strongest"]:
        rows.append(
            f'<tr class="det-row worst" data-attack="strongest" data-eps="{_num(s["value"])}">'
            f'<td><strong>strongest attack</strong> ({_e(s["attack"])})</td>'
            f'<td>{_e(eps_text(s["eps"], s["value"], units, bounds))}</td>'
            + _sens_cell(s["at_fp_rate"], "sensitivity") + _cpm_cell(s["cpm"])
            + "<td></td><td></td><td></td><td></td></tr>")
    rate = f"{doc['fp_rate']:g}"
    return f"""<section class="card" id="det-table-card"><h2 style="margin-top:0">Sensitivity at
{_e(rate)} false positive(s) per volume</h2>
<div class="scroll"><table id="det-table"><thead><tr><th>attack</th><th>eps</th>
<th>sensitivity (95% CI)</th><th>CPM (95% CI)</th><th>sensitivity at the clean threshold
</th><th>FP/volume at the clean threshold</th><th>volumes with every lesion hidden</th>
<th>max L&infin;</th></tr></thead><tbody>{''.join(rows)}</tbody></table></div>
<p class="meta">Sensitivity: the share of lesions found (a detection with IoU &ge;
{_e(doc['iou_thresh'])}) at the score threshold where the detector makes {_e(rate)} false
positive(s) per volume, the threshold chosen on the data under attack (an attacked detector
re-tuned to the same false-positive rate: the kinder reading for the detector); at the clean
threshold: the detector as deployed, its threshold fixed where it made {_e(rate)} FP/volume on the
clean volumes, and the false positives per volume it then makes. CPM: the mean
sensitivity over the FROC points {_e(', '.join(f'{r:g}' for r in doc['fp_rates']))} (LUNA16).
Intervals: 95% percentile bootstrap over volumes ({doc['n_boot']} resamplings). Volumes with every
lesion hidden: among the {doc['positives']} volumes with lesions, those where no detection above
the detector's own score threshold ({_e(doc['selection']['score_thresh'])}) still finds one.
The strongest attack is the one with the lowest sensitivity at that budget.</p></section>"""


def _froc_table(doc: dict[str, Any]) -> str:
    units, bounds = doc.get("budget_units"), doc.get("bounds")
    rates = doc["fp_rates"]
    head = "".join(f"<th>{r:g}</th>" for r in rates)

    def row(name: str, label: str, eps: Any, block: dict[str, Any]) -> str:
        by = {p["fp_per_volume"]: p for p in block["froc"]}
        cells = "".join(_sens_cell(by[r], "froc", f' data-fp="{_num(float(r))}"') for r in rates)
        return (f'<tr class="froc-row" data-attack="{_e(name)}" data-eps="{_num(eps)}">'
                f"<td>{_e(label)}</td>{cells}</tr>")

    rows = [row("clean", "clean", 0, doc["clean"])]
    for name, a in doc["attacks"].items():
        for e in a["per_eps"]:
            rows.append(row(name, f"{name}, eps {eps_text(e['eps'], e['value'], units, bounds)}",
                            e["value"], e))
    return f"""<section class="card" id="det-froc-card"><h2 style="margin-top:0">FROC: sensitivity
at each false-positive rate</h2>
<div class="scroll"><table id="det-froc"><thead><tr><th>false positives per volume</th>{head}
</tr></thead><tbody>{''.join(rows)}</tbody></table></div></section>"""


def _config(doc: dict[str, Any]) -> str:
    attacks = "; ".join(
        f"{n} (" + ", ".join(f"{k}={v}" for k, v in (b["config"].get("config") or {}).items()
                             if k != "name") + ")"
        for n, b in doc["attacks"].items())
    runs = doc.get("units") or {}
    sel = doc.get("selection") or {}
    rows = [
        ("model", doc.get("model")),
        ("volumes, with lesions, lesions", f"{doc['n']}, {doc['positives']}, {doc['lesions']}"),
        ("spatial dimensions", doc.get("spatial_dims")),
        ("norm, units, bounds", f"{doc['norm']}, {doc.get('budget_units')}, {doc.get('bounds')}"),
        ("region of interest", (doc.get("roi") or {}).get("text", "whole volume")),
        ("box selection", ", ".join(f"{k}={v}" for k, v in sel.items())),
        ("attacks", attacks),
        ("seed", doc.get("seed")),
        ("units of work", f"{runs.get('computed', 0)} computed, {runs.get('reused', 0)} reused"),
    ]
    body = "".join(f"<tr><td>{_e(k)}</td><td style='text-align:left;white-space:normal'>"
                   f"{_e(v)}</td></tr>" for k, v in rows)
    return (f'<section class="card" id="det-config"><h2 style="margin-top:0">Configuration</h2>'
            f"<table>{body}</table></section>")


def render_detection_report(doc: dict[str, Any], figures: dict[str, bytes]) -> str:
    """The HTML text of a detector evaluation's report (``doc``: the content of its
    ``results.json``; ``figures``: PNG bytes by name, ``froc.png`` and
    ``sensitivity_vs_eps.png``, each optional)."""
    units, bounds, norm = doc.get("budget_units"), doc.get("bounds"), doc["norm"]
    roi = doc.get("roi") or {"kind": "none", "text": "whole volume (no ROI mask)"}
    clean = doc["clean"]["at_fp_rate"]
    lo, hi = clean.get("ci95") or [None, None]
    rate = f"{doc['fp_rate']:g}"
    figs = "".join(
        _img(figures[name], alt, eid) for name, alt, eid in (
            ("froc.png", "FROC curves", "figure-froc"),
            ("sensitivity_vs_eps.png", "sensitivity versus eps", "figure-sensitivity-vs-eps"))
        if name in figures)
    title = f"medrobust detection robustness report — {doc.get('model') or 'model'}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)}</title><style>{_CSS}{_WRAP}</style></head>
<body data-kind="detection">
<main>
<h1>Detection robustness report</h1>
<p class="meta">Model {_e(doc.get('model'))} &middot; {doc['n']} volumes
({doc['spatial_dims']}D), {doc['lesions']} lesions</p>
<section class="card" id="det-summary"><h2 style="margin-top:0">Summary</h2>
<p>Clean sensitivity at {_e(rate)} FP/volume <strong id="det-clean-sensitivity"
data-fp-rate="{_num(doc['fp_rate'])}" data-value="{_num(clean['sensitivity'])}">
{_fmt(clean['sensitivity'])}</strong>
{'' if lo is None else f'<span class="ci">[{_fmt(lo)}, {_fmt(hi)}]</span>'} &middot; CPM
<strong id="det-clean-cpm" data-value="{_num(doc['clean']['cpm']['value'])}">
{_fmt(doc['clean']['cpm']['value'])}</strong></p>
<p id="det-budgets" data-units="{_e(units or '')}" data-norm="{_e(norm)}">
{_e(budget_note(units, bounds, norm))} Budgets:
{_e(', '.join(eps_text(b['label'], b['value'], units, bounds) for b in doc['eps']))}.</p>
<p id="det-roi" data-kind="{_e(roi.get('kind'))}">Region of interest (where the attacks may
perturb): {_e(roi.get('text'))}. The attacks try to hide every lesion (DAG's objective on the
proposals that overlap a lesion box); volumes without lesions are left as they are.</p>
</section>
{_table(doc)}
<section class="card" id="det-curves"><h2 style="margin-top:0">Curves</h2>{figs}
<p class="meta">FROC clean and under each attack at the largest budget; the sensitivity at
{_e(rate)} FP/volume versus eps.</p></section>
{_froc_table(doc)}
{_config(doc)}
</main>
<script>{_SCRIPT}</script>
</body></html>
"""


def write_detection_report(doc: dict[str, Any], path: str | os.PathLike[str],
                           out_dir: str | os.PathLike[str] | None = None) -> Path:
    """Write the report to ``path`` atomically, embedding the figures ``doc["figures"]`` names
    (relative to ``out_dir``, default ``path``'s folder); a ``report.html`` medrobust did not
    write as a detection report is never replaced."""
    path = Path(path)
    if path.exists() and 'data-kind="detection"' not in path.read_text(encoding="utf-8",
                                                                       errors="replace"):
        raise EvaluationError(f"{path}: exists and is not a detection report medrobust wrote; "
                              "not replaced (choose another output folder)")
    base = Path(out_dir) if out_dir is not None else path.parent
    figures: dict[str, bytes] = {}
    for key in ("froc", "sensitivity_vs_eps"):
        rel = (doc.get("figures") or {}).get(key)
        if rel and (base / rel).is_file():
            figures[f"{key}.png"] = (base / rel).read_bytes()
    text = render_detection_report(doc, figures)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path
