"""Tampering a CT volume as CT-GAN does: cut, in-paint, rescale to HU, paste with blending, touch
up, and optionally refine adversarially so that a given detector or segmenter agrees.

Mirsky et al., "CT-GAN", USENIX Security 2019, Section 4.3 (injection/removal pipeline): the cube
centred on the location is cut, equalized and its centre masked; the generator in-paints it with
(inject) or without (remove) a lesion; the result is de-equalized back to HU and pasted into the
scan. Here the paste blends the in-painted hole into its surroundings with a cosine ramp of
``blend`` voxels, and the touch-up adds white noise so that the hole's high-frequency noise matches
the cube's surroundings (a generator's output is smoother than a scanner's).

CT-GAN first resamples the scan to 1 mm isotropic voxels; here the cube is cut in voxels as they
are (the phantoms are 1 mm isotropic), and ``medrobust tamper`` says so when a series' spacing is
not isotropic.

Refinement (not in CT-GAN; the issue's extension): a few steps of targeted dense PGD inside the
hole's cube within an HU budget — towards a detection box at the location (inject) or the
vanishing of detections there (remove) for a detector (:class:`~medrobust.attacks.detection.
DAGDetection`), or towards the lesion label inside the hole / background there for a segmenter.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from medrobust.tamper.cubes import check_location, cut_cube, paste_cube
from medrobust.tamper.generator import ConditionalInpainter

__all__ = ["TamperResult", "blend_weight", "refine", "tamper_volume"]

AIR = -1024.0


@dataclass
class TamperResult:
    """The tampered volume (D, H, W, HU) and what was done."""

    volume: torch.Tensor
    location: tuple[int, int, int]
    mode: str
    cube: int
    hole: int
    info: dict[str, Any] = field(default_factory=dict)


def blend_weight(cube: int, hole: int, blend: int) -> torch.Tensor:
    """``(c, c, c)`` weights: 1 inside the hole shrunk by ``blend``, a cosine ramp to 0 over
    ``blend`` voxels at the hole's border, 0 outside the hole."""
    a = (cube - hole) // 2
    r = torch.arange(cube, dtype=torch.float32)
    # distance inside the hole from its border, per axis
    inside = torch.minimum(r - a + 0.5, a + hole - r - 0.5)
    ramp = ((inside / max(blend, 1)).clamp(0, 1) * math.pi / 2).sin() ** 2
    ramp = torch.where(inside > 0, ramp, torch.zeros_like(ramp))
    return ramp[:, None, None] * ramp[None, :, None] * ramp[None, None, :]


def _noise_sd(x: torch.Tensor) -> torch.Tensor:
    """Robust white-noise estimate: MAD of the residual after a 3^3 mean filter (scaled)."""
    sm = F.avg_pool3d(x[None, None], 3, 1, 1, count_include_pad=False)[0, 0]
    res = (x - sm)[1:-1, 1:-1, 1:-1]
    mad = (res - res.median()).abs().median()
    return 1.4826 * mad / math.sqrt(1 - 1 / 27)


def tamper_volume(
    volume: torch.Tensor,
    location: Sequence[int],
    generator: ConditionalInpainter,
    mode: str,
    *,
    blend: int = 3,
    touch_up: bool = True,
    seed: int = 0,
    bounds: tuple[float, float] = (-1024.0, 3071.0),
) -> TamperResult:
    """Inject or remove a lesion at ``location`` (z, y, x) of ``volume`` (D, H, W, in HU).

    Raises:
        ValueError: an unknown mode, a location outside the volume, a cube of nothing but air
            or a centre that is mostly air (no tissue to tamper with), a generator that returns
            NaN or a constant cube (an empty output).
    """
    if mode not in ("inject", "remove"):
        raise ValueError(f"mode must be 'inject' or 'remove'; got {mode!r}")
    if volume.dim() != 3:
        raise ValueError(f"volume must be (slices, rows, columns); got {tuple(volume.shape)}")
    loc = check_location(location, volume.shape)
    c, h = generator.cube, generator.hole
    block = cut_cube(volume.float(), loc, c, AIR)
    if float((block > -500).float().mean()) == 0.0:
        raise ValueError(
            f"the {c}^3 cube around {list(loc)} holds only air (no voxel above -500 HU): "
            "nothing to in-paint there; choose a location inside the body"
        )
    a = (c - h) // 2
    tissue = float((block[a:a + h, a:a + h, a:a + h] > -500).float().mean())
    if tissue < 0.5:
        raise ValueError(
            f"the {h}^3 centre around {list(loc)} is mostly air ({100 * (1 - tissue):.0f}% of "
            "its voxels below -500 HU): the location must lie inside the body"
        )
    out = generator.inpaint(block[None, None], mode == "inject")[0, 0]
    w = blend_weight(c, h, blend)
    core = w > 0
    if not torch.isfinite(out).all() or float(out[core].std()) == 0.0:
        raise ValueError("the generator returned an empty (constant or NaN) cube; is it trained?")
    filled = out
    info: dict[str, Any] = {}
    if touch_up:
        target = _noise_sd(block)
        have = _noise_sd(out)
        add = float((target**2 - have**2).clamp_min(0).sqrt())
        g = torch.Generator().manual_seed(seed)
        filled = out + add * torch.randn(out.shape, generator=g)
        info["noise_added_hu"] = add
    filled = filled.clamp(*bounds)
    tampered = paste_cube(volume.float(), filled, loc, w).clamp(*bounds)
    info["max_change_hu"] = float((tampered - volume.float()).abs().max())
    return TamperResult(tampered, loc, mode, c, h, info)


def _hole_box(loc: Sequence[int], hole: int, shape: Sequence[int]) -> list[float]:
    """The box of side ``hole`` centred on ``loc``, clipped to the volume."""
    lo = [max(0, v - hole // 2) for v in loc]
    hi = [min(s, v - hole // 2 + hole) for v, s in zip(loc, shape, strict=True)]
    return [float(v) for v in lo + hi]


def refine(
    result: TamperResult,
    model: Any,
    *,
    eps: float = 20.0,
    steps: int = 10,
    lesion_box: Sequence[float] | None = None,
    segment: Callable[[torch.Tensor], torch.Tensor] | None = None,
    bounds: tuple[float, float] = (-1024.0, 3071.0),
) -> TamperResult:
    """A few steps of targeted dense PGD inside the hole's cube, within ``eps`` HU (L-inf), so
    that ``model`` agrees with the tampering.

    ``model`` is a :class:`~medrobust.models.detector.Detector` (DAG on detection: targeted to a
    box over the hole for inject, the boxes there vanishing for remove) or, with ``segment`` (a
    differentiable ``(N, 1, D, H, W) HU -> (N, K, D, H, W)`` logits function), a segmenter
    (per-voxel cross-entropy towards the lesion class in a ball of the hole for inject, towards
    background in the hole for remove; signed-gradient steps of ``2.5 * eps / steps``)."""
    from medrobust.models.detector import Detector

    vol = result.volume
    shape = tuple(vol.shape)
    loc = result.location
    # the lesion's box: by default half the hole's side (the hole leaves a margin around it)
    box = (list(lesion_box) if lesion_box is not None
           else _hole_box(loc, max(2, result.hole // 2), shape))
    mask = torch.zeros(shape)
    lo = [int(math.floor(v)) for v in _hole_box(loc, result.hole, shape)[:3]]
    hi = [int(math.ceil(v)) for v in _hole_box(loc, result.hole, shape)[3:]]
    mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = 1.0
    x = vol[None, None].float()
    info = dict(result.info)
    if isinstance(model, Detector):
        from medrobust.attacks.detection import DAGDetection

        gamma = max(eps / 4.0, 1e-3)
        att = DAGDetection(gamma=gamma, max_iter=steps, eps=eps)
        boxes = [{"boxes": torch.tensor([box]), "labels": torch.tensor([0])}]
        if result.mode == "inject":
            r = att(model, x, [{"boxes": torch.zeros((0, 6)), "labels": torch.zeros(0)}],
                    target=boxes, mask=mask[None, None])
        else:
            r = att(model, x, boxes, mask=mask[None, None])
        adv = r.adversarial
        info["refine"] = {"model": "detector", "success": bool(r.success[0]),
                          "linf_hu": float(r.perturbation_norms["linf"][0])}
    elif segment is not None:
        zz, yy, xx = torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in shape],
                                    indexing="ij")
        dist = ((zz - loc[0]) ** 2 + (yy - loc[1]) ** 2 + (xx - loc[2]) ** 2).sqrt()
        target = torch.zeros(shape, dtype=torch.long)
        if result.mode == "inject":
            target[dist <= result.hole / 4] = 1
        sel = mask.bool()
        alpha = 2.5 * eps / steps
        adv = x.clone()
        for _ in range(steps):
            adv.requires_grad_(True)
            logits = segment(adv)
            loss = F.cross_entropy(logits, target[None], reduction="none")[0][sel].mean()
            (grad,) = torch.autograd.grad(loss, adv)
            with torch.no_grad():
                adv = adv - alpha * grad.sign() * mask
                adv = x + (adv - x).clamp(-eps, eps)
                adv = adv.clamp(*bounds)
        adv = adv.detach()
        with torch.no_grad():
            pred = segment(adv).argmax(1)[0]
        agree = float((pred[sel] == target[sel]).float().mean())
        info["refine"] = {"model": "segmenter", "agreement_in_hole": agree,
                          "linf_hu": float((adv - x).abs().max())}
    else:
        raise TypeError("refine needs a medrobust Detector, or segment= for a segmenter")
    return TamperResult(adv[0, 0].detach(), loc, result.mode, result.cube, result.hole, info)
