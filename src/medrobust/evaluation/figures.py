"""The report's figures, drawn with matplotlib's Agg canvas (no display, no global backend
change) and returned as PNG bytes: robust accuracy versus eps, and the adversarial gallery."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["display_image", "gallery_png", "render_figures", "robust_accuracy_png",
           "write_figures"]

_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf"]


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


_MARKERS = ["o", "^", "v", "D", "P", "X", "<", ">"]
_DASHES = ["-", "--", "-.", ":"]


def robust_accuracy_png(doc: dict[str, Any]) -> bytes:
    """Robust accuracy (95% CI) versus eps for each attack and for the worst case.

    Every line stays visible: the worst case is drawn first, wide and pale, under the attacks;
    each attack has its own marker and dash pattern and a small horizontal offset, so that an
    attack equal to the worst case (or to another attack) shows on top of it instead of being
    hidden. A minimum-norm attack also gets a labelled vertical line at the median distance to
    the nearest adversarial example.
    """
    fig = Figure(figsize=(6.8, 4.2))
    ax = fig.add_subplot(1, 1, 1)
    worst = doc["worst_case"]
    x = np.arange(len(worst), dtype=float)
    ticks = [str(w["eps_label"]) for w in worst]
    clean = doc["clean"]["accuracy"]["value"]
    ax.axhline(clean, color="0.5", ls="--", lw=1, label=f"clean ({clean:.3f})")
    ys = np.array([np.nan if w["robust_accuracy"]["value"] is None
                   else w["robust_accuracy"]["value"] for w in worst], dtype=float)
    lo = np.array([np.nan if w["robust_accuracy"]["ci_low"] is None
                   else w["robust_accuracy"]["ci_low"] for w in worst], dtype=float)
    hi = np.array([np.nan if w["robust_accuracy"]["ci_high"] is None
                   else w["robust_accuracy"]["ci_high"] for w in worst], dtype=float)
    ax.fill_between(x, lo, hi, color="k", alpha=0.10, lw=0, label="worst case 95% CI")
    ax.plot(x, ys, marker="s", ms=9, lw=5, color="k", alpha=0.35, zorder=1,
            label="worst case")
    names = list(doc["attacks"])
    width = 0.12 if len(names) > 1 else 0.0
    for i, (name, a) in enumerate(doc["attacks"].items()):
        ya = [np.nan if e["robust_accuracy"]["value"] is None else e["robust_accuracy"]["value"]
              for e in a["per_eps"]]
        off = (i - (len(names) - 1) / 2) * width / max(1, len(names) - 1) if width else 0.0
        ax.plot(x + off, ya, marker=_MARKERS[i % len(_MARKERS)], ms=5, lw=1.4,
                ls=_DASHES[i % len(_DASHES)], color=_COLORS[i % len(_COLORS)], label=name,
                zorder=3 + i)
    eps_values = np.array([float(w["eps"]) for w in worst])
    for i, (name, a) in enumerate(doc["attacks"].items()):
        d = (a.get("distance") or {}).get("median")
        if d is None or len(eps_values) < 2:
            continue
        beyond = d > eps_values[-1]
        pos = float(np.interp(d, eps_values, x)) if not beyond else x[-1] + 0.3
        ax.axvline(pos, color=_COLORS[i % len(_COLORS)], ls=":", lw=1.6, zorder=2,
                   label=f"{name}: median distance to the nearest adversarial "
                         f"{'> ' if beyond else ''}{d:.3g}")
    ax.set_xticks(x)
    ax.set_xticklabels(ticks, rotation=30 if len(ticks) > 5 else 0)
    units = doc["config"].get("units") or ""
    ax.set_xlabel(f"eps ({doc['config']['norm']}, {units})")
    ax.set_ylabel("robust accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    ax.set_title("Robust accuracy versus budget")
    return _png(fig)


def _middle_slice(img: torch.Tensor) -> torch.Tensor:
    """``(C, H, W)`` for display: the middle slice of a volume ``(C, D, H, W)``; a 1D signal
    becomes one row."""
    t = img
    while t.dim() > 3:
        t = t[:, t.shape[1] // 2]
    if t.dim() == 2:
        t = t.unsqueeze(1)
    return t


def display_image(img: torch.Tensor, window: tuple[float, float]) -> np.ndarray:
    """An image in [0, 1] for ``imshow``: windowed (``(x - lo) / (hi - lo)``, clipped), RGB for 3
    channels, else the first channel in gray."""
    t = _middle_slice(img).double()
    lo, hi = window
    t = ((t - lo) / (hi - lo)).clamp(0, 1)
    if t.shape[0] == 3:
        return t.permute(1, 2, 0).numpy()
    return t[0].numpy()


def _top3_text(top: list[dict[str, Any]]) -> str:
    return "\n".join(f"{d['name'][:14]}: {100 * d['prob']:.1f}%" for d in top)


def gallery_png(items: list[dict[str, Any]], units: str) -> bytes:
    """The classic figure, one row per sample: the clean image with its top-3 classes, the
    perturbation amplified to fill the color range, the adversarial image with its top-3."""
    rows = max(1, len(items))
    fig = Figure(figsize=(7.2, 2.5 * rows))
    if not items:
        ax = fig.add_subplot(1, 1, 1)
        ax.text(0.5, 0.5, "no gallery examples", ha="center", va="center")
        ax.axis("off")
        return _png(fig)
    for r, it in enumerate(items):
        window = (float(it["window"][0]), float(it["window"][1]))
        clean = display_image(it["clean_image"], window)
        adv = display_image(it["adversarial_image"], window)
        delta = _middle_slice(it["adversarial_image"] - it["clean_image"]).double()
        m = float(delta.abs().max())
        ax = fig.add_subplot(rows, 3, 3 * r + 1)
        ax.imshow(clean, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"#{it['index']} clean (true: {it['label_name'][:12]})", fontsize=8)
        ax.set_xlabel(_top3_text(it["clean_top3"]), fontsize=7)
        ax = fig.add_subplot(rows, 3, 3 * r + 2)
        if delta.shape[0] == 3:
            scale = m if m > 0 else 1.0
            ax.imshow((0.5 + delta / (2 * scale)).clamp(0, 1).permute(1, 2, 0).numpy(),
                      interpolation="nearest")
        else:
            ax.imshow(delta[0].numpy(), cmap="RdBu_r", vmin=-(m or 1.0), vmax=(m or 1.0),
                      interpolation="nearest")
        amp = (window[1] - window[0]) / (2 * m) if m > 0 else 0.0
        ax.set_title(f"perturbation x{amp:.0f}", fontsize=8)
        ax.set_xlabel(f"{it['attack']} eps={it['eps_label']}\nmax |delta| = {m:.4g} {units}",
                      fontsize=7)
        ax = fig.add_subplot(rows, 3, 3 * r + 3)
        ax.imshow(adv, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title("adversarial" + (" (fooled)" if it["fooled"] else " (not fooled)"),
                     fontsize=8, color="#b00020" if it["fooled"] else "black")
        ax.set_xlabel(_top3_text(it["adversarial_top3"]), fontsize=7)
    for ax in fig.axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return _png(fig)


def render_figures(doc: dict[str, Any], gallery: list[dict[str, Any]]) -> dict[str, bytes]:
    """The report's figures as PNG bytes, by file name (nothing written)."""
    return {
        "robust_accuracy.png": robust_accuracy_png(doc),
        "gallery.png": gallery_png(gallery, str(doc["config"].get("units") or "")),
    }


def write_figures(doc: dict[str, Any], gallery: list[dict[str, Any]], folder: Path
                  ) -> dict[str, bytes]:
    """Draw the figures, write them as PNG files into ``folder`` (all or nothing) and return
    their bytes."""
    from medrobust.evaluation.output import write_outputs

    figs = render_figures(doc, gallery)
    write_outputs(Path(folder), dict(figs))
    return figs
