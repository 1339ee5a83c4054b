"""Training CT-GAN's in-painting generator (pix2pix in 3D, conditional on inject/remove).

Training cubes (Mirsky et al. 2019, Section 4.2): *injection* cubes are centred on lesions (here
the centroid of each phantom's lesion mask, or the coordinates given for a user's series);
*removal* cubes are centred on random locations inside the body of lesion-free volumes (healthy
tissue). Both are equalized with one histogram equalizer fitted on all training cubes. Loss
(Isola et al., CVPR 2017): the generator minimizes ``BCE(D(G(x)), 1) + l1_weight * |G(x) - y|``
(``l1_weight`` = 100 as in pix2pix and CT-GAN); the PatchGAN discriminator minimizes
``(BCE(D(y), 1) + BCE(D(G(x)), 0)) / 2``; Adam, lr 2e-4, betas (0.5, 0.999).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from medrobust.data.phantoms import make_phantoms
from medrobust.tamper.cubes import cut_cube
from medrobust.tamper.equalize import HistogramEqualizer
from medrobust.tamper.generator import ConditionalInpainter, PatchDiscriminator, build_inpainter

__all__ = ["InpainterTraining", "phantom_cubes", "series_cubes", "train_inpainter"]

AIR = -1024.0


def _body_centres(vol: torch.Tensor, k: int, cube: int, g: torch.Generator) -> list[list[int]]:
    """``k`` random voxels of soft tissue (> -300 HU) at least cube/4 from every edge."""
    m = cube // 4
    inner = vol[m:-m, m:-m, m:-m] > -300
    idx = inner.nonzero()
    if idx.shape[0] == 0:
        return []
    pick = idx[torch.randint(idx.shape[0], (k,), generator=g)] + m
    return pick.tolist()


def series_cubes(
    volumes: Sequence[torch.Tensor],
    lesions: Sequence[Sequence[Sequence[int]]] | None = None,
    cube: int = 32,
    healthy_per_volume: int = 4,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cubes ``(M, 1, c, c, c)`` in HU and conditions ``(M,)`` (1 inject, 0 remove) from volumes
    ``(D, H, W)`` in HU: one injection cube per lesion coordinate (z, y, x) of ``lesions[i]``,
    ``healthy_per_volume`` removal cubes at random body locations of volumes without lesions."""
    g = torch.Generator().manual_seed(seed)
    cubes, conds = [], []
    for i, vol in enumerate(volumes):
        les = list(lesions[i]) if lesions is not None and i < len(lesions) else []
        for loc in les:
            cubes.append(cut_cube(vol, [int(v) for v in loc], cube, AIR))
            conds.append(1.0)
        if not les:
            for loc in _body_centres(vol, healthy_per_volume, cube, g):
                cubes.append(cut_cube(vol, loc, cube, AIR))
                conds.append(0.0)
    if not cubes:
        raise ValueError("no training cubes: the volumes hold no soft tissue and no lesions")
    return torch.stack(cubes)[:, None].float(), torch.tensor(conds)


def phantom_cubes(
    n: int, size: int = 48, cube: int = 32, seed: int = 0,
    lesion_radius: tuple[float, float] = (0.08, 0.13), **kw: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training cubes from ``n`` 3D CT phantoms (half with a lesion; see :func:`series_cubes`)."""
    data = make_phantoms(n, size, dim=3, seed=seed, units="HU", task="segmentation",
                         lesion_fraction=0.5, lesion_radius=lesion_radius, **kw)
    vols = [v[0] for v in data.images]
    lesions: list[list[list[int]]] = []
    for m in data.labels:
        nz = m.nonzero().float()
        lesions.append([nz.mean(0).round().long().tolist()] if nz.numel() else [])
    return series_cubes(vols, lesions, cube, healthy_per_volume=1, seed=seed)


@dataclass
class InpainterTraining:
    generator: ConditionalInpainter
    arch_args: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)


def train_inpainter(
    cubes: torch.Tensor,
    conditions: torch.Tensor,
    *,
    steps: int = 200,
    batch_size: int = 8,
    lr: float = 2e-4,
    l1_weight: float = 100.0,
    seed: int = 0,
    arch_args: dict[str, Any] | None = None,
    log_every: int = 50,
    on_log: Callable[[dict[str, float]], None] | None = None,
) -> InpainterTraining:
    """Train the conditional in-painting generator on HU ``cubes`` ``(M, 1, c, c, c)`` with
    ``conditions`` ``(M,)`` (see the module docstring). Deterministic for a seed."""
    from medrobust.training import seeded

    if cubes.dim() != 5 or cubes.shape[1] != 1 or len(set(cubes.shape[2:])) != 1:
        raise ValueError(f"cubes must be (M, 1, c, c, c); got {tuple(cubes.shape)}")
    if conditions.shape != (cubes.shape[0],):
        raise ValueError(
            f"{cubes.shape[0]} cubes but conditions of shape {tuple(conditions.shape)}"
        )
    if steps < 1 or batch_size < 1 or not (lr > 0 and math.isfinite(lr)):
        raise ValueError("steps and batch_size must be >= 1 and lr > 0")
    c = int(cubes.shape[2])
    args = {"cube": c, "hole": c // 2, **(arch_args or {})}
    args["cube"] = c
    with seeded(seed):
        gen = build_inpainter(**args)
        disc = PatchDiscriminator()
    eq = HistogramEqualizer.fit(cubes, levels=int(gen.quantiles.numel()), seed=seed)
    gen.set_equalizer(eq)
    real_all = eq.equalize(cubes.float())
    hole = gen.hole_mask()
    opt_g = torch.optim.Adam(gen.net.parameters(), lr=lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(disc.parameters(), lr=lr, betas=(0.5, 0.999))
    g = torch.Generator().manual_seed(seed)
    history: list[dict[str, float]] = []
    gen.train()
    disc.train()
    t0 = time.perf_counter()
    acc = {"g_adv": 0.0, "g_l1": 0.0, "d": 0.0}
    for step in range(1, steps + 1):
        idx = torch.randint(cubes.shape[0], (min(batch_size, cubes.shape[0]),), generator=g)
        real = real_all[idx]
        cond = conditions[idx].float()
        masked = real * (1 - hole)
        fake = gen(masked, cond)
        # discriminator
        d_real = disc(masked, hole, cond, real)
        d_fake = disc(masked, hole, cond, fake.detach())
        loss_d = 0.5 * (F.binary_cross_entropy_with_logits(d_real, torch.ones_like(d_real))
                        + F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake)))
        opt_d.zero_grad()
        loss_d.backward()
        opt_d.step()
        # generator
        d_fake = disc(masked, hole, cond, fake)
        adv = F.binary_cross_entropy_with_logits(d_fake, torch.ones_like(d_fake))
        l1 = (fake - real).abs().mean()
        loss_g = adv + l1_weight * l1
        if not torch.isfinite(loss_g):
            raise FloatingPointError(f"generator training diverged at step {step}")
        opt_g.zero_grad()
        loss_g.backward()
        opt_g.step()
        acc["g_adv"] += float(adv.detach())
        acc["g_l1"] += float(l1.detach())
        acc["d"] += float(loss_d.detach())
        if step % log_every == 0 or step == steps:
            k = log_every if step % log_every == 0 else step % log_every
            rec = {"step": float(step), **{key: v / k for key, v in acc.items()},
                   "time_s": time.perf_counter() - t0}
            history.append(rec)
            if on_log is not None:
                on_log(rec)
            acc = dict.fromkeys(acc, 0.0)
    gen.eval()
    return InpainterTraining(gen, args, history)
