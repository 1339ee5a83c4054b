"""The HTML report of a segmenter's evaluation (``report.html`` beside
``segmentation_results.json``): one self-contained page, figures embedded as base64 PNG, text
escaped with :func:`html.escape`, the same style and image check as the classifier report
(:mod:`medrobust.evaluation.report`).

Stable hooks for tests and tools (``data-value`` holds the exact JSON number, ``null`` for none):

* ``body[data-kind="segmentation"]``, with ``data-images-loaded`` / ``data-images-total`` written
  by the page's script once the images have decoded;
* ``#seg-budgets[data-units][data-norm]`` — what the budgets are in, and ``#seg-roi[data-kind]``
  — the region the attacks were confined to;
* ``#seg-clean tr.clean-row[data-class]`` with ``td.clean-dice[data-value]`` and
  ``td.clean-hd95[data-value]``;
* ``#seg-dice tr.dice-row[data-attack][data-eps]`` (``data-attack="worst-case"`` for the per-case
  worst case) with ``td.dice[data-class][data-value]``;
* ``#seg-per-case tr.case-row[data-case]`` with ``td.case-clean[data-class][data-value]`` and
  ``td.case-worst[data-class][data-value]`` (at the largest budget);
* ``#figure-dice-vs-eps`` and ``#figure-overlays`` — the images.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

from medrobust.evaluation.errors import EvaluationError
from medrobust.evaluation.report import _CSS, _SCRIPT, _e, _img, _num

__all__ = ["budget_note", "eps_text", "render_segmentation_report", "write_segmentation_report"]

MAX_CASES = 50
"""Rows of the per-case table: the cases hurt most (lowest worst-case Dice first)."""


def eps_text(label: str, value: float, units: str | None, bounds: list[float] | None) -> str:
    """A budget as the user reads it: ``"8 HU"``, ``"4/255 (0.0157 of [0, 1])"``."""
    u = (units or "").strip()
    if u.lower() in ("hu", "hounsfield"):
        return f"{label} HU"
    if bounds is not None and list(bounds) == [0.0, 1.0]:
        return label if label == f"{value:g}" else f"{label} ({value:.4g} of [0, 1])"
    return f"{label} {u}".strip()


def budget_note(units: str | None, bounds: list[float] | None, norm: str) -> str:
    """One sentence: the budgets' norm, their units and the input range they live in."""
    u = (units or "the model's input units").strip()
    rng = "" if not bounds else f" The inputs lie in [{bounds[0]:g}, {bounds[1]:g}]"
    if u.lower() in ("hu", "hounsfield"):
        what = "Hounsfield units (CT): an eps of 10 is a 10 HU change per voxel"
    elif bounds is not None and list(bounds) == [0.0, 1.0]:
        what = (f"{u}, normalized to [0, 1] (an eps of 8/255 is 8 grey levels of 255); for MR "
                "the normalization is the model's, so the budget is a fraction of its range")
    else:
        what = u
    return f"Budgets are {norm} norms in {what}.{rng}."


def _mean(d: dict[str, Any] | None) -> Any:
    return None if not d else d.get("mean")

_WRAP = (
    "#seg-dice,#seg-per-case,#seg-clean{table-layout:auto;font-size:.85em}"
    "#seg-dice th,#seg-dice td,#seg-per-case th,#seg-per-case td,#seg-clean th,#seg-clean td"
    "{white-space:normal;overflow-wrap:anywhere;padding:3px 5px}"
    "#seg-dice .ci,#seg-per-case .ci,#seg-clean .ci{display:block}"
)
"""Wrapping cells: the wide tables fit the page instead of scrolling sideways."""


def _fmt(v: Any, fmt: str = "{:.3f}") -> str:
    return "n/a" if v is None else fmt.format(float(v))


def _ci_cell(d: dict[str, Any] | None, cls: str, attrs: str = "", fmt: str = "{:.3f}") -> str:
    m = _mean(d)
    ci = (d or {}).get("ci95") or [None, None]
    ci_txt = ("" if ci[0] is None else
              f' <span class="ci">[{_fmt(ci[0], fmt)}, {_fmt(ci[1], fmt)}]</span>')
    return f'<td class="{cls}"{attrs} data-value="{_num(m)}">{_fmt(m, fmt)}{ci_txt}</td>'


def _clean(doc: dict[str, Any], fg: list[str]) -> str:
    unit = "voxel spacing units" if doc.get("spacing") else "voxels"
    rows = "".join(
        f'<tr class="clean-row" data-class="{_e(c)}"><td>{_e(c)}</td>'
        + _ci_cell(doc["clean"][c]["dice"], "clean-dice")
        + _ci_cell(doc["clean"][c]["hd95"], "clean-hd95", fmt="{:.2f}")
        + f'<td>{doc["clean"][c]["dice"].get("n", 0)}</td></tr>'
        for c in fg)
    return f"""<section class="card" id="seg-clean-card"><h2 style="margin-top:0">Clean
performance</h2>
<div class="scroll"><table id="seg-clean"><thead><tr><th>class</th><th>Dice (95% CI)</th>
<th>HD95 in {_e(unit)} (95% CI)</th><th>cases</th></tr></thead><tbody>{rows}</tbody></table>
</div><p class="meta">Mean over cases with percentile-bootstrap 95% intervals. HD95: the
95th-percentile Hausdorff distance between the predicted and the true structure (cases where
either is empty are left out).</p></section>"""


def _dice_table(doc: dict[str, Any], fg: list[str]) -> str:
    units, bounds = doc.get("budget_units"), doc.get("bounds")
    head = "".join(f"<th>{_e(c)}</th>" for c in fg)
    rows = []
    for name, block in doc["attacks"].items():
        for e in block["per_eps"]:
            rows.append(
                f'<tr class="dice-row" data-attack="{_e(name)}" data-eps="{_num(e["value"])}">'
                f'<td>{_e(name)}</td><td>{_e(eps_text(e["eps"], e["value"], units, bounds))}</td>'
                + "".join(_ci_cell(e["dice"][c], "dice", f' data-class="{_e(c)}"') for c in fg)
                + f'<td>{_fmt(e.get("changed_voxels"), "{:.1%}")}</td>'
                f'<td>{_fmt(e.get("linf_max"), "{:.4g}")}</td></tr>')
    for w in doc["worst_case"]:
        rows.append(
            f'<tr class="dice-row worst" data-attack="worst-case" data-eps="{_num(w["value"])}">'
            f'<td><strong>worst case</strong></td>'
            f'<td>{_e(eps_text(w["eps"], w["value"], units, bounds))}</td>'
            + "".join(_ci_cell(w["dice"][c], "dice", f' data-class="{_e(c)}"') for c in fg)
            + "<td></td><td></td></tr>")
    return f"""<section class="card" id="seg-dice-card"><h2 style="margin-top:0">Dice under
attack</h2>
<div class="scroll"><table id="seg-dice"><thead><tr><th>attack</th><th>eps</th>{head}
<th>voxels changed</th><th>max L&infin;</th></tr></thead><tbody>{''.join(rows)}</tbody></table>
</div><p class="meta">Mean Dice per foreground class over cases with 95% bootstrap intervals, at
each attack's full budget. Voxels changed: the share of voxels whose predicted label the attack
changed. The worst case takes, per case and class, the lowest Dice any attack reached at that
budget: it is the number to quote.</p></section>"""


def _per_case(doc: dict[str, Any], fg: list[str]) -> str:
    worst = doc["per_case"].get("worst_dice") or {}
    if not worst or not doc["worst_case"]:
        return ""
    last = doc["worst_case"][-1]["eps"]
    w = worst[last]
    clean = doc["per_case"]["clean_dice"]
    idx = {c: doc["classes"].index(c) for c in fg}

    def rank(i: int) -> tuple[float, float, int]:
        # the largest Dice drop over the classes, then the lowest worst Dice (as the overlay's
        # choice, evaluation.segmentation.hurt_most); cases without both values last
        pairs = [(clean[i][idx[c]], w[i][idx[c]]) for c in fg
                 if w[i][idx[c]] is not None and clean[i][idx[c]] is not None]
        if not pairs:
            return (float("inf"), float("inf"), i)
        return (-max(a - b for a, b in pairs), min(b for _, b in pairs), i)

    order = sorted(range(len(w)), key=rank)[:MAX_CASES]
    head = "".join(f"<th>{_e(c)}: clean</th><th>{_e(c)}: worst</th>" for c in fg)
    rows = []
    for i in order:
        cells = "".join(
            f'<td class="case-clean" data-class="{_e(c)}" data-value="{_num(clean[i][idx[c]])}">'
            f"{_fmt(clean[i][idx[c]])}</td>"
            f'<td class="case-worst" data-class="{_e(c)}" data-value="{_num(w[i][idx[c]])}">'
            f"{_fmt(w[i][idx[c]])}</td>" for c in fg)
        rows.append(f'<tr class="case-row" data-case="{i}"><td>{i}</td>{cells}</tr>')
    units, bounds = doc.get("budget_units"), doc.get("bounds")
    lab = eps_text(last, doc["worst_case"][-1]["value"], units, bounds)
    shown = (f"the {len(order)} cases hurt most (largest drop from clean) of {len(w)}"
             if len(order) < len(w) else f"all {len(w)} cases, the largest drop from clean first")
    return f"""<section class="card" id="seg-per-case-card"><h2 style="margin-top:0">Per case:
the worst case at eps {_e(lab)}</h2>
<div class="scroll"><table id="seg-per-case"><thead><tr><th>case</th>{head}</tr></thead>
<tbody>{''.join(rows)}</tbody></table></div>
<p class="meta">Dice of each case clean and the lowest Dice any attack reached on it at the
largest budget; {_e(shown)}. The per-case values at every budget are in
segmentation_results.json (per_case).</p></section>"""


def _figure(figures: dict[str, bytes], name: str, alt: str, element_id: str) -> str:
    data = figures.get(name)
    return "" if data is None else _img(data, alt, element_id)


def _config(doc: dict[str, Any]) -> str:
    attacks = "; ".join(
        f"{n} (" + ", ".join(f"{k}={v}" for k, v in (b["config"].get("config") or {}).items()
                             if k != "name") + ")"
        for n, b in doc["attacks"].items())
    runs = doc.get("units") or {}
    rows = [
        ("model", doc.get("model")),
        ("cases", doc.get("n")),
        ("classes", ", ".join(doc["classes"])),
        ("norm, units, bounds", f"{doc['norm']}, {doc.get('budget_units')}, {doc.get('bounds')}"),
        ("voxel spacing", doc.get("spacing") or "not given (distances in voxels)"),
        ("region of interest", (doc.get("roi") or {}).get("text", "whole volume")),
        ("criterion", doc.get("criterion") or "the segmenter's default (PixelFraction)"),
        ("attacks", attacks),
        ("units of work", f"{runs.get('computed', 0)} computed, {runs.get('reused', 0)} reused"),
    ]
    body = "".join(f"<tr><td>{_e(k)}</td><td style='text-align:left;white-space:normal'>"
                   f"{_e(v)}</td></tr>" for k, v in rows)
    return (f'<section class="card" id="seg-config"><h2 style="margin-top:0">Configuration</h2>'
            f"<table>{body}</table></section>")


def render_segmentation_report(doc: dict[str, Any], figures: dict[str, bytes]) -> str:
    """The HTML text of a segmentation evaluation's report (``doc``: the content of
    ``segmentation_results.json``; ``figures``: PNG bytes by file name, ``dice_vs_eps.png`` and
    ``overlays.png``, each optional)."""
    fg = list(doc["classes"][1:])
    units, bounds, norm = doc.get("budget_units"), doc.get("bounds"), doc["norm"]
    roi = doc.get("roi") or {"kind": "none", "text": "whole volume (no ROI mask)"}
    figs = doc.get("figures") or {}
    overlay_note = ""
    if "overlays.png" in figures:
        lab = str(figs.get("overlay_eps", ""))
        value = next((float(b["value"]) for b in doc["eps"] if b["label"] == lab), float("nan"))
        eps_lab = eps_text(lab, value, units, bounds)
        overlay_note = (
            f"<p class='meta' id='seg-overlay-caption'>Case {_e(figs.get('overlay_case'))} (the "
            f"largest drop of {_e(fg[0] if fg else '')}'s Dice at the largest budget), attacked "
            f"by {_e(figs.get('overlay_attack'))} at eps {_e(eps_lab)}; planes "
            f"{_e(figs.get('overlay_planes', ''))} through the structure's centre. Left: the clean "
            "prediction; middle: the adversarial prediction; right: the perturbation (blue "
            "negative, red positive, scaled to its largest magnitude).</p>")
    title = f"medrobust segmentation robustness report — {doc.get('model') or 'model'}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)}</title><style>{_CSS}{_WRAP}</style></head>
<body data-kind="segmentation">
<main>
<h1>Segmentation robustness report</h1>
<p class="meta">Model {_e(doc.get('model'))} &middot; n = <span id="seg-n"
data-value="{doc['n']}">{doc['n']}</span> cases &middot; classes {_e(', '.join(doc['classes']))}
</p>
<section class="card" id="seg-summary"><h2 style="margin-top:0">Budgets and region</h2>
<p id="seg-budgets" data-units="{_e(units or '')}" data-norm="{_e(norm)}">
{_e(budget_note(units, bounds, norm))} Budgets:
{_e(', '.join(eps_text(b['label'], b['value'], units, bounds) for b in doc['eps']))}.</p>
<p id="seg-roi" data-kind="{_e(roi.get('kind'))}">Region of interest (where the attacks may
perturb): {_e(roi.get('text'))}.</p></section>
{_clean(doc, fg)}
{_dice_table(doc, fg)}
<section class="card" id="seg-curves"><h2 style="margin-top:0">Dice versus eps</h2>
{_figure(figures, 'dice_vs_eps.png', 'Dice versus eps per class', 'figure-dice-vs-eps')}
<p class="meta">Mean Dice per attack and the per-case worst case (dashed) at each budget.</p>
</section>
<section class="card" id="seg-overlays"><h2 style="margin-top:0">Overlays</h2>
{_figure(figures, 'overlays.png', 'clean and adversarial predictions and perturbation',
         'figure-overlays')}
{overlay_note}</section>
{_per_case(doc, fg)}
{_config(doc)}
</main>
<script>{_SCRIPT}</script>
</body></html>
"""


def write_segmentation_report(doc: dict[str, Any], path: str | os.PathLike[str],
                              out_dir: str | os.PathLike[str] | None = None) -> Path:
    """Write the report to ``path`` atomically, embedding the figures that ``doc["figures"]``
    names (relative to ``out_dir``, default ``path``'s folder)."""
    path = Path(path)
    if path.exists() and 'data-kind="segmentation"' not in path.read_text(encoding="utf-8",
                                                                          errors="replace"):
        raise EvaluationError(f"{path}: exists and is not a segmentation report medrobust wrote; "
                              "not replaced (choose another output folder)")
    base = Path(out_dir) if out_dir is not None else path.parent
    figures: dict[str, bytes] = {}
    for key in ("dice_vs_eps", "overlays"):
        rel = (doc.get("figures") or {}).get(key)
        if rel and (base / rel).is_file():
            figures[f"{key}.png"] = (base / rel).read_bytes()
    text = render_segmentation_report(doc, figures)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path
