"""Model wrappers: bounds, preprocessing, chunking and the side-effect-free attack context.

A :class:`Classifier` wraps any ``torch.nn.Module`` that returns logits. Inputs are given in the
units of ``bounds`` (``[0, 1]`` pixels, Hounsfield units, ...); optional preprocessing (an intensity
window, a resize) and per-channel normalization run inside the wrapper, differentiably, so that
every attack budget is expressed in input units (DESIGN.md, principle 1).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``loss_fn(logits, index) -> per-sample loss``; ``index`` selects the rows of the batch."""


def _as_channel_tensor(value: float | Sequence[float] | torch.Tensor | None, name: str) -> (
    torch.Tensor | None
):
    if value is None:
        return None
    t = torch.as_tensor(value, dtype=torch.float32).flatten()
    if t.numel() == 0 or not torch.isfinite(t).all():
        raise ValueError(f"{name} must be finite numbers (one per channel); got {value!r}")
    return t


class Classifier:
    """A classifier under attack.

    Args:
        module: any ``nn.Module`` returning logits of shape ``(N, K)``, or one logit per sample
            (``(N,)`` or ``(N, 1)``) for a binary sigmoid model, which is treated as two classes
            with logits ``[0, z]`` (so that ``softmax`` equals ``sigmoid(z)`` for class 1).
        bounds: ``(lo, hi)``: the range of valid inputs, in the user's units.
        mean, std: per-channel normalization ``(x - mean) / std`` applied inside the wrapper after
            ``preprocess`` (one value, or one per channel; any input rank).
        num_classes: the number of classes; checked against the module's output when given.
        preprocess: an optional differentiable callable applied first (e.g. an intensity window
            mapping HU to [0, 1], or a resize to the network's input size).
        chunk_size: the largest batch sent through the module at once; larger batches are split.
        device: where the module lives; by default the device of its first parameter or buffer.

    The wrapper never changes the module permanently: :meth:`attack_mode` switches it to eval mode
    for the duration of an attack and restores every submodule's previous mode afterwards. Gradients
    are taken with ``torch.autograd.grad`` with respect to the input only, so no ``.grad`` appears
    on parameters and their ``requires_grad`` flags are left as they are.
    """

    def __init__(
        self,
        module: nn.Module,
        bounds: tuple[float, float] = (0.0, 1.0),
        mean: float | Sequence[float] | torch.Tensor | None = None,
        std: float | Sequence[float] | torch.Tensor | None = None,
        num_classes: int | None = None,
        preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
        chunk_size: int = 1024,
        device: torch.device | str | None = None,
    ) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be a torch.nn.Module; got {type(module).__name__}")
        try:
            lo, hi = (float(b) for b in bounds)
        except (TypeError, ValueError):
            raise TypeError(f"bounds must be a pair of numbers (lo, hi); got {bounds!r}") from None
        if not (math.isfinite(lo) and math.isfinite(hi)) or lo >= hi:
            raise ValueError(f"bounds must be finite with lo < hi; got {bounds!r}")
        if num_classes is not None and (int(num_classes) != num_classes or num_classes < 2):
            raise ValueError(f"num_classes must be an integer >= 2; got {num_classes!r}")
        if int(chunk_size) < 1:
            raise ValueError(f"chunk_size must be a positive integer; got {chunk_size!r}")
        self.module = module
        self.bounds = (lo, hi)
        self.mean = _as_channel_tensor(mean, "mean")
        self.std = _as_channel_tensor(std, "std")
        if self.std is not None and (self.std <= 0).any():
            raise ValueError(f"std must be positive; got {std!r}")
        self.num_classes = None if num_classes is None else int(num_classes)
        self.preprocess = preprocess
        self.chunk_size = int(chunk_size)
        self._device = torch.device(device) if device is not None else None

    # ------------------------------------------------------------------ basics
    @property
    def device(self) -> torch.device:
        if self._device is not None:
            return self._device
        for t in self.module.parameters():
            return t.device
        for b in self.module.buffers():
            return b.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        for t in self.module.parameters():
            if t.is_floating_point():
                return t.dtype
        return torch.float32

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        if self.preprocess is not None:
            x = self.preprocess(x)
        if self.mean is None and self.std is None:
            return x
        shape = (1, -1) + (1,) * (x.dim() - 2)
        if self.mean is not None:
            mean = self.mean.to(device=x.device, dtype=x.dtype)
            x = x - (mean.view(shape) if mean.numel() > 1 else mean)
        if self.std is not None:
            std = self.std.to(device=x.device, dtype=x.dtype)
            x = x / (std.view(shape) if std.numel() > 1 else std)
        return x

    def _standardize_logits(self, out: torch.Tensor, n: int) -> torch.Tensor:
        if not isinstance(out, torch.Tensor):
            raise TypeError(
                f"the model returned {type(out).__name__}; expected a tensor of logits (N, classes)"
            )
        if out.dim() == 1 and out.shape[0] == n:
            out = out.unsqueeze(1)
        if out.dim() != 2 or out.shape[0] != n:
            raise ValueError(
                f"the model returned shape {tuple(out.shape)} for a batch of {n}; expected logits "
                f"of shape ({n}, classes), or ({n},) / ({n}, 1) for a binary sigmoid model"
            )
        if out.shape[1] == 1:
            out = torch.cat([torch.zeros_like(out), out], dim=1)
        if self.num_classes is not None and out.shape[1] != self.num_classes:
            raise ValueError(
                f"the model returned {out.shape[1]} logits per sample but num_classes="
                f"{self.num_classes}"
            )
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, K)`` for inputs in bounds units, with autograd.

        No chunking and no mode change: the building block of the other methods."""
        xin = x.to(device=self.device, dtype=self.dtype)
        return self._standardize_logits(self.module(self._normalize(xin)), x.shape[0])

    __call__ = forward

    def _chunks(self, n: int) -> Iterator[slice]:
        for start in range(0, n, self.chunk_size):
            yield slice(start, min(n, start + self.chunk_size))

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of any size, chunked, without autograd, in the current mode."""
        parts = [self.forward(x[s]) for s in self._chunks(x.shape[0])]
        return torch.cat(parts) if parts else torch.empty(0, self.num_classes or 2)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Predicted classes, in eval mode (the module's mode is restored)."""
        with self.attack_mode():
            return self.logits(x).argmax(1)

    def value_and_grad(
        self, x: torch.Tensor, loss_fn: LossFn
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits, per-sample losses and the gradient of the summed loss with respect to ``x``.

        ``loss_fn(logits, index)`` gets each chunk's logits and the index of those rows in ``x``.
        Gradients flow to the input only (``torch.autograd.grad``), chunk by chunk.
        """
        logits_parts, loss_parts, grad_parts = [], [], []
        for s in self._chunks(x.shape[0]):
            xi = x[s].detach().requires_grad_(True)
            with torch.enable_grad():
                logits = self.forward(xi)
                index = torch.arange(s.start, s.stop, device=logits.device)
                loss = loss_fn(logits, index)
                (grad,) = torch.autograd.grad(loss.sum(), xi)
            logits_parts.append(logits.detach())
            loss_parts.append(loss.detach())
            grad_parts.append(grad.detach())
        if len(grad_parts) == 1:  # one chunk: no copies
            return logits_parts[0], loss_parts[0], grad_parts[0]
        return torch.cat(logits_parts), torch.cat(loss_parts), torch.cat(grad_parts)

    # ------------------------------------------------------------ attack mode
    @contextlib.contextmanager
    def attack_mode(self) -> Iterator[Classifier]:
        """Eval mode for the duration of the block; every submodule's mode is restored after."""
        modes = [(m, m.training) for m in self.module.modules()]
        self.module.eval()
        try:
            yield self
        finally:
            for m, mode in modes:
                m.training = mode

    def check_inputs(self, x: torch.Tensor, name: str = "inputs") -> None:
        """Raise a clear error when ``x`` is not a finite floating tensor inside the bounds."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(
                f"{name} must be a floating-point tensor in the model's units; got {x.dtype}"
            )
        if x.dim() < 2:
            raise ValueError(
                f"{name} must be batched, (N, C, ...); got shape {tuple(x.shape)}"
            )
        if x.shape[0] == 0:
            raise ValueError(f"{name} is an empty batch")
        if not torch.isfinite(x).all():
            bad = int((~torch.isfinite(x)).sum())
            raise ValueError(f"{name} contains {bad} NaN or Inf values")
        lo, hi = self.bounds
        xmin, xmax = float(x.min()), float(x.max())
        if xmin < lo or xmax > hi:
            raise ValueError(
                f"{name} lie in [{xmin:g}, {xmax:g}], outside the model's bounds [{lo:g}, {hi:g}]; "
                "give inputs in the units of `bounds` (e.g. scale uint8 images by 1/255)"
            )

    def __repr__(self) -> str:
        return (
            f"Classifier({type(self.module).__name__}, bounds={self.bounds}, "
            f"num_classes={self.num_classes}, chunk_size={self.chunk_size})"
        )
