"""The detector under attack: MONAI's RetinaNet, boxes and scores out, 2D and 3D.

RetinaNet (Lin, Goyal, Girshick, He, Dollár, "Focal Loss for Dense Object Detection", ICCV 2017)
as built by MONAI (``monai.apps.detection.networks.retinanet_detector.RetinaNetDetector``;
Baumgartner et al., "nnDetection", MICCAI 2021, for the medical setting): a feature pyramid, a
classification head giving one sigmoid logit per anchor and class, a regression head giving box
offsets, and a box selector (score threshold, top-k, class-wise NMS).

:class:`Detector` wraps a ``RetinaNetDetector`` so that attacks can use it like any model kind:

* inputs in medrobust's order ``(N, C, H, W)`` / ``(N, C, D, H, W)`` in the user's units (bounds,
  preprocessing and normalization inside the wrapper, as for a classifier); the wrapper permutes a
  volume to MONAI's ``(B, C, H, W, D)``, pads it to the network's ``size_divisible`` and back;
* the **standard output** is the pre-NMS anchor table ``(N, A, K + 2*dims)``: for each anchor its
  ``K`` class logits (which carry gradients) and its decoded box, clipped to the image, in
  medrobust's axis order (:mod:`medrobust.boxes`);
* **decisions** are the post-NMS detections (:func:`medrobust.boxes.select_detections` with the
  detector's own box-selection settings), which the criteria judge success on;
* labels are a list of per-image ``{"boxes", "labels"}`` in medrobust's axis order.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from medrobust.boxes import pack_boxes, select_detections, to_monai_boxes, unpack_boxes
from medrobust.models.base import Capabilities, Model, ModelOutputError

if TYPE_CHECKING:
    from medrobust.criteria import Criterion

__all__ = [
    "DETECTOR_ARCHITECTURES",
    "Detector",
    "build_retinanet",
    "load_detector",
    "save_detector",
]


def build_retinanet(
    spatial_dims: int = 3,
    in_channels: int = 1,
    num_classes: int = 1,
    width: int = 8,
    fpn_channels: int = 16,
    anchor_sizes: Sequence[int] = (4, 8),
    feature_map_scales: Sequence[int] = (1, 2, 4),
) -> nn.Module:
    """A small RetinaNet (MONAI) for CPU-sized volumes: a two-stage residual backbone (MONAI
    ``ResidualUnit``, ``width`` channels), a feature pyramid of ``fpn_channels`` over strides 2, 4
    and 8 (MONAI ``FeaturePyramidNetwork``; MONAI's ResNet-FPN extractor needs torchvision), cubic
    anchors of ``anchor_sizes`` voxels times each level's ``feature_map_scales``.

    The input size must be divisible by 8 (the wrapper pads)."""
    from monai.apps.detection.networks.retinanet_detector import RetinaNetDetector
    from monai.apps.detection.networks.retinanet_network import RetinaNet
    from monai.apps.detection.utils.anchor_utils import AnchorGeneratorWithAnchorShape

    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3; got {spatial_dims!r}")
    if len(feature_map_scales) != 3:
        raise ValueError("feature_map_scales needs 3 values (one per pyramid level)")
    if fpn_channels % 8:
        raise ValueError(f"fpn_channels must be a multiple of 8 (GroupNorm); got {fpn_channels}")
    features = _PyramidFeatures(spatial_dims, in_channels, int(width), int(fpn_channels))
    shapes = [[float(s)] * spatial_dims for s in anchor_sizes]
    anchors = AnchorGeneratorWithAnchorShape(
        feature_map_scales=[float(s) for s in feature_map_scales], base_anchor_shapes=shapes
    )
    network = RetinaNet(
        spatial_dims=spatial_dims, num_classes=int(num_classes), num_anchors=len(shapes),
        feature_extractor=features, size_divisible=8,
    )
    return RetinaNetDetector(network, anchors)


class _PyramidFeatures(nn.Module):
    """A small residual backbone (strides 2 and 4, MONAI ``ResNetBlock``-style basic blocks) with
    MONAI's ``FeaturePyramidNetwork`` on top and a max-pooled extra level (stride 8): the feature
    extractor RetinaNet expects (``out_channels`` attribute, a dict of maps, finest first)."""

    def __init__(self, spatial_dims: int, in_channels: int, width: int, out_channels: int) -> None:
        super().__init__()
        from monai.networks.blocks.convolutions import ResidualUnit
        from monai.networks.blocks.feature_pyramid_network import (
            FeaturePyramidNetwork,
            LastLevelMaxPool,
        )

        w = width
        self.stem = ResidualUnit(spatial_dims, in_channels, w, strides=2, norm="batch")
        self.stage1 = ResidualUnit(spatial_dims, w, w, strides=1, norm="batch")
        self.stage2 = ResidualUnit(spatial_dims, w, 2 * w, strides=2, norm="batch")
        self.fpn = FeaturePyramidNetwork(
            spatial_dims=spatial_dims, in_channels_list=[w, 2 * w], out_channels=out_channels,
            extra_blocks=LastLevelMaxPool(spatial_dims),
        )
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        c1 = self.stage1(self.stem(x))
        c2 = self.stage2(c1)
        return dict(self.fpn({"0": c1, "1": c2}))


DETECTOR_ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {"retinanet": build_retinanet}
"""Registered detector builders (a detector folder names one of these, never code)."""


class Detector(Model):
    """A detector under attack (see the module docstring).

    Args:
        module: a ``monai.apps.detection.networks.retinanet_detector.RetinaNetDetector`` (its
            ``network``, ``anchor_generator``, ``box_coder`` and ``box_selector`` are used).
        bounds, mean, std, preprocess, chunk_size, device: as for every model kind
            (:class:`~medrobust.models.base.Model`).
        score_thresh, nms_thresh, topk, max_detections: the box selection that turns the anchor
            table into detections; by default the module's ``box_selector`` settings.
    """

    kind = "detector"
    capabilities = Capabilities(output="boxes")

    def __init__(
        self,
        module: nn.Module,
        bounds: tuple[float, float] = (0.0, 1.0),
        mean: float | Sequence[float] | torch.Tensor | None = None,
        std: float | Sequence[float] | torch.Tensor | None = None,
        preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
        chunk_size: int = 16,
        device: torch.device | str | None = None,
        *,
        score_thresh: float | None = None,
        nms_thresh: float | None = None,
        topk: int | None = None,
        max_detections: int | None = None,
    ) -> None:
        for attr in ("network", "anchor_generator", "box_coder", "spatial_dims", "num_classes"):
            if not hasattr(module, attr):
                raise TypeError(
                    "Detector wraps a MONAI RetinaNetDetector (monai.apps.detection); "
                    f"{type(module).__name__} has no {attr!r}"
                )
        super().__init__(module, bounds, mean, std, preprocess, chunk_size, device)
        sel = getattr(module, "box_selector", None)
        m: Any = module
        self.num_classes = int(m.num_classes)
        self.spatial_dims = int(m.spatial_dims)
        self.score_thresh = float(score_thresh if score_thresh is not None
                                  else getattr(sel, "score_thresh", 0.05))
        self.nms_thresh = float(nms_thresh if nms_thresh is not None
                                else getattr(sel, "nms_thresh", 0.5))
        self.topk = int(topk if topk is not None
                        else getattr(sel, "topk_candidates_per_level", 1000))
        self.max_detections = int(max_detections if max_detections is not None
                                  else getattr(sel, "detections_per_img", 300))
        if not 0.0 < self.score_thresh < 1.0:
            raise ValueError(f"score_thresh must lie in (0, 1); got {self.score_thresh}")
        self._rank = self.spatial_dims

    # ------------------------------------------------------------------ forward
    @property
    def selection(self) -> dict[str, Any]:
        """The box-selection settings (for criteria and reports)."""
        return {"score_thresh": self.score_thresh, "nms_thresh": self.nms_thresh,
                "topk": self.topk, "max_detections": self.max_detections}

    def _to_monai(self, z: torch.Tensor) -> torch.Tensor:
        return z.permute(0, 1, 3, 4, 2) if self.spatial_dims == 3 else z

    def head(
        self, z: torch.Tensor, shape: tuple[int, ...] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
        """The raw head on a normalized batch ``z`` (medrobust order): class logits ``(N, A, K)``,
        box regression ``(N, A, 2*dims)``, the anchors ``(A, 2*dims)`` and the unpadded size, the
        last three in MONAI's axis order (used by training; attacks use the standard outputs)."""
        det: Any = self.module
        img = self._to_monai(z)
        size = list(img.shape[2:])
        div = [int(d) for d in det.size_divisible]
        pad = []
        for s, d in zip(reversed(size), reversed(div), strict=True):
            pad += [0, (-s) % d]
        if any(pad):
            img = F.pad(img, pad)
        try:
            head = det.network(img)
        except RuntimeError as e:
            raise ValueError(
                f"the detector's network cannot take inputs of shape {shape or tuple(z.shape)}: "
                f"{str(e).splitlines()[0]}"
            ) from e
        if isinstance(head, (list, tuple)):
            half = len(head) // 2
            head = {det.cls_key: list(head[:half]), det.box_reg_key: list(head[half:])}
        cls_maps = head[det.cls_key]
        reg_maps = head[det.box_reg_key]
        if isinstance(cls_maps, torch.Tensor):
            cls_maps, reg_maps = [cls_maps], [reg_maps]
        anchors = det.anchor_generator(img, cls_maps)[0]
        return det._reshape_maps(cls_maps), det._reshape_maps(reg_maps), anchors, size

    def _call_module(self, z: torch.Tensor, shape: tuple[int, ...]) -> Any:
        det: Any = self.module
        logits, reg, anchors, size = self.head(z, shape)
        boxes = torch.stack(
            [det.box_coder.decode_single(reg[i].float(), anchors) for i in range(reg.shape[0])]
        ).to(logits.dtype)
        d = self.spatial_dims
        hi = torch.tensor(size, dtype=boxes.dtype, device=boxes.device).repeat(2)
        boxes = torch.minimum(boxes.clamp_min(0), hi)  # clip to the unpadded image
        inv = [0, 1] if d == 2 else [2, 0, 1]
        boxes = boxes[..., inv + [d + i for i in inv]]  # MONAI -> medrobust axis order
        return torch.cat([logits, boxes], dim=-1)

    def _standardize(self, out: Any, n: int) -> torch.Tensor:
        width = self.num_classes + 2 * self.spatial_dims
        if not isinstance(out, torch.Tensor) or out.dim() != 3 or out.shape[0] != n \
                or out.shape[2] != width:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ModelOutputError(
                f"the detector produced {got} for a batch of {n}; expected ({n}, anchors, {width})"
            )
        return out

    def check_inputs(self, x: torch.Tensor, name: str = "inputs") -> None:
        super().check_inputs(x, name)
        if x.dim() != self.spatial_dims + 2:
            what = "(N, C, H, W)" if self.spatial_dims == 2 else "(N, C, D, H, W)"
            raise ValueError(
                f"{name} have shape {tuple(x.shape)} but the detector is {self.spatial_dims}-D "
                f"and expects {what}"
            )

    # ------------------------------------------------------------------ the task
    def check_labels(self, labels: Any, n: int, name: str = "labels") -> torch.Tensor:
        if isinstance(labels, torch.Tensor) and labels.dim() == 3 \
                and labels.shape[-1] == 2 * self.spatial_dims + 1:
            packed = labels.detach().float().cpu()
        elif isinstance(labels, Mapping):
            raise TypeError(
                f"{name} of a detector are a list with one {{'boxes', 'labels'}} dict per image "
                "(wrap a single image's dict in a list)"
            )
        elif isinstance(labels, Sequence) and not isinstance(labels, (str, bytes)):
            packed = pack_boxes(labels, self.spatial_dims, name)
        else:
            raise TypeError(
                f"{name} of a detector must be a list of per-image {{'boxes', 'labels'}} dicts; "
                f"got {type(labels).__name__}"
            )
        if packed.shape[0] != n:
            raise ValueError(f"{name} has {packed.shape[0]} entries but the batch has {n} inputs")
        return packed

    def check_label_values(
        self, labels: torch.Tensor, target: torch.Tensor | None, num_outputs: int
    ) -> None:
        d2 = 2 * self.spatial_dims
        for name, t in (("labels", labels), ("target", target)):
            if t is None:
                continue
            cls = t[..., d2]
            real = cls[cls >= 0]
            if real.numel() and (int(real.max()) >= num_outputs or (real != real.round()).any()):
                raise ValueError(
                    f"{name}: box classes must be integers in [0, {num_outputs - 1}] (the "
                    f"detector has {num_outputs} classes); got up to {float(real.max()):g}"
                )
        if target is not None and not bool((target[..., d2] >= 0).any(1).all()):
            raise ValueError("target: every image needs at least one box to make appear")

    def default_criterion(self, targeted: bool) -> Criterion:
        from medrobust.detection_criteria import BoxesAppear, BoxesVanish

        return BoxesAppear(detector=self) if targeted else BoxesVanish(detector=self)

    def predictions(self, outputs: torch.Tensor) -> torch.Tensor:
        """Post-NMS detections, packed ``(N, P, 2*dims + 2)``: box, class, score (class -1 pads)."""
        return select_detections(outputs, self.num_classes, **self.selection)

    def near_tie(self, outputs: torch.Tensor, rtol: float = 1e-4) -> torch.Tensor:
        """Images with an anchor score within float noise of the score threshold."""
        thr = torch.logit(torch.tensor(self.score_thresh, dtype=outputs.dtype))
        lg = outputs[..., : self.num_classes]
        close = (lg - thr).abs() <= rtol * (1.0 + lg.abs())
        return close.reshape(outputs.shape[0], -1).any(1)

    def detect(self, x: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Per-image ``{"boxes", "labels", "scores"}`` (medrobust axis order), eval mode."""
        self.check_inputs(x)
        return unpack_boxes(self.predict(x).cpu())

    def monai_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        """Boxes in medrobust's order converted to MONAI's (for MONAI's own training code)."""
        return to_monai_boxes(boxes, self.spatial_dims)

    def __repr__(self) -> str:
        return (f"Detector(RetinaNet {self.spatial_dims}D, bounds={self.bounds}, "
                f"num_classes={self.num_classes}, score_thresh={self.score_thresh:g})")


# --------------------------------------------------------------------------- folders
def save_detector(
    directory: str | os.PathLike[str],
    detector: Detector,
    *,
    arch_args: Mapping[str, Any],
    units: str = "HU",
    class_names: Sequence[str] | None = None,
    data: Mapping[str, Any] | None = None,
    training: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> None:
    """Save a :class:`Detector` built by :func:`build_retinanet` as a model folder (kind
    ``"detector"``): weights, the architecture's arguments, bounds, preprocessing, box selection."""
    from medrobust._kindstore import write_kind_folder
    from medrobust.preprocessing import to_config

    pre = detector.preprocess if isinstance(detector.preprocess, nn.Module) else None
    meta = {
        "task": "detection",
        "num_classes": detector.num_classes,
        "class_names": list(class_names) if class_names else
        [str(i) for i in range(detector.num_classes)],
        "input": {"bounds": list(detector.bounds), "units": units, "channels": None,
                  "spatial_dims": detector.spatial_dims, "size": None},
        "preprocessing": {
            "steps": to_config(pre),
            "mean": None if detector.mean is None else detector.mean.tolist(),
            "std": None if detector.std is None else detector.std.tolist(),
        },
        "detection": detector.selection,
        "data": None if data is None else dict(data),
        "training": None if training is None else dict(training),
    }
    write_kind_folder(directory, detector.module, kind="detector", architecture="retinanet",
                      arch_args=arch_args, meta=meta, overwrite=overwrite)


def load_detector(
    directory: str | os.PathLike[str], device: torch.device | str | None = None
) -> Detector:
    """Load a detector folder written by :func:`save_detector` (registered architecture only).

    Raises:
        medrobust.modelstore.ModelError: not a detector folder, unknown architecture, bad weights.
    """
    from medrobust._kindstore import read_kind_folder
    from medrobust.modelstore import ModelError
    from medrobust.preprocessing import PreprocessingError, from_config

    module, doc = read_kind_folder(directory, "detector", DETECTOR_ARCHITECTURES)
    pre = doc.get("preprocessing") or {}
    try:
        preprocess = from_config(pre.get("steps"))
    except PreprocessingError as err:
        raise ModelError(f"{directory}: preprocessing: {err}") from err
    sel = doc.get("detection") or {}
    if device is not None:
        module.to(device)
    try:
        return Detector(
            module, bounds=tuple(doc["input"]["bounds"]), mean=pre.get("mean"),
            std=pre.get("std"), preprocess=preprocess,
            **{k: sel[k] for k in ("score_thresh", "nms_thresh", "topk", "max_detections")
               if k in sel},
        )
    except (KeyError, TypeError, ValueError) as err:
        raise ModelError(f"{directory}: {err}") from err
