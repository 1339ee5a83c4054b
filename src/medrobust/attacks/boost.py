"""Transfer boosting for the gradient loop: input diversity (DI) and translation invariance (TI).

* **Input diversity** — Xie, Zhang, Zhou, Bai, Wang, Ren & Yuille, "Improving Transferability of
  Adversarial Examples with Input Diversity", CVPR 2019: with probability ``p`` (the paper's 0.5)
  the input of each forward pass is randomly resized and randomly padded. The paper's ImageNet
  setting resizes a 299-px image to ``rnd`` in ``[299, 330)`` and pads it to 330 (a ratio of
  330 / 299 = 1.104). Here the ratio is kept and scaled to the input: every spatial axis of size
  ``S`` is resized to ``rnd`` in ``[S, floor(1.104 S)]`` and padded at a random offset to
  ``floor(1.104 S)`` with the lower bound of the inputs (black), then resized back to ``S`` so that
  networks with a fixed input size (ViT) take it (a deviation from the paper, which feeds the
  330-px image to Inception). Any rank (1D, 2D, 3D). The transform is differentiable; the gradient
  reaches the input through it.
* **Translation invariance** — Dong, Pang, Su & Zhu, "Evading Defenses to Transferable Adversarial
  Examples by Translation-Invariant Attacks", CVPR 2019: the gradient is convolved with a
  Gaussian kernel (the reference ``gkern(kernlen, nsig=3)``), as if it were averaged over
  translated copies of the input. The paper's 15 x 15 kernel for 299 px scales to
  ``k = odd(round(15 S / 299))``, at least 3 (3 for 28-px MedMNIST, 11 for 224 px).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DI_RATIO = 330 / 299
"""Xie et al.'s resize-and-pad ratio (ImageNet: 299 -> 330)."""
TI_KERNEL = 15
TI_REFERENCE_SIZE = 299


def scaled_kernel_size(size: int) -> int:
    """TI's 15-px kernel for 299-px inputs scaled to ``size`` (odd, at least 3)."""
    k = int(round(TI_KERNEL * size / TI_REFERENCE_SIZE))
    k = max(3, k)
    return k if k % 2 == 1 else k + 1


def gaussian_kernel_1d(k: int, nsig: float = 3.0) -> torch.Tensor:
    """The 1-D factor of TI's ``gkern(k, nsig)``: a Gaussian on ``linspace(-nsig, nsig, k)``,
    normalized to sum 1 (the 2-D kernel is the outer product, also summing to 1)."""
    if k == 1:
        return torch.ones(1, dtype=torch.float64)
    t = torch.linspace(-nsig, nsig, k, dtype=torch.float64)
    g = torch.exp(-0.5 * t * t)
    return g / g.sum()


def smooth_gradient(grad: torch.Tensor, k: int) -> torch.Tensor:
    """Convolve ``grad`` ``(N, C, *spatial)`` per channel with the separable ``k``-wide Gaussian
    (zero padding, same size)."""
    rank = grad.dim() - 2
    if rank < 1 or k <= 1:
        return grad
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[rank]
    c = grad.shape[1]
    g = gaussian_kernel_1d(k).to(grad.device, grad.dtype)
    out = grad
    for axis in range(rank):
        shape = [1] * rank
        shape[axis] = k
        w = g.view(1, 1, *shape).expand(c, 1, *shape)
        pad = [0] * rank
        pad[axis] = k // 2
        out = conv(out, w, padding=tuple(pad), groups=c)
    return out


def diverse_inputs(x: torch.Tensor, p: float, fill: float, generator: torch.Generator,
                   ratio: float = DI_RATIO) -> torch.Tensor:
    """DI's random resize-and-pad (see the module doc), applied to each sample with probability
    ``p``; differentiable in ``x``. One random size and offset per call (as the reference code),
    per-sample application."""
    rank = x.dim() - 2
    if rank < 1 or p <= 0:
        return x
    sizes = list(x.shape[2:])
    outer = [max(s + 1, int(math.floor(ratio * s))) for s in sizes]
    rnd = [int(torch.randint(s, o, (1,), generator=generator)) for s, o in zip(sizes, outer,
                                                                               strict=True)]
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[rank]
    resized = F.interpolate(x, size=rnd, mode=mode, align_corners=False)
    pad: list[int] = []
    for r, o in reversed(list(zip(rnd, outer, strict=True))):
        before = int(torch.randint(0, o - r + 1, (1,), generator=generator))
        pad += [before, o - r - before]
    padded = F.pad(resized, pad, value=fill)
    back = F.interpolate(padded, size=sizes, mode=mode, align_corners=False)
    apply = torch.rand(x.shape[0], generator=generator) < p
    view = apply.to(x.device).view(-1, *([1] * (x.dim() - 1)))
    return torch.where(view, back, x)


__all__ = ["DI_RATIO", "diverse_inputs", "gaussian_kernel_1d", "scaled_kernel_size",
           "smooth_gradient"]
