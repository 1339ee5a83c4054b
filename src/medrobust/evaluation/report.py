"""The report: one self-contained HTML file (figures embedded as base64 PNG, no external resource),
built with the standard library and escaped with :func:`html.escape`.

Stable hooks for tests and tools (values in ``data-value`` are the exact JSON numbers):

* ``#summary`` — the summary card; ``#summary-clean-accuracy`` and ``#summary-clean-auc``;
* ``#summary-table tr.summary-row[data-eps][data-reliable]`` with
  ``td.worst-case-accuracy[data-value]`` (marked ``unreliable`` when a check failed),
  ``td.alternative-accuracy[data-value]`` (the strongest alternative, when one was computed),
  ``td.quote[data-value]`` (the figure to quote) and
  ``td.attack-accuracy[data-attack][data-value]``;
* ``#sanity-banner[data-state]`` — ``passed``, ``warnings`` or ``failed``;
* ``#sanity[data-passed]`` with ``li.sanity-check[data-check-id][data-status]``;
* ``#ensembles`` — per ensemble: which component broke how many samples, robust accuracy after
  each, forward/backward passes and time;
* ``li.min-norm-distance[data-attack][data-value]`` — "median distance to the nearest
  adversarial" of each minimum-norm attack;
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
#numbers-table{table-layout:auto;font-size:.8em}
#numbers-table th,#numbers-table td{white-space:normal;overflow-wrap:anywhere;padding:3px 5px}
#numbers-table .ci{display:block}
.unreliable{color:#8a0018;text-decoration:line-through}
.badge{font-size:.75em;padding:1px 5px;border-radius:4px;background:#fde7ea;color:#8a0018}
th:first-child,td:first-child{text-align:left}
th{background:#eef1f4}
.ci{color:#666;font-size:.85em}
.pass{color:#0a7a2f}.fail{color:#b00020;font-weight:600}.warn{color:#a15c00}.skipped{color:#777}
.banner{padding:10px 14px;border-radius:6px;margin:8px 0;font-weight:600}
.banner.ok{background:#e6f4ea;color:#0a5c24}.banner.bad{background:#fde7ea;color:#8a0018}
.banner.warn{background:#fff4e0;color:#7a4500}
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
  var t = document.getElementById('numbers-table');
  if (t) {
    var box = t.parentNode;
    document.body.setAttribute('data-numbers-overflow',
                               String(t.scrollWidth > box.clientWidth + 1));
  }
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


def _banner(sanity: dict[str, Any]) -> str:
    warned = [c["id"] for c in sanity["checks"] if c["status"] == "warn"]
    if not sanity["passed"]:
        return (
            '<div class="banner bad" id="sanity-banner" data-state="failed">Sanity checks '
            "failed" + (": a sign of gradient masking" if sanity.get(
                "gradient_masking_suspected") else "")
            + ". The robust accuracy of the attacks asked for is an upper bound at best and is "
            "not the result: see the figure to quote below. Failed: "
            f"{_e(', '.join(sanity['failed']))}</div>"
        )
    if warned:
        return ('<div class="banner warn" id="sanity-banner" data-state="warnings">Sanity checks '
                f"passed with {len(warned)} warning{'s' if len(warned) != 1 else ''}: "
                f"{_e(', '.join(warned))}.</div>")
    return ('<div class="banner ok" id="sanity-banner" data-state="passed">All sanity checks '
            "passed.</div>")


def _summary(doc: dict[str, Any]) -> str:
    clean = doc["clean"]
    attacks = list(doc["attacks"])
    head = "".join(f"<th>{_e(a)}</th>" for a in attacks)
    heads = doc.get("headline") or []
    unreliable = any(not h.get("reliable", True) for h in heads)
    has_alt = any(h.get("alternative") for h in heads)
    rows = []
    for i, w in enumerate(doc["worst_case"]):
        h: dict[str, Any] = heads[i] if i < len(heads) else {"reliable": True}
        cells = "".join(
            _prop_cell(doc["attacks"][a]["per_eps"][i]["robust_accuracy"], "attack-accuracy",
                       f' data-attack="{_e(a)}"')
            for a in attacks
        )
        worst = _prop_cell(w["robust_accuracy"], "worst-case-accuracy"
                           + ("" if h.get("reliable", True) else " unreliable"))
        if not h.get("reliable", True):
            worst = worst.replace("</td>", ' <span class="badge">unreliable</span></td>', 1)
        extra = ""
        if unreliable:
            alt = h.get("alternative")
            extra += (_prop_cell(alt, "alternative-accuracy",
                                 f' title="{_e(alt["name"])}"') if alt else
                      ("<td class='alternative-accuracy' data-value='null'>n/a</td>"
                       if has_alt else ""))
            q = h.get("quote_value")
            extra += (f'<td class="quote" data-value="{_num(q)}"><strong>'
                      f'{_pct(q) if q is not None else "none"}</strong>'
                      + (' <span class="ci">(upper bound)</span>' if q is not None else "")
                      + "</td>")
        rows.append(
            f'<tr class="summary-row" data-eps="{_num(w["eps"])}" '
            f'data-reliable="{"true" if h.get("reliable", True) else "false"}" '
            f'data-eps-label="{_e(w["eps_label"])}"><td>{_e(w["eps_label"])}</td>'
            + worst + extra + cells + "</tr>"
        )
    auc = clean["auc"]
    sanity = doc["sanity"]
    advice = ""
    if unreliable and heads:
        advice = f'<p class="fail" id="summary-advice">{_e(heads[-1].get("advice", ""))}</p>'
    auc_ci = (f' <span class="ci">[{auc["ci_low"]:.3f}, {auc["ci_high"]:.3f}]</span>'
              if auc.get("ci_low") is not None else "")
    acc = clean["accuracy"]
    extra_head = ""
    if unreliable:
        extra_head = (("<th>strongest alternative</th>" if has_alt else "")
                      + "<th>quote</th>")
    return f"""
<section class="card" id="summary">
<h2 style="margin-top:0">Summary</h2>
<p>Clean accuracy <strong id="summary-clean-accuracy" data-value="{_num(acc['value'])}">
{_pct(acc['value'])}</strong> <span class="ci">[{_pct(acc['ci_low'])}, {_pct(acc['ci_high'])}]
</span> &middot; clean AUC <strong id="summary-clean-auc" data-value="{_num(auc['value'])}">
{'n/a' if auc['value'] is None else f"{auc['value']:.3f}"}</strong>{auc_ci}
&middot; n = <span id="summary-n" data-value="{clean['n']}">{clean['n']}</span></p>
{_banner(sanity)}
{advice}
<div class="scroll"><table id="summary-table">
<thead><tr><th>eps ({_e(doc['config']['norm'])}, {_e(doc['config']['units'])})</th>
<th>worst case</th>{extra_head}{head}</tr></thead>
<tbody>{''.join(rows)}</tbody></table></div>
<p class="meta">Robust accuracy: correct both clean and under attack, with 95% Wilson intervals.
The worst case counts a sample as robust only if every attack failed on it: it is the number to
quote{', unless a check failed (then see the column "quote")' if unreliable else ''}.</p>
{_min_norm_lines(doc)}
</section>"""


def _min_norm_lines(doc: dict[str, Any]) -> str:
    items = []
    for name, a in doc["attacks"].items():
        d = a.get("distance")
        if not d:
            continue
        v = d.get("median")
        items.append(
            f'<li class="min-norm-distance" data-attack="{_e(name)}" data-value="{_num(v)}">'
            f"{_e(name)}: median distance to the nearest adversarial "
            f"({_e(doc['config']['norm'])}, {_e(doc['config']['units'])}) "
            f"<strong>{'n/a' if v is None else f'{v:.4g}'}</strong> over the {d.get('n', 0)} "
            "samples it broke that were classified correctly</li>"
        )
    return f'<ul id="min-norm">{"".join(items)}</ul>' if items else ""


def _ensembles(doc: dict[str, Any]) -> str:
    timing = (doc.get("run") or {}).get("timing") or {}
    parts = []
    for name, a in doc["attacks"].items():
        comps = a.get("components")
        if a.get("kind") != "ensemble" or not comps:
            continue
        labels = [c["attack"] for c in comps]
        head = "".join(f"<th>{_e(lab)}</th>" for lab in labels)
        rows = []
        for e in a["per_eps"]:
            by = e.get("broken_by") or {}
            after = {r["attack"]: r["robust_accuracy"] for r in e.get("robust_after") or []}
            cost = {c["attack"]: c for c in e.get("cost") or []}
            cells = "".join(
                f'<td data-attack="{_e(lab)}" data-broken="{int(by.get(lab, 0))}">'
                f"{int(by.get(lab, 0))} broken; {_pct((after.get(lab) or {}).get('value'))} "
                f"left<br><span class='ci'>{int((cost.get(lab) or {}).get('forward_passes', 0))}"
                f" fwd / {int((cost.get(lab) or {}).get('backward_passes', 0))} bwd</span></td>"
                for lab in labels)
            rows.append(f'<tr data-eps="{_num(e["eps"])}"><td>{_e(e["eps_label"])}</td>'
                        f"{cells}</tr>")
        t = (timing.get(name) or {}).get("components") or {}
        trow = ("<tr><td>time (s)</td>" + "".join(f"<td>{t.get(lab, 0):.1f}</td>"
                                                  for lab in labels) + "</tr>") if t else ""
        notes = "".join(f"<li>{_e(n)}</li>" for n in a.get("notes") or [])
        parts.append(
            f'<h3>{_e(name)}</h3><div class="scroll"><table class="ensemble-table" '
            f'data-attack="{_e(name)}"><thead><tr><th>eps</th>{head}</tr></thead><tbody>'
            f"{''.join(rows)}{trow}</tbody></table></div>"
            + (f"<ul class='meta'>{notes}</ul>" if notes else "")
        )
    if not parts:
        return ""
    return ('<section class="card" id="ensembles"><h2 style="margin-top:0">Ensembles: which '
            "attack broke which samples</h2><p class='meta'>Each attack runs on the samples "
            "still robust after the ones before it; a sample counts for the first attack that "
            "broke it. Passes are per sample (a batch of n counts n).</p>"
            + "".join(parts) + "</section>")


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
            + _prop_cell(e["success_on_correct"], "success")
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
            + "<td></td>" + _prop_cell(w["success_on_correct"], "success")
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
checks). Attack success on correct: among the attacked samples the model classified correctly,
the share the attack made wrong. Perturbation statistics over the successful adversarial examples
(originally correct, broken within the budget).</p>
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
    """The HTML text of the report (of a ``results.json`` of any schema version)."""
    from medrobust.evaluation.schema import upgrade

    doc = upgrade(doc)
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
{_ensembles(doc)}
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
    from medrobust.evaluation.schema import upgrade

    doc = upgrade(doc)
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
    warned = [c["id"] for c in s["checks"] if c["status"] == "warn"]
    if s["passed"]:
        lines.append("sanity checks: " + (f"passed with {len(warned)} warning(s) ("
                                          + ", ".join(warned) + ")" if warned else "all passed"))
    else:
        lines.append("sanity checks: FAILED (" + ", ".join(s["failed"]) + ")"
                     + (" — gradient masking suspected" if s.get("gradient_masking_suspected")
                        else ""))
        heads = doc.get("headline") or []
        for h in heads:
            q = h.get("quote_value")
            alt = h.get("alternative")
            lines.append(
                f"  eps {h['eps_label']}: worst case {_pct(h['value'])} UNRELIABLE"
                + (f"; {alt['name']}: {_pct(alt['value'])}" if alt else "")
                + (f"; quote {_pct(q)} (upper bound)" if q is not None else "; nothing to quote")
            )
        if heads:
            lines.append("  " + heads[-1].get("advice", ""))
    return "\n".join(lines)
