"""The transfer report: one self-contained HTML page (the heatmaps embedded as base64 PNG).

Stable hooks: ``#transfer-success`` and ``#transfer-accuracy`` tables with
``td.cell[data-proxy][data-target][data-value]``, ``#ensemble`` with ``td[data-held-out]``.
"""

from __future__ import annotations

import base64
import html
import io
import math
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["heatmap_png", "render_transfer_report"]


def heatmap_png(doc: dict[str, Any], what: str = "success") -> bytes:
    """A heatmap of ``doc[what]`` (rows proxies, columns targets; ensemble row appended)."""
    names = list(doc["names"])
    rows = [list(r) for r in doc[what]]
    labels = list(names)
    ens = doc.get("ensemble")
    if ens is not None:
        rows.append(list(ens[what]))
        labels.append("ensemble\n(others)")
    m = np.array([[np.nan if v is None else 100 * v for v in r] for r in rows], dtype=float)
    fig = Figure(figsize=(1.2 + 1.1 * len(names), 1.0 + 0.8 * len(labels)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    cmap = "Reds" if what == "success" else "Greens"
    im = ax.imshow(m, vmin=0, vmax=100, cmap=cmap)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("target model")
    ax.set_ylabel("crafted on (proxy)")
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            v = m[i, j]
            ax.text(j, i, "-" if math.isnan(v) else f"{v:.0f}", ha="center", va="center",
                    color="white" if (not math.isnan(v) and v > 60) else "black", fontsize=9)
    fig.colorbar(im, ax=ax, label=("transfer success (%)" if what == "success"
                                   else "target accuracy (%)"))
    title = "attack success on clean-correct samples" if what == "success" else "accuracy"
    ax.set_title(f"{title}, eps={doc['eps']:.4g} ({doc['norm']})", fontsize=10)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def _e(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _pct(v: Any) -> str:
    return "-" if v is None else f"{100 * float(v):.1f}%"


def _table(doc: dict[str, Any], what: str) -> str:
    names = doc["names"]
    head = "".join(f"<th>{_e(n)}</th>" for n in names)
    body = []
    for a, row in zip(names, doc[what], strict=True):
        cells = "".join(
            f'<td class="cell" data-proxy="{_e(a)}" data-target="{_e(b)}" '
            f'data-value="{"" if v is None else v}">{_pct(v)}</td>'
            for b, v in zip(names, row, strict=True)
        )
        body.append(f"<tr><th>{_e(a)}</th>{cells}</tr>")
    return (f'<table id="transfer-{what}"><tr><th>proxy \\ target</th>{head}</tr>'
            + "".join(body) + "</table>")


def render_transfer_report(doc: dict[str, Any]) -> str:
    """The HTML page for a ``TransferResult.to_dict()`` document (plus ``doc["data"]``)."""
    imgs = {w: base64.b64encode(heatmap_png(doc, w)).decode() for w in ("success", "accuracy")}
    ens = doc.get("ensemble")
    ens_html = ""
    if ens is not None:
        cells = "".join(
            f'<td data-held-out="{_e(n)}" data-value="{"" if s is None else s}">{_pct(s)}</td>'
            for n, s in zip(doc["names"], ens["success"], strict=True)
        )
        ens_html = (
            "<h2>Hold-one-out ensemble</h2><p>Crafted on an ensemble of every model but the held-"
            f"out one (combine = {_e(ens['combine'])}), evaluated on the held-out model.</p>"
            f'<table id="ensemble"><tr><th></th>'
            + "".join(f"<th>{_e(n)}</th>" for n in doc["names"])
            + f"</tr><tr><th>transfer success</th>{cells}</tr></table>"
        )
    clean = "".join(
        f"<tr><td>{_e(n)}</td><td>{_pct(a)}</td><td>{c}</td></tr>"
        for n, a, c in zip(doc["names"], doc["clean_accuracy"], doc["correct"], strict=True)
    )
    atk = doc.get("attack", {})
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>medrobust transfer report</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1000px;margin:24px auto;padding:0 16px}}
table{{border-collapse:collapse;margin:8px 0}}th,td{{border:1px solid #ddd;padding:4px 8px;
text-align:right}}th:first-child{{text-align:left}}img{{max-width:100%}}</style></head>
<body><h1>Transfer of adversarial examples</h1>
<p>Attack <code>{_e(atk.get("name", "?"))}</code>, eps = {doc["eps"]:.6g} ({_e(doc["norm"])}),
{doc["n"]} samples{(" of " + _e(doc["data"])) if doc.get("data") else ""}. Rows: the proxy model
the examples are crafted on; columns: the target model (Liu et al., ICLR 2017, Table 1 layout); the
diagonal is the white-box attack. Transfer success counts only the samples the target classifies
correctly when clean.</p>
<h2>Clean accuracy</h2>
<table><tr><th>model</th><th>accuracy</th><th>correct</th></tr>{clean}</table>
<h2>Transfer success</h2>{_table(doc, "success")}
<img alt="transfer success heatmap" src="data:image/png;base64,{imgs["success"]}">
<h2>Target accuracy on the examples</h2>{_table(doc, "accuracy")}
<img alt="target accuracy heatmap" src="data:image/png;base64,{imgs["accuracy"]}">
{ens_html}
</body></html>
"""
