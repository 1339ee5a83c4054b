"""CT tampering as in CT-GAN (Mirsky et al., USENIX Security 2019): inject or remove a lesion.

* :mod:`~medrobust.tamper.generator` — the conditional 3D in-painting generator and its folder;
* :mod:`~medrobust.tamper.equalize` — CT-GAN's histogram equalization (HU <-> [-1, 1]);
* :mod:`~medrobust.tamper.training` — training cubes and the pix2pix training loop;
* :mod:`~medrobust.tamper.inpaint` — cut, in-paint, paste with blending, touch up, refine;
* :mod:`~medrobust.tamper.dicom_out` — the tampered series, marked as derived;
* :mod:`~medrobust.tamper.report` — before/after slices with the models' outputs.
"""

from __future__ import annotations

from medrobust.tamper.equalize import HistogramEqualizer
from medrobust.tamper.generator import (
    ConditionalInpainter,
    build_inpainter,
    load_generator,
    save_generator,
)
from medrobust.tamper.inpaint import TamperResult, refine, tamper_volume

__all__ = [
    "ConditionalInpainter",
    "HistogramEqualizer",
    "TamperResult",
    "build_inpainter",
    "load_generator",
    "refine",
    "save_generator",
    "tamper_volume",
]
