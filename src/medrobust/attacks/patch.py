"""Adversarial patch: one small image that, pasted anywhere, changes the model's decision.

Brown, Mané, Roy, Abadi & Gilmer, "Adversarial Patch", NIPS 2017 workshop (arXiv:1712.09665).
The patch ``p`` is trained with expectation over transformation (EOT; Athalye et al., ICML 2018):
``max_p E_{x, t, l} log Pr(y_hat | A(p, x, l, t))`` where ``A`` pastes the patch transformed by
``t`` (scale, rotation; here also brightness and contrast, as printed patches see lighting) at a
random location ``l`` on image ``x``. Targeted (``y_hat`` the target class) or untargeted (the
log-probability of the true class is minimized). Each step draws a fresh transformation and
location per image, and the patch ascends the sign of the gradient summed over the batch
(its values stay inside the bounds).

A patch is not an eps-ball: its *area* (a fraction of the image) is the budget. Called as an
attack it fits on the batch and pastes the patch at a random location with its nominal scale and
no rotation; the base class enforces the bounds and, when a mask is given, the region (the patch is
cut to it). 2-D images only. :meth:`AdversarialPatch.fit` returns a :class:`Patch` (``apply``,
``success_rate`` on held-out images under fresh transformations, ``save``/``load`` as safetensors,
``save_image`` as PNG).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medrobust.attacks.base import Attack, AttackContext, RunOutput, _new_generator
from medrobust.models.base import Model, check_capabilities

FORMAT = "medrobust-patch"

__all__ = ["AdversarialPatch", "Patch", "paste"]


@dataclass(frozen=True)
class EOT:
    """The distribution of transformations (Brown et al.'s scale, rotation and location, with
    brightness and contrast): scale factor range, max rotation in degrees, brightness shift as a
    fraction of the range, contrast factor range."""

    scale: tuple[float, float] = (0.8, 1.2)
    rotation: float = 22.5
    brightness: float = 0.1
    contrast: tuple[float, float] = (0.8, 1.2)


def paste(x: torch.Tensor, patch: torch.Tensor, bounds: tuple[float, float], generator:
          torch.Generator, eot: EOT | None) -> torch.Tensor:
    """Paste ``patch`` ``(C, h, w)`` on every image of ``x`` ``(N, C, H, W)`` at a random location
    (whole patch inside the image), transformed by a draw from ``eot`` (``None``: nominal scale,
    no rotation, no lighting change). Differentiable in ``patch``."""
    n, c, hgt, wid = x.shape
    ph, pw = patch.shape[-2:]
    lo, hi = bounds
    dev, dt = x.device, x.dtype

    def u(a: float, b: float) -> torch.Tensor:
        return (a + (b - a) * torch.rand(n, generator=generator, dtype=torch.float64)).to(dev, dt)

    if eot is None:
        s = torch.ones(n, device=dev, dtype=dt)
        ang = torch.zeros(n, device=dev, dtype=dt)
        b = torch.zeros(n, device=dev, dtype=dt)
        con = torch.ones(n, device=dev, dtype=dt)
    else:
        s, ang = u(*eot.scale), u(-eot.rotation, eot.rotation) * math.pi / 180
        b, con = u(-eot.brightness, eot.brightness) * (hi - lo), u(*eot.contrast)
    # the patch, lit, on a canvas the size of the image (centered), with its support mask
    mid = (lo + hi) / 2
    p = patch.unsqueeze(0).to(dev, dt)
    lit = ((p - mid) * con.view(n, 1, 1, 1) + mid + b.view(n, 1, 1, 1)).clamp(lo, hi)
    top, left = (hgt - ph) // 2, (wid - pw) // 2
    canvas = F.pad(lit, (left, wid - pw - left, top, hgt - ph - top))
    support = F.pad(torch.ones(n, 1, ph, pw, device=dev, dtype=dt),
                    (left, wid - pw - left, top, hgt - ph - top))
    # scale, rotate, translate (the half-extent of the rotated, scaled patch stays inside)
    ext_h = s * (ph * ang.cos().abs() + pw * ang.sin().abs()) / 2
    ext_w = s * (pw * ang.cos().abs() + ph * ang.sin().abs()) / 2
    room_h = (hgt / 2 - ext_h).clamp_min(0)
    room_w = (wid / 2 - ext_w).clamp_min(0)
    ty = (2 * torch.rand(n, generator=generator, dtype=torch.float64).to(dev, dt) - 1) * room_h
    tx = (2 * torch.rand(n, generator=generator, dtype=torch.float64).to(dev, dt) - 1) * room_w
    # affine_grid maps output coordinates to input ones: in = R(-a)/s (out - t), normalized
    cos, sin = ang.cos() / s, ang.sin() / s
    txn, tyn = tx / (wid / 2), ty / (hgt / 2)
    ar = wid / hgt
    theta = torch.stack([
        torch.stack([cos, sin / ar, -(cos * txn + sin / ar * tyn)], 1),
        torch.stack([-sin * ar, cos, -(-sin * ar * txn + cos * tyn)], 1),
    ], 1)
    grid = F.affine_grid(theta, [n, c, hgt, wid], align_corners=False)
    moved = F.grid_sample(canvas, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    m = F.grid_sample(support, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return (x * (1 - m) + moved * m).clamp(lo, hi)


@dataclass
class Patch:
    """A trained adversarial patch.

    Attributes:
        patch: ``(C, h, w)`` in the bounds' units.
        bounds: the inputs' range.
        area: the patch's area as a fraction of the image's.
        target: the target class, or ``None`` (untargeted).
        eot: the transformations it was trained under.
        info: how it was trained.
    """

    patch: torch.Tensor
    bounds: tuple[float, float]
    area: float
    target: int | None = None
    eot: EOT = field(default_factory=EOT)
    info: dict[str, Any] = field(default_factory=dict)

    def apply(self, inputs: torch.Tensor, seed: int = 0, transform: bool = False
              ) -> torch.Tensor:
        """The images with the patch pasted at random locations (``transform=True``: also a
        random draw of the training transformations)."""
        if inputs.dim() != 4 or inputs.shape[1] != self.patch.shape[0]:
            raise ValueError(f"inputs must be (N, {self.patch.shape[0]}, H, W) images; got "
                             f"{tuple(inputs.shape)}")
        g = torch.Generator().manual_seed(int(seed))
        with torch.no_grad():
            return paste(inputs, self.patch, self.bounds, g, self.eot if transform else None)

    def success_rate(self, model: Model, inputs: torch.Tensor, labels: Any, seed: int = 1,
                     draws: int = 4) -> float:
        """Fraction of (image, draw) pairs, over ``draws`` fresh transformations and locations,
        classified as the target (targeted) or not as the label (untargeted)."""
        y = torch.as_tensor(labels).long().to(model.device)
        hits = []
        for d in range(draws):
            pred = model.predict(self.apply(inputs, seed=seed * 1000 + d, transform=True))
            hits.append(pred == self.target if self.target is not None else pred != y)
        return float(torch.stack(hits).float().mean())

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write a ``.safetensors`` file (the patch; the rest as JSON metadata)."""
        from safetensors.torch import save_file

        meta = {"format": FORMAT, "bounds": json.dumps(list(self.bounds)),
                "area": repr(self.area), "target": "" if self.target is None else str(self.target),
                "eot": json.dumps(self.eot.__dict__), "info": json.dumps(self.info, default=str)}
        save_file({"patch": self.patch.detach().cpu().contiguous()}, str(path), metadata=meta)
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Patch:
        """Read a file written by :meth:`save` (tensors only)."""
        from safetensors import SafetensorError, safe_open

        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no such patch file")
        try:
            with safe_open(str(p), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != FORMAT:
                    raise ValueError(f"{p}: not a medrobust patch (format {meta.get('format')!r})")
                t = f.get_tensor("patch")
            e = json.loads(meta["eot"])
            eot = EOT(tuple(e["scale"]), float(e["rotation"]), float(e["brightness"]),
                      tuple(e["contrast"]))
            b = json.loads(meta["bounds"])
            return cls(t, (float(b[0]), float(b[1])), float(meta["area"]),
                       int(meta["target"]) if meta.get("target") else None, eot,
                       json.loads(meta.get("info", "{}")))
        except (SafetensorError, KeyError, json.JSONDecodeError, OSError) as err:
            raise ValueError(f"{p}: corrupt patch file ({err})") from None

    def save_image(self, path: str | os.PathLike[str]) -> Path:
        """Write the patch as an 8-bit PNG (its bounds mapped to 0..255)."""
        from PIL import Image

        lo, hi = self.bounds
        a = ((self.patch.detach().cpu().float() - lo) / (hi - lo)).clamp(0, 1)
        img = (a.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        mode = "L" if img.shape[2] == 1 else "RGB"
        Image.fromarray(img[:, :, 0] if mode == "L" else img[:, :, :3], mode=mode).save(path)
        return Path(path)


class AdversarialPatch(Attack):
    """Adversarial patch (Brown et al., 2017) trained with EOT; targeted or untargeted.

    Args:
        area: the patch's area as a fraction of the image (a square patch).
        steps: optimization steps (each on a mini-batch with fresh transformations).
        batch_size: images per step.
        step_size: the sign-gradient step, as a fraction of the bounds' range.
        eot: the transformation distribution (:class:`EOT`).
        loss: ``"ce"`` or ``"margin"``.
        seed, generator: the initial patch, batches, transformations and locations.
    """

    name = "patch"
    requires_gradients = True
    spatial_ranks = (2,)

    def __init__(
        self,
        area: float = 0.1,
        *,
        steps: int = 200,
        batch_size: int = 32,
        step_size: float = 0.01,
        eot: EOT | None = None,
        loss: str = "ce",
        seed: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(loss=loss, seed=seed, generator=generator)
        if not 0 < area < 1:
            raise ValueError(f"area must be a fraction of the image in (0, 1); got {area!r}")
        for name, v in (("steps", steps), ("batch_size", batch_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer; got {v!r}")
        if not step_size > 0:
            raise ValueError(f"step_size must be > 0; got {step_size!r}")
        self.area = float(area)
        self.steps = steps
        self.batch_size = batch_size
        self.step_size = float(step_size)
        self.eot = eot if eot is not None else EOT()

    def config(self) -> dict[str, Any]:
        out = super().config()
        out["eot"] = self.eot.__dict__
        return out

    def fit(self, model: Model, inputs: torch.Tensor, labels: Any,
            target: int | None = None) -> Patch:
        """Train a patch on ``inputs`` (towards class ``target`` if given)."""
        if not isinstance(model, Model):
            raise TypeError(f"model must be a medrobust model; got {type(model).__name__}")
        check_capabilities(self, model)
        model.check_inputs(inputs)
        if inputs.dim() != 4:
            raise ValueError(f"AdversarialPatch works on 2-D images (N, C, H, W); got shape "
                             f"{tuple(inputs.shape)}")
        n = int(inputs.shape[0])
        y = model.check_labels(labels, n)
        x = inputs.detach().to(model.device, model.work_dtype)
        gen, _ = _new_generator(self.seed, self.generator)
        t = None if target is None else torch.full((n,), int(target), dtype=torch.long)
        with model.attack_mode():
            k, spent = model.num_outputs(x)
            model.check_label_values(y, None, k)
            if t is not None and not 0 <= int(target) < k:  # type: ignore[arg-type]
                raise ValueError(f"target must lie in [0, {k - 1}]; got {target}")
            dev = x.device
            crit = model.default_criterion(t is not None).bind(
                y.to(dev), None if t is None else t.to(dev), self.loss)
            ctx = AttackContext(model, x, y.to(dev), None if t is None else t.to(dev), crit,
                                None, k, gen)
            ctx.forward_passes = spent
            p = self._train(ctx, ctx.all_index())
        return Patch(p.cpu(), model.bounds, self.area, target, self.eot,
                     {"steps": self.steps, "n_fit": n, "forward_passes": ctx.forward_passes})

    def side(self, hgt: int, wid: int) -> tuple[int, int]:
        """The patch's side in pixels for an image of ``hgt x wid``."""
        s = max(1, int(round(math.sqrt(self.area * hgt * wid))))
        return min(s, hgt), min(s, wid)

    def _train(self, ctx: AttackContext, idx: torch.Tensor) -> torch.Tensor:
        x = ctx.x
        lo, hi = ctx.bounds
        ph, pw = self.side(x.shape[2], x.shape[3])
        patch = lo + (hi - lo) * ctx.rand(x.shape[1], ph, pw).to(x.dtype)
        for _ in range(self.steps):
            pick = torch.randint(0, idx.numel(), (min(self.batch_size, idx.numel()),),
                                 generator=ctx.generator).to(idx.device)
            b = idx[pick]
            pr = patch.detach().requires_grad_(True)
            with torch.enable_grad():
                xp = paste(x[b], pr, ctx.bounds, ctx.generator, self.eot)
                _, _, gx = ctx.value_and_grad(xp.detach(), b)
                (gp,) = torch.autograd.grad(xp, pr, gx)
            patch = (patch + self.step_size * (hi - lo) * gp.sign()).clamp(lo, hi)
        return patch.detach()

    def run(self, ctx: AttackContext) -> RunOutput:
        adv = ctx.x.clone()
        groups = [None] if ctx.target is None else sorted(set(ctx.target.tolist()))
        for g in groups:
            idx = ctx.all_index() if g is None else (ctx.target == g).nonzero().flatten()
            p = self._train(ctx, idx)
            adv[idx] = paste(ctx.x[idx], p, ctx.bounds, ctx.generator, None)
        return RunOutput(adv, None, extra={"area": self.area})
