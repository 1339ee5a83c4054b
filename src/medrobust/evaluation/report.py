"""The report: one self-contained HTML file (figures embedded as base64 PNG, no external resource),
built with the standard library and escaped with :func:`html.escape`.

Stable hooks for tests and tools (values in ``data-value`` are the exact JSON numbers):

* ``#summary`` — the summary card; ``#summary-clean-accuracy`` and ``#summary-clean-auc``;
* ``#summary-table tr.summary-row[data-eps]`` with ``td.worst-case-accuracy[data-value]`` and
  ``td.attack-accuracy[data-attack][data-value]``;
* ``#sanity[data-passed]`` with ``li.sanity-check[data-check-id][data-status]``;
* ``#numbers`` — the table of all numbers (``tr[data-attack][data-eps]``);
* ``body[data-images-loaded][data-images-total]`` — written by a small inline script once the
  page has loaded (how many ``<img>`` decoded with a width > 0).
"""

from __future__ import annotations

import base64
import html
import os
import uuid
from pathlib import Path
from typing import Any

__all__ = ["render_report", "summary_text", "write_report"]

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;background:#f5f6f8;
color:#1b1f24;line-height:1.4}
main{max-width:1100px;margin:0 auto;padding:24px}
h1{font-size:1.5em;margin:0 0 4px}h2{font-size:1.2em;margin:28px 0 8px}
.meta{color:#555;font-size:.9em}
.card{background:#fff;border:1px solid #d8dce2;border-radius:8px;padding:16px 20px;margin:12px 0}
table{border-collapse:collapse;font-size:.88em;width:100%}
th,td{border-bottom:1px solid #e3e6ea;padding:4px 8px;text-align:right;white-space:nowrap}
th:first-child,td:first-child{text-align:left}
th{background:#eef1f4}
.ci{color:#666;font-size:.85em}
.pass{color:#0a7a2f}.fail{color:#b00020;font-weight:600}.warn{color:#a15c00}.skipped{color:#777}
.banner{padding:10px 14px;border-radius:6px;margin:8px 0;font-weight:600}
.banner.ok{background:#e6f4ea;color:#0a5c24}.banner.bad{background:#fde7ea;color:#8a0018}
img{max-width:100%;height:auto;display:block;margin:8px 0}
code{background:#eef1f4;padding:0 3px;border-radius:3px}
.scroll{overflow-x:auto}
"""

_SCRIPT = """
window.addEventListener('load', function () {
  var imgs = document.images, ok = 0;
  for (var i = 0; i < imgs.length; i++) {
    if (imgs[i].complete && imgs[i].naturalWidth > 0) { ok++; }
  }
  document.body.setAttribute('data-images-loaded', String(ok));
  document.body.setAttribute('data-images-total', String(imgs.length));
});
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(v: Any) -> str:
    """The exact JSON text of a number for ``data-value`` (``null`` for missing)."""
    if v is None:
        return "null"
    return repr(float(v)) if isinstance(v, float) else str(v)


def _pct(v: Any) -> str:
    return "n/a" if v is None else f"{100 * float(v):.1f}%"


def _prop_cell(p: dict[str, Any] | None, cls: str, extra: str = "") -> str:
    if p is None:
        return "<td>n/a</td>"
    ci = (f' <span class="ci">[{_pct(p.get("ci_low"))}, {_pct(p.get("ci_high"))}]</span>'
          if p.get("ci_low") is not None else "")
    return (f'<td class="{cls}" data-value="{_num(p.get("value"))}"{extra}>'
            f'{_pct(p.get("value"))}{ci}</td>')


def _stat(s: dict[str, Any], key: str, fmt: str = "{:.4g}") -> str:
    v = s.get(key)
    return "n/a" if v is None else fmt.format(v)


def _img(data: bytes, alt: str, element_id: str) -> str:
    b64 = base64.b64encode(data).decode("ascii")
    return (f'<img id="{_e(element_id)}" alt="{_e(alt)}" '
            f'src="data:image/png;base64,{b64}">')


def _summary(doc: dict[str, Any]) -> str:
    clean = doc["clean"]
    attacks = list(doc["attacks"])
    head = "".join(f"<th>{_e(a)}</th>" for a in attacks)
    rows = []
    for i, w in enumerate(doc["worst_case"]):
        cells = "".join(
            _prop_cell(doc["attacks"][a]["per_eps"][i]["robust_accuracy"], "attack-accuracy",
                       f' data-attack="{_e(a)}"')
            for a in attacks
        )
        rows.append(
            f'<tr class="summary-row" data-eps="{_num(w["eps"])}" '
            f'data-eps-label="{_e(w["eps_label"])}"><td>{_e(w["eps_label"])}</td>'
            + _prop_cell(w["robust_accuracy"], "worst-case-accuracy") + cells + "</tr>"
        )
    auc = clean["auc"]
    sanity = doc["sanity"]
    banner = (
        '<div class="banner ok">All sanity checks passed.</div>' if sanity["passed"] else
        '<div class="banner bad">Sanity checks failed: a sign of gradient masking. The robust '
        "accuracy below is an upper bound at best; do not quote it before the attacks are "
        f"repaired. Failed: {_e(', '.join(sanity['failed']))}</div>"
    )
    auc_ci = (f' <span class="ci">[{auc["ci_low"]:.3f}, {auc["ci_high"]:.3f}]</span>'
              if auc.get("ci_low") is not None else "")
    acc = clean["accuracy"]
    return f"""
<section class="card" id="summary">
<h2 style="margin-top:0">Summary</h2>
<p>Clean accuracy <strong id="summary-clean-accuracy" data-value="{_num(acc['value'])}">
{_pct(acc['value'])}</strong> <span class="ci">[{_pct(acc['ci_low'])}, {_pct(acc['ci_high'])}]
</span> &middot; clean AUC <strong id="summary-clean-auc" data-value="{_num(auc['value'])}">
{'n/a' if auc['value'] is None else f"{auc['value']:.3f}"}</strong>{auc_ci}
&middot; n = <span id="summary-n" data-value="{clean['n']}">{clean['n']}</span></p>
{banner}
<div class="scroll"><table id="summary-table">
<thead><tr><th>eps ({_e(doc['config']['norm'])}, {_e(doc['config']['units'])})</th>
<th>worst case</th>{head}</tr></thead>
<tbody>{''.join(rows)}</tbody></table></div>
<p class="meta">Robust accuracy: correct both clean and under attack, with 95% Wilson intervals.
The worst case counts a sample as robust only if every attack failed on it: it is the number to
quote.</p>
</section>"""


def _sanity(doc: dict[str, Any]) -> str:
    s = doc["sanity"]
    items = []
    for c in s["checks"]:
        items.append(
            f'<li class="sanity-check {_e(c["status"])}" data-check-id="{_e(c["id"])}" '
            f'data-status="{_e(c["status"])}"><strong>{_e(c["status"].upper())}</strong> '
            f'<code>{_e(c["id"])}</code> {_e(c["detail"])}</li>'
        )
    return f"""
<section class="card" id="sanity" data-passed="{'true' if s['passed'] else 'false'}">
<h2 style="margin-top:0">Sanity checks</h2>
<p class="meta">From each attack's own results at each budget (no cumulative minimum). Tolerance:
{s['tolerance_samples']} sample(s). A failure is a sign of gradient masking.</p>
<ul>{''.join(items)}</ul></section>"""


def _numbers(doc: dict[str, Any]) -> str:
    binary = doc["model"]["num_classes"] == 2
    head = ("<th>attack</th><th>eps</th><th>robust acc.</th><th>raw acc.</th>"
            "<th>success rate</th>"
            + ("<th>sensitivity</th><th>specificity</th>" if binary else "")
            + "<th>median L&infin;</th><th>median L2</th><th>median PSNR (dB)</th>"
              "<th>median SSIM</th>")
    rows = []

    def row(name: str, e: dict[str, Any]) -> str:
        p = e["perturbation"]["successful"]
        return (
            f'<tr data-attack="{_e(name)}" data-eps="{_num(e["eps"])}"><td>{_e(name)}</td>'
            f'<td>{_e(e["eps_label"])}</td>'
            + _prop_cell(e["robust_accuracy"], "robust")
            + _prop_cell(e["raw_accuracy"], "raw")
            + _prop_cell(e["success_rate"], "success")
            + ((_prop_cell(e["sensitivity"], "sens") + _prop_cell(e["specificity"], "spec"))
               if binary else "")
            + f'<td>{_stat(p["linf"], "median")}</td><td>{_stat(p["l2"], "median")}</td>'
            f'<td>{_stat(p["psnr"], "median", "{:.1f}")}</td>'
            f'<td>{_stat(p["ssim"], "median", "{:.3f}")}</td></tr>'
        )

    for name, a in doc["attacks"].items():
        for e in a["per_eps"]:
            rows.append(row(name, e))
        if a.get("large_eps"):
            rows.append(row(f"{name} (sanity)", a["large_eps"]))
    for w in doc["worst_case"]:
        rows.append(
            f'<tr data-attack="worst-case" data-eps="{_num(w["eps"])}"><td>worst case</td>'
            f'<td>{_e(w["eps_label"])}</td>' + _prop_cell(w["robust_accuracy"], "robust")
            + "<td></td>" + _prop_cell(w["success_rate"], "success")
            + ((_prop_cell(w["sensitivity"], "sens") + _prop_cell(w["specificity"], "spec"))
               if binary else "")
            + "<td></td><td></td><td></td><td></td></tr>"
        )
    names = doc["model"]["class_names"]
    chead = "".join(f"<th>{_e(n)}</th>" for n in names)
    crow = ['<tr data-attack="clean"><td>clean</td>'
            + "".join(_prop_cell(c, "class") for c in doc["clean"]["per_class"]) + "</tr>"]
    for w in doc["worst_case"]:
        crow.append(f'<tr data-attack="worst-case" data-eps="{_num(w["eps"])}"><td>worst case, '
                    f'eps {_e(w["eps_label"])}</td>'
                    + "".join(_prop_cell(c, "class") for c in w["per_class"]) + "</tr>")
    return f"""
<section class="card" id="numbers">
<h2 style="margin-top:0">All numbers</h2>
<div class="scroll"><table id="numbers-table"><thead><tr>{head}</tr></thead>
<tbody>{''.join(rows)}</tbody></table></div>
<p class="meta">Raw accuracy: the accuracy on the attack's output alone (used by the sanity
checks). Success rate: among the attacked samples the model classified correctly. Perturbation
statistics over the successful adversarial examples.</p>
<h2>Robust accuracy per class</h2>
<div class="scroll"><table id="per-class-table"><thead><tr><th></th>{chead}</tr></thead>
<tbody>{''.join(crow)}</tbody></table></div>
</section>"""


def _provenance(doc: dict[str, Any]) -> str:
    m, d, c = doc["model"], doc["data"], doc["config"]
    attacks = "; ".join(
        f"{a['name']} ({', '.join(f'{k}={v}' for k, v in a['config'].items() if k != 'name')})"
        for a in c["attacks"]
    )
    rows = [
        ("model", m.get("source") or "(in memory)"),
        ("model weights sha256", m.get("weights_sha256") or m.get("state_dict_sha256")),
        ("data", f"{d.get('dataset') or d.get('source') or '(in memory)'}"
                 f"{' / ' + str(d['split']) if d.get('split') else ''}, n = {d['n']}"),
        ("data file sha256", d.get("file_sha256") or "unknown"),
        ("data content sha256", d.get("content_sha256")),
        ("attacks", attacks),
        ("norm, units, bounds", f"{c['norm']}, {c['units']}, {c['bounds']}"),
        ("direction", c.get("direction") or "all samples attacked"),
        ("seed, batch size", f"{doc['seed']}, {c['batch_size']}"),
        ("medrobust", doc["medrobust_version"]),
        ("schema version", doc["schema_version"]),
    ]
    body = "".join(f"<tr><td>{_e(k)}</td><td style='text-align:left;white-space:normal'>"
                   f"{_e(v)}</td></tr>" for k, v in rows)
    return f"""<section class="card" id="provenance"><h2 style="margin-top:0">Configuration
</h2><table>{body}</table></section>"""


def render_report(doc: dict[str, Any], figures: dict[str, bytes]) -> str:
    """The HTML text of the report."""
    m, d = doc["model"], doc["data"]
    title = f"medrobust robustness report — {m.get('source') or 'model'}"
    gal = ""
    if doc.get("gallery"):
        g0 = doc["gallery"][0]
        gal = f"""<section class="card" id="gallery"><h2 style="margin-top:0">Gallery</h2>
<p class="meta">{_e(g0['attack'])} at eps = {_e(g0['eps_label'])}: clean image with its top-3
classes, the perturbation amplified to fill the color range, the adversarial image with its top-3.
Images displayed with the window [{_e(f"{g0['window'][0]:g}")}, {_e(f"{g0['window'][1]:g}")}]
{_e(doc['config']['units'])}.</p>
{_img(figures['gallery.png'], 'adversarial gallery', 'figure-gallery')}</section>"""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)}</title><style>{_CSS}</style></head>
<body data-schema-version="{doc['schema_version']}">
<main>
<h1>Adversarial robustness report</h1>
<p class="meta">Model {_e(m.get('source') or '(in memory)')} &middot; data
{_e(d.get('dataset') or d.get('source') or '(in memory)')}
{_e(d.get('split') or '')} (n = {d['n']}, {_e(d['task'])}, {m['num_classes']} classes)
&middot; {_e(doc['config']['norm'])} budgets in {_e(doc['config']['units'])}
&middot; medrobust {_e(doc['medrobust_version'])} &middot; {_e(doc['run']['finished'])}</p>
{_summary(doc)}
{_sanity(doc)}
<section class="card" id="curves"><h2 style="margin-top:0">Robust accuracy versus eps</h2>
{_img(figures['robust_accuracy.png'], 'robust accuracy versus eps', 'figure-robust-accuracy')}
</section>
{gal}
{_numbers(doc)}
{_provenance(doc)}
</main>
<script>{_SCRIPT}</script>
</body></html>
"""


def write_report(doc: dict[str, Any], gallery: list[dict[str, Any]], path: Path,
                 figures: dict[str, bytes] | None = None) -> Path:
    """Write the report to ``path`` atomically (drawing the figures when not given)."""
    if figures is None:
        from medrobust.evaluation.figures import gallery_png, robust_accuracy_png

        figures = {
            "robust_accuracy.png": robust_accuracy_png(doc),
            "gallery.png": gallery_png(gallery, str(doc["config"].get("units") or "")),
        }
    text = render_report(doc, figures)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def summary_text(doc: dict[str, Any]) -> str:
    """A plain-text summary table for the terminal."""
    attacks = list(doc["attacks"])
    acc = doc["clean"]["accuracy"]
    auc = doc["clean"]["auc"]["value"]
    lines = [
        f"clean accuracy {_pct(acc['value'])} [{_pct(acc['ci_low'])}, {_pct(acc['ci_high'])}]"
        + ("" if auc is None else f", AUC {auc:.3f}") + f", n = {doc['clean']['n']}",
    ]
    head = ["eps", "worst case (95% CI)", *attacks]
    rows = []
    for i, w in enumerate(doc["worst_case"]):
        ra = w["robust_accuracy"]
        rows.append([
            w["eps_label"],
            f"{_pct(ra['value'])} [{_pct(ra['ci_low'])}, {_pct(ra['ci_high'])}]",
            *[_pct(doc["attacks"][a]["per_eps"][i]["robust_accuracy"]["value"])
              for a in attacks],
        ])
    widths = [max(len(str(r[j])) for r in [head, *rows]) for j in range(len(head))]
    for r in [head, *rows]:
        lines.append("  ".join(str(c).rjust(wd) for c, wd in zip(r, widths, strict=True)))
    s = doc["sanity"]
    lines.append("sanity checks: " + ("all passed" if s["passed"] else
                                      "FAILED (" + ", ".join(s["failed"]) + ") — gradient "
                                      "masking suspected"))
    return "\n".join(lines)
