"""The segmenter under attack: per-pixel or per-voxel logits, 2D and 3D.

A :class:`Segmenter` wraps any ``torch.nn.Module`` that returns one logit per class and position,
``(N, K, H, W)`` or ``(N, K, D, H, W)``, or one sigmoid channel ``(N, 1, *spatial)`` (treated as
two classes with logits ``[0, z]``, as :class:`~medrobust.models.Classifier` does). Labels and
targets are label maps of the output's spatial shape, ``(N, *spatial)``; a prediction is the label
map ``argmax`` over the classes. Everything else (bounds in the user's units, preprocessing and
normalization inside the wrapper, chunked evaluation, eval mode restored, input-only gradients) is
the shared contract of :class:`~medrobust.models.base.Model`.

Large volumes: with ``sliding_window=SlidingWindow(roi_size, overlap)`` the network runs through
MONAI's :func:`monai.inferers.sliding_window_inference` inside the wrapper. That function blends
the windows' outputs with differentiable tensor operations, so attacks get exact input gradients
of the whole-volume prediction, as a user's inference pipeline computes it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from medrobust.models.base import Capabilities, Model, ModelOutputError

if TYPE_CHECKING:
    from medrobust.criteria import Criterion

__all__ = ["Segmenter", "SlidingWindow"]

_BLEND_MODES = ("constant", "gaussian")


@dataclass(frozen=True)
class SlidingWindow:
    """Sliding-window inference settings (MONAI's ``sliding_window_inference``).

    Attributes:
        roi_size: the window's spatial size (one int per spatial axis, or one int for all).
        overlap: the fraction of overlap between neighbouring windows, in ``[0, 1)``.
        sw_batch_size: windows evaluated at once.
        mode: how overlapping windows are blended: ``"constant"`` (plain average) or
            ``"gaussian"`` (weights falling off from each window's centre).
    """

    roi_size: int | tuple[int, ...]
    overlap: float = 0.25
    sw_batch_size: int = 1
    mode: str = "constant"

    def __post_init__(self) -> None:
        roi = (self.roi_size,) if isinstance(self.roi_size, int) else tuple(self.roi_size)
        if not roi or any(isinstance(r, bool) or int(r) != r or r < 1 for r in roi):
            raise ValueError(f"roi_size must be positive integers; got {self.roi_size!r}")
        if not 0.0 <= float(self.overlap) < 1.0:
            raise ValueError(f"overlap must lie in [0, 1); got {self.overlap!r}")
        if isinstance(self.sw_batch_size, bool) or int(self.sw_batch_size) < 1:
            raise ValueError(
                f"sw_batch_size must be a positive integer; got {self.sw_batch_size!r}"
            )
        if self.mode not in _BLEND_MODES:
            raise ValueError(f"mode must be one of {_BLEND_MODES}; got {self.mode!r}")

    def roi_for(self, rank: int) -> tuple[int, ...]:
        """The window size for inputs with ``rank`` spatial axes."""
        if isinstance(self.roi_size, int):
            return (int(self.roi_size),) * rank
        roi = tuple(int(r) for r in self.roi_size)
        if len(roi) != rank:
            raise ValueError(
                f"sliding_window.roi_size {roi} has {len(roi)} axes but the inputs have {rank} "
                "spatial axes"
            )
        return roi


def _as_sliding_window(value: SlidingWindow | Mapping[str, Any] | None) -> SlidingWindow | None:
    if value is None or isinstance(value, SlidingWindow):
        return value
    if isinstance(value, Mapping):
        try:
            return SlidingWindow(**dict(value))
        except TypeError as err:
            raise ValueError(
                f"sliding_window: {err}; expected keys roi_size, overlap, sw_batch_size, mode"
            ) from None
    raise TypeError(
        "sliding_window must be a SlidingWindow, a dict of its fields or None; got "
        f"{type(value).__name__}"
    )


class Segmenter(Model):
    """A segmenter under attack (dense outputs: one label per pixel or voxel).

    Args:
        module: any ``nn.Module`` returning per-position logits ``(N, K, *spatial)``, or one
            sigmoid channel ``(N, 1, *spatial)`` (treated as two classes, logits ``[0, z]``).
        bounds: ``(lo, hi)``: the range of valid inputs, in the user's units (``[0, 1]``, HU ...).
        mean, std: per-channel normalization applied inside the wrapper after ``preprocess``.
        preprocess: an optional differentiable callable applied first (e.g. an intensity window).
        num_classes: the number of classes (background included); checked against the output.
        chunk_size: the largest batch sent through the network at once (volumes: keep it small).
        device: where the module lives; by default the device of its first parameter.
        sliding_window: run the network window by window (a :class:`SlidingWindow` or a dict of
            its fields); ``None`` runs it on the whole input.

    Attacks call it as ``attack(segmenter, x, labels, target=None, mask=None, criterion=None)``
    with label maps ``(N, *spatial)`` of the output's spatial shape; the default criteria are
    :class:`~medrobust.criteria.PixelFraction` (untargeted) and
    :class:`~medrobust.criteria.TargetMask` (targeted). A target may equal the label at some
    voxels (they are to be kept), but not at all voxels of a sample.
    """

    kind = "segmenter"

    def __init__(
        self,
        module: nn.Module,
        bounds: tuple[float, float] = (0.0, 1.0),
        mean: float | Sequence[float] | torch.Tensor | None = None,
        std: float | Sequence[float] | torch.Tensor | None = None,
        preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
        num_classes: int | None = None,
        chunk_size: int = 16,
        device: torch.device | str | None = None,
        sliding_window: SlidingWindow | Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(module, bounds, mean, std, preprocess, chunk_size, device)
        if num_classes is not None and (
            isinstance(num_classes, bool) or int(num_classes) != num_classes or num_classes < 2
        ):
            raise ValueError(f"num_classes must be an integer >= 2; got {num_classes!r}")
        self.num_classes = None if num_classes is None else int(num_classes)
        self.sliding_window = _as_sliding_window(sliding_window)
        self.capabilities = Capabilities(output="dense")
        # (input shape without the batch) -> (classes, output spatial shape); output shapes do
        # not depend on the weights, so one probe per input shape is enough
        self._probed: dict[tuple[int, ...], tuple[int, tuple[int, ...]]] = {}
        self._expected_spatial: tuple[int, ...] | None = None

    # ------------------------------------------------------------------ forward
    def _call_module(self, z: torch.Tensor, shape: tuple[int, ...]) -> Any:
        sw = self.sliding_window
        if sw is None:
            return super()._call_module(z, shape)
        from monai.inferers import sliding_window_inference

        roi = sw.roi_for(z.dim() - 2)

        def predictor(window: torch.Tensor) -> Any:
            return Model._call_module(self, window, shape)

        out = sliding_window_inference(
            z, roi, int(sw.sw_batch_size), predictor, overlap=float(sw.overlap), mode=sw.mode
        )
        return out

    def _standardize(self, out: Any, n: int) -> torch.Tensor:
        as_tensor = getattr(out, "as_tensor", None)  # MONAI MetaTensor -> plain tensor
        if callable(as_tensor):
            out = as_tensor()
        if not isinstance(out, torch.Tensor):
            raise ModelOutputError(
                f"the segmenter's network returned {type(out).__name__}; expected a tensor of "
                "per-voxel logits (N, classes, *spatial)"
            )
        if out.dim() < 3 or out.shape[0] != n:
            raise ModelOutputError(
                f"the segmenter's network returned shape {tuple(out.shape)} for a batch of {n}; "
                f"expected per-pixel logits ({n}, classes, H, W) or per-voxel logits "
                f"({n}, classes, D, H, W)"
            )
        if out.shape[1] == 1:
            out = torch.cat([torch.zeros_like(out), out], dim=1)
        if self.num_classes is not None and out.shape[1] != self.num_classes:
            raise ModelOutputError(
                f"the segmenter's network returned {out.shape[1]} channels but num_classes="
                f"{self.num_classes}"
            )
        return out

    def output_shape(self, x: torch.Tensor) -> tuple[int, tuple[int, ...], int]:
        """``(classes, output spatial shape, forward passes spent)`` for inputs shaped like ``x``.

        Probes one sample the first time an input shape is seen (output shapes do not depend on
        the weights)."""
        key = tuple(int(s) for s in x.shape[1:])
        if key in self._probed:
            k, spatial = self._probed[key]
            return k, spatial, 0
        out = self.logits(x[:1])
        k, spatial = int(out.shape[1]), tuple(int(s) for s in out.shape[2:])
        self._probed[key] = (k, spatial)
        return k, spatial, 1

    def num_outputs(self, x: torch.Tensor) -> tuple[int, int]:
        """``(K, forward passes spent)``; also records the output's spatial shape, against
        which :meth:`check_label_values` checks the label maps of the same call."""
        k, spatial, spent = self.output_shape(x)
        self._expected_spatial = spatial
        return k, spent

    # ------------------------------------------------------------------ the task
    def check_labels(self, labels: Any, n: int, name: str = "labels") -> torch.Tensor:
        """Label maps ``(N, *spatial)`` of integer classes (a channel axis of one is dropped)."""
        try:
            t = torch.as_tensor(labels)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(
                f"{name} must be a tensor or array of label maps; got {type(labels).__name__}"
            ) from None
        if t.is_complex() or t.is_floating_point() or t.dtype == torch.bool:
            raise TypeError(
                f"{name} of a segmenter must be integer label maps; got dtype {t.dtype} "
                "(cast with .long())"
            )
        rank = self._rank
        if rank is not None and t.dim() == rank + 2 and t.shape[1] == 1:
            t = t[:, 0]  # (N, 1, *spatial), as MONAI stores masks
        if t.dim() < 2:
            raise ValueError(
                f"{name} of a segmenter must be label maps of shape (N, *spatial); got shape "
                f"{tuple(t.shape)}"
            )
        if rank is not None and self.preprocess is None and t.dim() != rank + 1:
            what = {1: "(N, L)", 2: "(N, H, W)", 3: "(N, D, H, W)"}[rank]
            raise ValueError(
                f"{name} have shape {tuple(t.shape)} but the segmenter's network is {rank}-D: "
                f"label maps are {what}"
            )
        if t.shape[0] != n:
            raise ValueError(f"{name} has {t.shape[0]} label maps but the batch has {n} inputs")
        return t.detach().long().cpu()

    def check_label_values(
        self, labels: torch.Tensor, target: torch.Tensor | None, num_outputs: int
    ) -> None:
        spatial = self._expected_spatial
        for name, t in (("labels", labels), ("target", target)):
            if t is None:
                continue
            if spatial is not None and tuple(t.shape[1:]) != spatial:
                raise ValueError(
                    f"{name} have spatial shape {tuple(t.shape[1:])} but the segmenter's output "
                    f"is {spatial} per sample: give label maps (N, "
                    + ", ".join(str(s) for s in spatial) + ")"
                )
            if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_outputs):
                raise ValueError(
                    f"{name} must lie in [0, {num_outputs - 1}] (the segmenter has {num_outputs} "
                    f"classes); got values in [{int(t.min())}, {int(t.max())}]"
                )
        if target is not None:
            if target.shape != labels.shape:
                raise ValueError(
                    f"target has shape {tuple(target.shape)} but labels {tuple(labels.shape)}"
                )
            same = (target == labels).reshape(target.shape[0], -1).all(1).nonzero().flatten()
            if same.numel():
                raise ValueError(
                    f"target equals the label at every voxel of {same.numel()} sample(s) "
                    f"(indices {same[:10].tolist()}); a targeted attack needs some voxel whose "
                    "target differs from its label"
                )

    def default_criterion(self, targeted: bool) -> Criterion:
        from medrobust.criteria import PixelFraction, TargetMask

        return TargetMask() if targeted else PixelFraction()

    def predictions(self, outputs: torch.Tensor) -> torch.Tensor:
        """Label maps ``(N, *spatial)``."""
        return outputs.argmax(1)

    def near_tie(self, outputs: torch.Tensor, rtol: float = 1e-4) -> torch.Tensor:
        """Samples with any voxel whose top two logits are within float noise (``(N,)``)."""
        top2 = outputs.topk(2, dim=1).values
        scale = 1.0 + outputs.abs().amax(1)
        tie = (top2[:, 0] - top2[:, 1]) <= rtol * scale
        return tie.reshape(tie.shape[0], -1).any(1)

    def __repr__(self) -> str:
        sw = "" if self.sliding_window is None else f", sliding_window={self.sliding_window}"
        return (
            f"Segmenter({type(self.module).__name__}, bounds={self.bounds}, "
            f"num_classes={self.num_classes}, chunk_size={self.chunk_size}{sw})"
        )
