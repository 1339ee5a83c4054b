"""The one container every data source yields.

Every loader in :mod:`medrobust.data` (MedMNIST, DICOM, NIfTI, image folders, phantoms) returns an
:class:`ImageData`: float tensors, channel-first, in stated bounds and units, with labels or masks
and the metadata that later steps (the model folder, the report, writing a tampered file back) need.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from medrobust.data.streamed import ImageSource, IndexedSource

TASKS = ("binary", "multi-class", "multi-label", "ordinal", "segmentation")


@dataclass
class ImageData:
    """Images (or volumes) with their targets and metadata.

    Attributes:
        images: float32 tensor, (N, C, *spatial): (N, C, H, W) images or (N, C, D, H, W) volumes;
            or, for data too large to hold, an :class:`~medrobust.data.streamed.ImageSource`
            with the same shape and indexing that reads or generates rows on demand
            (``images[a:b]`` is then a tensor of those rows only).
        labels: int64 targets. Classification: (N,) class indices. Multi-label: (N, L) of 0/1.
            Segmentation: (N, *spatial) integer masks.
        bounds: (lo, hi) the range the values live in, in ``units`` (e.g. (0, 1) or HU).
        units: what a value means: ``"intensity"`` for [0, 1] pixels, ``"HU"`` for CT, ...
        task: one of ``TASKS``.
        class_names: one name per class (per label for multi-label).
        spacing: physical voxel size per spatial axis (mm), when known.
        source: where the data came from (a path or a generator description).
        meta: anything else a writer needs (DICOM dataset, NIfTI affine/header, split, checksum).
    """

    images: torch.Tensor | ImageSource
    labels: torch.Tensor
    bounds: tuple[float, float]
    units: str
    task: str
    class_names: list[str]
    spacing: tuple[float, ...] | None = None
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; expected one of {TASKS}")
        if self.images.dim() < 3:
            raise ValueError(
                f"images must be (N, C, *spatial); got shape {tuple(self.images.shape)}"
            )
        if self.labels.shape[0] != self.images.shape[0]:
            raise ValueError(
                f"{self.images.shape[0]} images but {self.labels.shape[0]} labels"
            )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def streamed(self) -> bool:
        """Whether the images are read on demand (:mod:`medrobust.data.streamed`)."""
        return isinstance(self.images, ImageSource)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.images.shape[2:])

    def subset(self, index: torch.Tensor | slice | list[int]) -> ImageData:
        """The same data restricted to ``index`` (metadata shared; a streamed source stays
        streamed)."""
        images = (IndexedSource(self.images, index) if isinstance(self.images, ImageSource)
                  else self.images[index])
        return ImageData(
            images=images,
            labels=self.labels[index],
            bounds=self.bounds,
            units=self.units,
            task=self.task,
            class_names=list(self.class_names),
            spacing=self.spacing,
            source=self.source,
            meta=dict(self.meta),
        )
