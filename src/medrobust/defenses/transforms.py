"""Input-transform defenses: smoothing, compression, quantization, TV minimization, randomization.

Each is a :class:`~medrobust.defenses.base.Defense` working on 2D images ``(N, C, H, W)`` and, where
it makes sense, 3D volumes ``(N, C, D, H, W)``. Transforms defined on ``[0, 1]`` intensities (JPEG,
bit depth, TV minimization) act on the bounds-normalized view ``(x - lo) / (hi - lo)`` and map back,
so a model in Hounsfield units is defended the same way as one in ``[0, 1]``.

These defenses are known to fall to adaptive attacks (Athalye et al., ICML 2018); evaluate them
with ``bpda=True`` / ``eot=N`` attacks, never with the naive attack alone.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from medrobust.defenses.base import Bounds, Defense, DefenseError, from_unit, to_unit


def _spatial(x: torch.Tensor, name: str, ranks: tuple[int, ...] = (1, 2, 3)) -> int:
    r = x.dim() - 2
    if r not in ranks:
        raise DefenseError(f"{name}: works on inputs with {ranks} spatial dimensions; got shape "
                           f"{tuple(x.shape)}")
    return r


def _odd_size(size: int, name: str) -> int:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1 or size % 2 == 0:
        raise DefenseError(f"{name}: size must be an odd positive integer; got {size!r}")
    return size


# --------------------------------------------------------------------------- smoothing
class MedianSmoothing(Defense):
    """Median filter over a ``size``-wide window (2D or 3D by the input's rank), edges replicated.

    The median smoothing squeezer of Xu, Evans & Qi, "Feature Squeezing: Detecting Adversarial
    Examples in Deep Neural Networks", NDSS 2018. Autograd gives a (sparse) gradient through the
    selected element. BPDA's backward pass is ``approximation``: ``"median"`` (autograd through
    the median's selection, the default: the strongest in our measurements), ``"mean"`` (a box
    filter of the same size) or ``"identity"``.
    """

    name = "median"
    differentiable = False

    def __init__(self, size: int = 3, approximation: str = "median") -> None:
        super().__init__()
        self.size = _odd_size(size, self.name)
        if approximation not in ("median", "mean", "identity"):
            raise DefenseError(f"{self.name}: approximation must be 'median', 'mean' or "
                               f"'identity'; got {approximation!r}")
        self.approximation = approximation
        self.options = {"size": self.size, "approximation": approximation}

    def backward_approximation(self, x: torch.Tensor, bounds: Bounds = (0.0, 1.0)) -> torch.Tensor:
        if self.approximation == "identity":
            return x
        if self.approximation == "median":
            return self.transform(x, bounds)
        r = _spatial(x, self.name)
        pool = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[r]
        p = self.size // 2
        return pool(F.pad(x, (p,) * (2 * r), mode="replicate"), self.size, stride=1)

    def transform(self, x: torch.Tensor, bounds: Bounds) -> torch.Tensor:
        r = _spatial(x, self.name)
        k, p = self.size, self.size // 2
        if k == 1:
            return x
        xp = x
        if r == 1:
            xp = F.pad(x, (p, p), mode="replicate")
        else:
            xp = F.pad(x, (p,) * (2 * r), mode="replicate")
        for axis in range(2, 2 + r):
            xp = xp.unfold(axis, k, 1)
        return xp.reshape(*x.shape, -1).median(dim=-1).values


def _gaussian_kernel(sigma: float, truncate: float, dtype: torch.dtype,
                     device: torch.device) -> torch.Tensor:
    radius = int(truncate * sigma + 0.5)
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return (k / k.sum()).to(device=device, dtype=dtype)


class GaussianSmoothing(Defense):
    """Separable Gaussian blur with standard deviation ``sigma`` pixels (voxels), truncated at
    ``truncate`` sigmas as in ``scipy.ndimage.gaussian_filter``; edges replicated. Differentiable.
    """

    name = "gaussian"

    def __init__(self, sigma: float = 1.0, truncate: float = 4.0) -> None:
        super().__init__()
        if not (isinstance(sigma, (int, float)) and sigma > 0 and math.isfinite(sigma)):
            raise DefenseError(f"{self.name}: sigma must be > 0; got {sigma!r}")
        if not (isinstance(truncate, (int, float)) and truncate > 0):
            raise DefenseError(f"{self.name}: truncate must be > 0; got {truncate!r}")
        self.sigma, self.truncate = float(sigma), float(truncate)
        self.options = {"sigma": self.sigma, "truncate": self.truncate}

    def transform(self, x: torch.Tensor, bounds: Bounds) -> torch.Tensor:
        r = _spatial(x, self.name)
        k = _gaussian_kernel(self.sigma, self.truncate, x.dtype, x.device)
        p = k.numel() // 2
        n, c = x.shape[:2]
        y = x.reshape(n * c, 1, *x.shape[2:])
        conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[r]
        for axis in range(r):
            shape = [1, 1] + [1] * r
            shape[2 + axis] = k.numel()
            pad = [0, 0] * r
            pad[2 * (r - 1 - axis)] = pad[2 * (r - 1 - axis) + 1] = p
            y = conv(F.pad(y, pad, mode="replicate"), k.view(shape))
        return y.reshape(x.shape)


# --------------------------------------------------------------------------- quantization
class BitDepthReduction(Defense):
    """Reduce every intensity to ``bits`` bits: ``round(u * (2^b - 1)) / (2^b - 1)`` on the
    ``[0, 1]`` view (Xu et al., NDSS 2018). Rounding has zero gradient; BPDA uses the identity."""

    name = "bitdepth"
    differentiable = False

    def __init__(self, bits: int = 4) -> None:
        super().__init__()
        if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 16:
            raise DefenseError(f"{self.name}: bits must be an integer in 1..16; got {bits!r}")
        self.bits = bits
        self.options = {"bits": bits}

    def transform(self, x: torch.Tensor, bounds: Bounds) -> torch.Tensor:
        levels = 2**self.bits - 1
        u = to_unit(x, bounds).clamp(0, 1)
        return from_unit(torch.round(u * levels) / levels, bounds)


# --------------------------------------------------------------------------- JPEG
_LUMA = torch.tensor([
    [16, 11, 10, 16, 24, 40, 51, 61], [12, 12, 14, 19, 26, 58, 60, 55],
    [14, 13, 16, 24, 40, 57, 69, 56], [14, 17, 22, 29, 51, 87, 80, 62],
    [18, 22, 37, 56, 68, 109, 103, 77], [24, 35, 55, 64, 81, 104, 113, 92],
    [49, 64, 78, 87, 103, 121, 120, 101], [72, 92, 95, 98, 112, 100, 103, 99],
], dtype=torch.float64)


def _quant_table(quality: int) -> torch.Tensor:
    """The IJG (libjpeg) luminance table scaled for ``quality``."""
    scale = 5000 / quality if quality < 50 else 200 - 2 * quality
    return ((_LUMA * scale + 50) // 100).clamp(1, 255)


def _dct_matrix() -> torch.Tensor:
    k = torch.arange(8, dtype=torch.float64)
    m = torch.cos((2 * k[None, :] + 1) * k[:, None] * math.pi / 16) * math.sqrt(2 / 8)
    m[0] /= math.sqrt(2)
    return m


def _jpeg_pil(u8: np.ndarray, quality: int) -> np.ndarray:
    from PIL import Image

    img = Image.fromarray(u8)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    with Image.open(buf) as out:
        return np.asarray(out.convert(img.mode)).copy()


class JPEGCompression(Defense):
    """JPEG compression and decompression at ``quality`` (Das et al., "Keeping the Bad Guys Out:
    Protecting and Vaccinating Deep Learning with JPEG Compression", 2017), through Pillow.

    Args:
        quality: 1..100.
        qualities: several qualities, one drawn at random per image (SHIELD, Das et al., KDD 2018);
            makes the defense randomized.
        per_slice: compress 3D volumes slice by slice along the first spatial axis (a volume is
            refused otherwise: JPEG is a 2D codec).
        approximation: the BPDA backward pass: ``"identity"`` or ``"dct"``, a differentiable JPEG
            (8x8 block DCT, quantization with the quality's luminance table and the cubic soft
            rounding ``r(t) = round(t) + (t - round(t))^3`` of Shin & Song, "JPEG-resistant
            adversarial images", NeurIPS workshop 2017), per channel, without chroma subsampling.
        seed: the random quality draws.

    Images are quantized to 8 bits on the ``[0, 1]`` view; 1 channel is coded as grayscale,
    3 as RGB (YCbCr inside the codec), any other count channel by channel.
    """

    name = "jpeg"
    differentiable = False

    def __init__(self, quality: int = 75, qualities: Sequence[int] | None = None,
                 per_slice: bool = False, approximation: str = "identity",
                 seed: int | None = None) -> None:
        super().__init__(seed)
        qs = list(qualities) if qualities is not None else [quality]
        for q in qs:
            if isinstance(q, bool) or not isinstance(q, (int, np.integer)) or not 1 <= q <= 100:
                raise DefenseError(f"{self.name}: quality must be an integer in 1..100; got {q!r}")
        if not qs:
            raise DefenseError(f"{self.name}: qualities is empty")
        if approximation not in ("identity", "dct"):
            raise DefenseError(f"{self.name}: approximation must be 'identity' or 'dct'; got "
                               f"{approximation!r}")
        self.qualities = [int(q) for q in qs]
        self.randomized = len(self.qualities) > 1
        self.per_slice = bool(per_slice)
        self.approximation = approximation
        self.options = {"quality": self.qualities[0], "per_slice": self.per_slice,
                        "approximation": approximation}
        if qualities is not None:
            self.options["qualities"] = list(self.qualities)
        if seed is not None:
            self.options["seed"] = seed

    def _quality(self) -> int:
        if len(self.qualities) == 1:
            return self.qualities[0]
        return self.qualities[self.randint(0, len(self.qualities))]

    def _slices(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        r = x.dim() - 2
        if r == 2:
            return x, tuple(x.shape)
        if r == 3:
            if not self.per_slice:
                raise DefenseError(
                    f"{self.name}: JPEG is a 2D codec and the inputs are volumes "
                    f"{tuple(x.shape)}; pass per_slice=True to compress slice by slice"
                )
            n, c, d, h, w = x.shape
            return x.permute(0, 2, 1, 3, 4).reshape(n * d, c, h, w), tuple(x.shape)
        raise DefenseError(f"{self.name}: works on images (N, C, H, W) or volumes with "
                           f"per_slice=True; got shape {tuple(x.shape)}")

    @staticmethod
    def _unslice(y: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        if len(shape) == 4:
            return y
        n, c, d, h, w = shape
        return y.reshape(n, d, c, h, w).permute(0, 2, 1, 3, 4)

    def transform(self, x: torch.Tensor, bounds: Bounds) -> torch.Tensor:
        xs, shape = self._slices(x)
        u = to_unit(xs.detach(), bounds).clamp(0, 1)
        u8 = torch.round(u * 255).to(torch.uint8).cpu().numpy()
        out = np.empty_like(u8)
        c = u8.shape[1]
        for i in range(u8.shape[0]):
            q = self._quality()
            if c == 3:
                out[i] = _jpeg_pil(np.ascontiguousarray(u8[i].transpose(1, 2, 0)), q).transpose(
                    2, 0, 1)
            else:
                for j in range(c):
                    out[i, j] = _jpeg_pil(u8[i, j], q)
        y = torch.from_numpy(out).to(device=x.device, dtype=x.dtype) / 255.0
        return self._unslice(from_unit(y, bounds), shape)

    def backward_approximation(self, x: torch.Tensor, bounds: Bounds = (0.0, 1.0)) -> torch.Tensor:
        if self.approximation == "identity":
            return x
        xs, shape = self._slices(x)
        q = float(np.median(self.qualities))
        table = _quant_table(int(round(q))).to(x.device, x.dtype)
        m = _dct_matrix().to(x.device, x.dtype)
        n, c, h, w = xs.shape
        ph, pw = (-h) % 8, (-w) % 8
        v = to_unit(xs, bounds) * 255 - 128
        v = F.pad(v, (0, pw, 0, ph), mode="replicate")
        blocks = v.unfold(2, 8, 8).unfold(3, 8, 8)  # (n, c, H/8, W/8, 8, 8)
        coef = m @ blocks @ m.T
        t = coef / table
        r = torch.round(t)
        t = r + (t - r) ** 3
        rec = m.T @ (t * table) @ m
        hb, wb = rec.shape[2], rec.shape[3]
        rec = rec.permute(0, 1, 2, 4, 3, 5).reshape(n, c, hb * 8, wb * 8)[:, :, :h, :w]
        return self._unslice(from_unit((rec + 128) / 255, bounds), shape)


# --------------------------------------------------------------------------- TV minimization
class TotalVariationMinimization(Defense):
    """Total-variation minimization (Guo, Rana, Cisse & van der Maaten, "Countering Adversarial
    Images using Input Transformations", ICLR 2018).

    A random set of pixels is kept (each with probability ``keep_prob``; Bernoulli mask ``X``) and
    the image is reconstructed as ``argmin_z ||X * (z - x)||_2 + lam * TV(z)`` with
    ``TV(z) = sum_axis sum_i ||z_{i+1} - z_i||_2`` (rows and columns, as in the reference and in
    ART's ``TotalVarMin``), per channel, on the ``[0, 1]`` view, solved with ``max_iter`` L-BFGS
    iterations. The solver's output carries no gradient (naive attacks get zero); BPDA uses the
    identity. Randomized (the pixel mask).
    """

    name = "tvm"
    differentiable = False
    randomized = True

    def __init__(self, keep_prob: float = 0.3, lam: float = 0.5, max_iter: int = 10,
                 seed: int | None = None) -> None:
        super().__init__(seed)
        if not 0 < keep_prob <= 1:
            raise DefenseError(f"{self.name}: keep_prob must be in (0, 1]; got {keep_prob!r}")
        if not lam >= 0:
            raise DefenseError(f"{self.name}: lam must be >= 0; got {lam!r}")
        if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
            raise DefenseError(f"{self.name}: max_iter must be a positive integer; got "
                               f"{max_iter!r}")
        self.keep_prob, self.lam, self.max_iter = float(keep_prob), float(lam), max_iter
        self.options = {"keep_prob": self.keep_prob, "lam": self.lam, "max_iter": max_iter}
        if seed is not None:
            self.options["seed"] = seed

    def _objective(self, z: torch.Tensor, u: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        n, c = u.shape[:2]
        fit = ((mask * (z - u)) ** 2).reshape(n, c, -1).sum(-1).add(1e-12).sqrt().sum()
        tv = z.new_zeros(())
        for axis in range(2, z.dim()):
            d = z.diff(dim=axis).movedim(axis, -1)  # (..., positions along axis)
            tv = tv + (d**2).reshape(n, c, -1, d.shape[-1]).sum(2).add(1e-12).sqrt().sum()
        return fit + self.lam * tv

    def transform(self, x: torch.Tensor, bounds: Bounds) -> torch.Tensor:
        _spatial(x, self.name, (2, 3))
        u = to_unit(x.detach(), bounds).clamp(0, 1).float()
        mask = (self.rand(*x.shape, like=u) < self.keep_prob).float()
        z = u.clone().requires_grad_(True)
        opt = torch.optim.LBFGS([z], lr=1.0, max_iter=self.max_iter,
                                line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = self._objective(z, u, mask)
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        out = z.detach().clamp(0, 1).to(x.dtype)
        return from_unit(out, bounds)


# --------------------------------------------------------------------------- randomization
class RandomResizePad(Defense):
    """Random resizing and padding (Xie, Wang, Zhang, Ren & Yuille, "Mitigating Adversarial Effects
    Through Randomization", ICLR 2018).

    Each input is resized (nearest neighbour, as in the reference code) so that its first spatial
    size is a random integer in ``[S, ceil(ratio * S))`` (others in proportion), then placed at a
    random offset in a canvas of ``ceil(ratio * size)`` filled with the lower bound (zero
    intensity). The output is larger than the input (299 -> 331 in the paper, ``ratio`` 1.107):
    the network must accept it (global pooling), or ``keep_size=True`` resizes the canvas back.
    Differentiable almost everywhere; randomized (use EOT).
    """

    name = "resize-pad"
    randomized = True

    def __init__(self, ratio: float = 1.107, mode: str = "nearest", keep_size: bool = False,
                 seed: int | None = None) -> None:
        super().__init__(seed)
        if not (isinstance(ratio, (int, float)) and 1.0 < ratio <= 4.0):
            raise DefenseError(f"{self.name}: ratio must be in (1, 4]; got {ratio!r}")
        if mode not in ("nearest", "bilinear"):
            raise DefenseError(f"{self.name}: mode must be 'nearest' or 'bilinear'; got {mode!r}")
        self.ratio, self.mode, self.keep_size = float(ratio), mode, bool(keep_size)
        self.options = {"ratio": self.ratio, "mode": mode, "keep_size": self.keep_size}
        if seed is not None:
            self.options["seed"] = seed

    def transform(self, x: torch.Tensor, bounds: Bounds) -> torch.Tensor:
        r = _spatial(x, self.name, (2, 3))
        sizes = list(x.shape[2:])
        out_sizes = [max(s + 1, math.ceil(self.ratio * s)) for s in sizes]
        lo = bounds[0]
        mode = self.mode if (self.mode == "nearest" or r == 2) else "trilinear"
        parts = []
        for i in range(x.shape[0]):
            first = self.randint(sizes[0], out_sizes[0])
            scale = first / sizes[0]
            new = [first] + [min(o - 1, max(s, round(s * scale)))
                             for s, o in zip(sizes[1:], out_sizes[1:], strict=True)]
            kw = {} if mode == "nearest" else {"align_corners": False}
            y = F.interpolate(x[i : i + 1], size=new, mode=mode, **kw)
            pad: list[int] = []
            for s, o in zip(reversed(new), reversed(out_sizes), strict=True):
                before = self.randint(0, o - s + 1)
                pad += [before, o - s - before]
            parts.append(F.pad(y, pad, value=lo))
        out = torch.cat(parts)
        if self.keep_size:
            kw = {} if mode == "nearest" else {"align_corners": False}
            out = F.interpolate(out, size=sizes, mode=mode, **kw)
        return out


class GaussianNoise(Defense):
    """Additive Gaussian noise ``x + sigma * N(0, I)``, ``sigma`` in the model's units, clipped to
    the bounds (the noise layer of Liu et al., "Towards Robust Neural Networks via Random
    Self-ensemble", ECCV 2018; for a certificate use :mod:`medrobust.defenses.smoothing`, which
    does not clip). Differentiable; randomized (use EOT)."""

    name = "noise"
    randomized = True

    def __init__(self, sigma: float = 0.1, clip: bool = True, seed: int | None = None) -> None:
        super().__init__(seed)
        if not (isinstance(sigma, (int, float)) and sigma > 0 and math.isfinite(sigma)):
            raise DefenseError(f"{self.name}: sigma must be > 0 (in the model's units); got "
                               f"{sigma!r}")
        self.sigma, self.clip = float(sigma), bool(clip)
        self.options = {"sigma": self.sigma, "clip": self.clip}
        if seed is not None:
            self.options["seed"] = seed

    def transform(self, x: torch.Tensor, bounds: Bounds) -> torch.Tensor:
        y = x + self.sigma * self.randn(*x.shape, like=x)
        return y.clamp(*bounds) if self.clip else y


__all__ = [
    "BitDepthReduction",
    "GaussianNoise",
    "GaussianSmoothing",
    "JPEGCompression",
    "MedianSmoothing",
    "RandomResizePad",
    "TotalVariationMinimization",
]
