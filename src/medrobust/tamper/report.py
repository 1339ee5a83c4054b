"""The tampering report: before/after slices through the location with the models' outputs."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = ["write_report_png"]


def write_report_png(
    path: str | os.PathLike[str],
    before: torch.Tensor,
    after: torch.Tensor,
    location: Sequence[int],
    *,
    boxes_before: Sequence[dict[str, torch.Tensor]] | None = None,
    boxes_after: Sequence[dict[str, torch.Tensor]] | None = None,
    seg_before: torch.Tensor | None = None,
    seg_after: torch.Tensor | None = None,
    title: str = "",
    window: tuple[float, float] = (40.0, 400.0),
    min_score: float = 0.3,
    max_boxes: int = 5,
) -> Path:
    """Axial (z) and coronal (y) slices through ``location`` (z, y, x) before and after, in a
    soft-tissue window, with the difference; detector boxes (score in the label) and segmenter
    contours drawn where given (the ``max_boxes`` best boxes with score >= ``min_score`` that
    cross the slice). Volumes are (D, H, W) in HU; ``boxes_*`` one dict of the
    detector's ``detect`` output; ``seg_*`` (D, H, W) label maps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    z, y, _ = (int(v) for v in location)
    lo, hi = window[0] - window[1] / 2, window[0] + window[1] / 2
    fig, axes = plt.subplots(2, 3, figsize=(10, 7))
    views = [(f"axial z={z}", lambda v: v[z], (1, 2), 0, z),
             (f"coronal y={y}", lambda v: v[:, y], (0, 2), 1, y)]
    for row, (name, take, (ax_r, ax_c), axis, idx) in enumerate(views):
        for col, (vol, boxes, seg, what) in enumerate(
            [(before, boxes_before, seg_before, "before"), (after, boxes_after, seg_after, "after")]
        ):
            ax = axes[row, col]
            ax.imshow(take(vol).numpy(), cmap="gray", vmin=lo, vmax=hi)
            if seg is not None and take(seg).any():
                ax.contour(take(seg).numpy(), levels=[0.5], colors="lime", linewidths=0.8)
            for det in boxes or []:
                scores = det.get("scores", torch.ones(len(det["boxes"])))
                shown = 0
                for j in torch.argsort(scores, descending=True).tolist():
                    b, s = det["boxes"][j], scores[j]
                    if float(s) < min_score or shown >= max_boxes:
                        break
                    if not (b[axis] <= idx < b[axis + 3]):
                        continue
                    shown += 1
                    r0, c0 = float(b[ax_r]), float(b[ax_c])
                    ax.add_patch(Rectangle((c0 - 0.5, r0 - 0.5), float(b[ax_c + 3]) - c0,
                                           float(b[ax_r + 3]) - r0, fill=False, ec="red", lw=1))
                    ax.text(c0, r0 - 1, f"{float(s):.2f}", color="red", fontsize=7)
            ax.set_title(f"{what}, {name}", fontsize=9)
            ax.axis("off")
        d = take(after) - take(before)
        m = float(d.abs().max()) or 1.0
        im = axes[row, 2].imshow(d.numpy(), cmap="RdBu_r", vmin=-m, vmax=m)
        axes[row, 2].set_title(f"after - before (HU), {name}", fontsize=9)
        axes[row, 2].axis("off")
        fig.colorbar(im, ax=axes[row, 2], fraction=0.046)
    fig.suptitle(title + "\ngreen: segmenter lesion contour; red: detector boxes (score)",
                 fontsize=9)
    out = Path(path)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
