"""CT-GAN's in-painting generator: a conditional 3D U-Net that fills the centre of a cube.

Mirsky, Mahler, Shelef, Elovici, "CT-GAN: Malicious Tampering of 3D Medical Imagery using Deep
Learning", USENIX Security 2019: a cube around the chosen location is cut from the scan, its
centre is masked out, and a pix2pix-style conditional GAN (Isola et al., CVPR 2017; a U-Net
generator and a PatchGAN discriminator, adversarial + 100 x L1 loss) in-paints it — with a lesion
(injection) or with healthy tissue (removal). The paper trains one GAN per task; here one generator
takes the task as a condition channel (1 = inject, 0 = remove), as the two share everything else.

The generator's input is ``[masked cube, hole mask, condition]`` in the equalized space
(:class:`~medrobust.tamper.equalize.HistogramEqualizer`, [-1, 1]); its output is the whole cube
(tanh). The equalizer's quantiles are a buffer of the module, so the generator folder (weights +
``model.json``, kind ``"inpainting-generator"``) holds everything needed to go back to HU.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from medrobust.tamper.equalize import HistogramEqualizer

__all__ = [
    "GENERATOR_ARCHITECTURES",
    "ConditionalInpainter",
    "PatchDiscriminator",
    "build_inpainter",
    "load_generator",
    "save_generator",
]

KIND = "inpainting-generator"
"""The ``kind`` of a generator folder (what ``model.json`` says it holds)."""


class ConditionalInpainter(nn.Module):
    """The generator (MONAI 3D U-Net, instance norm, residual units) with its equalizer.

    Args:
        cube: the cube's side in voxels (divisible by 4).
        hole: the side of the masked centre (CT-GAN: half the cube).
        channels: the U-Net's channels per level.
        levels: the equalizer's number of quantiles.
    """

    def __init__(
        self, cube: int = 32, hole: int = 16, channels: tuple[int, ...] = (16, 32, 64),
        levels: int = 1024,
    ) -> None:
        super().__init__()
        from monai.networks.nets import UNet

        if cube < 8 or cube % 4:
            raise ValueError(f"cube must be a multiple of 4, at least 8; got {cube}")
        if not 2 <= hole < cube:
            raise ValueError(f"hole must lie in [2, cube); got {hole} for cube {cube}")
        self.cube, self.hole = int(cube), int(hole)
        self.net: nn.Module = UNet(
            spatial_dims=3, in_channels=3, out_channels=1, channels=list(channels),
            strides=[2] * (len(channels) - 1), num_res_units=1, norm="instance",
        )
        self.quantiles: torch.Tensor
        self.register_buffer("quantiles", torch.linspace(-1024.0, 3071.0, int(levels)))

    @property
    def equalizer(self) -> HistogramEqualizer:
        return HistogramEqualizer(self.quantiles)

    def set_equalizer(self, eq: HistogramEqualizer) -> None:
        q = eq.quantiles.to(self.quantiles)
        if q.numel() != self.quantiles.numel():
            q = torch.quantile(q, torch.linspace(0, 1, self.quantiles.numel()).to(q))
        self.quantiles.copy_(q)

    def hole_mask(self, device: torch.device | None = None) -> torch.Tensor:
        """``(1, 1, c, c, c)``: 1 in the centred hole."""
        m = torch.zeros((1, 1, self.cube, self.cube, self.cube), device=device)
        a = (self.cube - self.hole) // 2
        b = a + self.hole
        m[..., a:b, a:b, a:b] = 1.0
        return m

    def forward(self, masked: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """``masked``: (N, 1, c, c, c) equalized cubes (hole zeroed); ``condition``: (N,) 0/1."""
        n = masked.shape[0]
        hole = self.hole_mask(masked.device).expand(n, -1, -1, -1, -1)
        cond = condition.to(masked).view(n, 1, 1, 1, 1).expand_as(masked)
        return torch.tanh(self.net(torch.cat([masked, hole, cond], 1)))

    @torch.no_grad()
    def inpaint(self, cube_hu: torch.Tensor, inject: bool | torch.Tensor) -> torch.Tensor:
        """In-paint HU cubes ``(N, 1, c, c, c)``: equalize, mask the hole, generate, dequalize.

        Returns the generated cubes in HU (the whole cube; the caller pastes the hole back)."""
        if cube_hu.dim() != 5 or tuple(cube_hu.shape[2:]) != (self.cube,) * 3:
            raise ValueError(
                f"cubes must be (N, 1, {self.cube}, {self.cube}, {self.cube}); got "
                f"{tuple(cube_hu.shape)}"
            )
        eq = self.equalizer
        dev = self.quantiles.device
        z = eq.equalize(cube_hu.to(dev).float())
        z = z * (1 - self.hole_mask(dev))
        cond = torch.as_tensor(inject, dtype=torch.float32, device=dev).expand(cube_hu.shape[0])
        out = self(z, cond)
        return eq.dequalize(out).to(cube_hu.device)


class PatchDiscriminator(nn.Module):
    """pix2pix's PatchGAN in 3D: strided 4^3 convolutions, one logit per patch, judging
    ``[generator input, cube]``."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        w = width
        self.net = nn.Sequential(
            nn.Conv3d(4, w, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv3d(w, 2 * w, 4, 2, 1), nn.InstanceNorm3d(2 * w), nn.LeakyReLU(0.2),
            nn.Conv3d(2 * w, 1, 3, 1, 1),
        )

    def forward(self, masked: torch.Tensor, hole: torch.Tensor, cond: torch.Tensor,
                cube: torch.Tensor) -> torch.Tensor:
        n = cube.shape[0]
        c = cond.to(cube).view(n, 1, 1, 1, 1).expand_as(cube)
        return self.net(torch.cat([masked, hole.expand_as(cube), c, cube], 1))


def build_inpainter(
    cube: int = 32, hole: int = 16, channels: list[int] | None = None, levels: int = 1024
) -> ConditionalInpainter:
    """The registered generator architecture ``"ctgan-unet3d"``."""
    return ConditionalInpainter(cube, hole, tuple(channels or (16, 32, 64)), levels)


GENERATOR_ARCHITECTURES = {"ctgan-unet3d": build_inpainter}


def save_generator(
    directory: str | os.PathLike[str],
    generator: ConditionalInpainter,
    *,
    arch_args: Mapping[str, Any],
    data: Mapping[str, Any] | None = None,
    training: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> None:
    """Save a generator folder (``model.json`` kind ``"inpainting-generator"`` + safetensors)."""
    from medrobust._kindstore import write_kind_folder

    meta = {
        "task": "inpainting",
        "input": {"units": "HU", "cube": generator.cube, "hole": generator.hole},
        "conditions": {"inject": 1, "remove": 0},
        "data": None if data is None else dict(data),
        "training": None if training is None else dict(training),
    }
    write_kind_folder(directory, generator, kind=KIND, architecture="ctgan-unet3d",
                      arch_args=arch_args, meta=meta, overwrite=overwrite)


def load_generator(
    directory: str | os.PathLike[str], device: torch.device | str | None = None
) -> ConditionalInpainter:
    """Load a generator folder (registered architecture only; ``ModelError`` for a folder of
    another kind, e.g. a classifier or a detector)."""
    from medrobust._kindstore import read_kind_folder

    module, _ = read_kind_folder(directory, KIND, GENERATOR_ARCHITECTURES)
    if device is not None:
        module.to(device)
    assert isinstance(module, ConditionalInpainter)
    return module
