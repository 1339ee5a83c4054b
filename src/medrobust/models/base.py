"""The contract every model kind implements, and the machinery they share.

A model kind (a :class:`~medrobust.models.Classifier`, a segmenter, a detector, a black box, an
ensemble) wraps a network so that attacks can use it without knowing what it is:

* **bounds and units** — inputs are given in the user's units (``[0, 1]`` pixels, Hounsfield units)
  inside ``bounds``; preprocessing (an intensity window, a resize) and per-channel normalization run
  inside the wrapper, differentiably, so every budget is in input units (DESIGN principle 1);
* **chunked forward** — :meth:`Model.logits` evaluates a batch of any size in chunks, without
  autograd; :meth:`Model.value_and_grad` returns outputs, per-sample losses and the input gradient;
* **no side effects** — :meth:`Model.attack_mode` puts every submodule in eval mode and restores
  each one's mode after; gradients are taken with ``torch.autograd.grad`` with respect to the input
  only; the caller's tensor is never handed to the network (a network that works in place on its
  input cannot change it);
* **the task** — :meth:`Model.check_labels` validates labels and targets of its output kind,
  :meth:`Model.default_criterion` says what "adversarial" means by default,
  :meth:`Model.predictions` turns outputs into decisions;
* **capabilities** — :class:`Capabilities` says what an attack can use (input gradients, real-valued
  scores, the kind of output); an attack declares what it needs (``requires_gradients``,
  ``requires_scores``, ``supports_dense`` …) and the attacks' base class refuses a model it cannot
  attack with a clear message (:func:`check_capabilities`).

Half-precision networks (float16 / bfloat16) are run in their own dtype, but attacks compute in
``work_dtype`` (float32), so that small steps are not lost to rounding.
"""

from __future__ import annotations

import contextlib
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from medrobust.criteria import Criterion

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``loss_fn(outputs, index) -> per-sample loss``; ``index`` selects the rows of the batch."""

OUTPUT_KINDS = ("class", "multilabel", "dense", "boxes")


class ModelOutputError(ValueError):
    """The network returned something unusable (NaN or Inf, or a wrong shape)."""


@dataclass(frozen=True)
class Capabilities:
    """What a model kind offers to attacks.

    Attributes:
        gradients: input gradients are available (``value_and_grad`` works).
        scores: real-valued outputs (logits or probabilities) are available; ``False`` for a model
            that returns labels only (decision-based attacks only).
        output: ``"class"`` (one label per sample, outputs ``(N, K)``), ``"multilabel"`` (findings
            ``(N, F)``, a logit each), ``"dense"`` (a label per pixel or voxel, outputs
            ``(N, K, *spatial)``) or ``"boxes"`` (detections).
        randomized: two evaluations of the same input may differ (randomized defenses).
    """

    gradients: bool = True
    scores: bool = True
    output: str = "class"
    randomized: bool = False

    def __post_init__(self) -> None:
        if self.output not in OUTPUT_KINDS:
            raise ValueError(f"output must be one of {OUTPUT_KINDS}; got {self.output!r}")


def _as_channel_tensor(
    value: float | Sequence[float] | torch.Tensor | None, name: str
) -> torch.Tensor | None:
    if value is None:
        return None
    t = torch.as_tensor(value, dtype=torch.float32).flatten()
    if t.numel() == 0 or not torch.isfinite(t).all():
        raise ValueError(f"{name} must be finite numbers (one per channel); got {value!r}")
    return t


def _conv_rank(module: nn.Module) -> int | None:
    """The spatial rank of a network whose convolutions all share one (``None`` if mixed/none)."""
    ranks = set()
    for m in module.modules():
        if isinstance(m, (nn.Conv1d, nn.ConvTranspose1d)):
            ranks.add(1)
        elif isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            ranks.add(2)
        elif isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)):
            ranks.add(3)
    return ranks.pop() if len(ranks) == 1 else None


def _first_conv_channels(module: nn.Module) -> int | None:
    for m in module.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            return int(m.in_channels)
    return None


class Model(ABC):
    """Base class of the model kinds (see the module docstring for the contract).

    Args:
        module: the network.
        bounds: ``(lo, hi)``: the range of valid inputs, in the user's units.
        mean, std: per-channel normalization ``(x - mean) / std`` applied inside the wrapper after
            ``preprocess`` (one value, or one per channel; any input rank).
        preprocess: an optional differentiable callable applied first (e.g. an intensity window
            mapping HU to [0, 1], or a resize to the network's input size).
        chunk_size: the largest batch sent through the module at once; larger batches are split.
        device: where the module lives; by default the device of its first parameter or buffer.
        defense: a :class:`~medrobust.defenses.Defense` or a list of them (applied in order), run
            after the bounds check and before ``preprocess`` (see :mod:`medrobust.defenses`).
        votes: with a randomized defense, :meth:`logits` and :meth:`predict` decide by majority
            over this many draws (default 10).
    """

    capabilities: Capabilities = Capabilities()
    kind: str = "model"
    """A short name of the model kind, used in messages ("classifier", "segmenter", ...)."""

    def __init__(
        self,
        module: nn.Module,
        bounds: tuple[float, float] = (0.0, 1.0),
        mean: float | Sequence[float] | torch.Tensor | None = None,
        std: float | Sequence[float] | torch.Tensor | None = None,
        preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
        chunk_size: int = 1024,
        device: torch.device | str | None = None,
        defense: Any = None,
        votes: int = 10,
    ) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be a torch.nn.Module; got {type(module).__name__}")
        try:
            lo, hi = (float(b) for b in bounds)
        except (TypeError, ValueError):
            raise TypeError(f"bounds must be a pair of numbers (lo, hi); got {bounds!r}") from None
        if not (math.isfinite(lo) and math.isfinite(hi)) or lo >= hi:
            raise ValueError(f"bounds must be finite with lo < hi; got {bounds!r}")
        if isinstance(chunk_size, bool) or int(chunk_size) < 1:
            raise ValueError(f"chunk_size must be a positive integer; got {chunk_size!r}")
        self.module = module
        self.bounds = (lo, hi)
        self.mean = _as_channel_tensor(mean, "mean")
        self.std = _as_channel_tensor(std, "std")
        if self.std is not None and (self.std <= 0).any():
            raise ValueError(f"std must be positive; got {std!r}")
        self.preprocess = preprocess
        self.chunk_size = int(chunk_size)
        self._device = torch.device(device) if device is not None else None
        self._rank = _conv_rank(module)
        self.defense: Any = None
        if defense is not None:
            from medrobust.defenses.base import as_chain

            self.defense = as_chain(defense)
        if isinstance(votes, bool) or not isinstance(votes, int) or votes < 1:
            raise ValueError(f"votes must be a positive integer; got {votes!r}")
        self.votes = votes
        self._bpda = False

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
        """The network's own floating dtype (what it is fed)."""
        for t in self.module.parameters():
            if t.is_floating_point():
                return t.dtype
        return torch.float32

    @property
    def work_dtype(self) -> torch.dtype:
        """The dtype attacks compute in: float32 for half-precision networks, else the network's."""
        d = self.dtype
        return torch.float32 if d in (torch.float16, torch.bfloat16) else d

    @property
    def span(self) -> float:
        """``hi - lo`` of the bounds."""
        return self.bounds[1] - self.bounds[0]

    @property
    def randomized_defense(self) -> bool:
        """A randomized defense is attached (predictions are majority votes over ``votes``)."""
        return self.defense is not None and bool(self.defense.randomized)

    @property
    def draws_per_prediction(self) -> int:
        """Forward passes per sample spent by :meth:`logits` (``votes`` with a randomized
        defense, else 1)."""
        return self.votes if self.randomized_defense else 1

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        if self.defense is not None:
            x = self.defense(x, self.bounds, self._bpda)
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

    def _module_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the network is fed for ``x``: preprocessed, normalized, in the network's dtype,
        and never the caller's storage (a first layer that works in place must not change it)."""
        xin = x.to(device=self.device, dtype=self.dtype)
        z = self._normalize(xin)
        if z.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
            z = z.clone()
        return z

    def _call_module(self, z: torch.Tensor, shape: tuple[int, ...]) -> Any:
        try:
            return self.module(z)
        except RuntimeError as e:
            msg = str(e).split("\n")[0]
            if any(k in msg for k in ("size", "shape", "channels", "dimension", "Expected")):
                hint = ""
                c = _first_conv_channels(self.module)
                if c is not None and self.preprocess is None and len(shape) > 1 and shape[1] != c:
                    hint = f"; the network's first convolution takes {c} channel(s)"
                got = "(N, " + ", ".join(str(d) for d in shape[1:]) + ")"
                raise ValueError(
                    f"the {self.kind}'s network ({type(self.module).__name__}) cannot take inputs "
                    f"of shape {got}{hint}: {msg}"
                ) from e
            raise

    @abstractmethod
    def _standardize(self, out: Any, n: int) -> torch.Tensor:
        """Check the network's raw output for a batch of ``n`` and return the standard outputs."""

    def _check_finite(self, out: torch.Tensor) -> None:
        if not torch.isfinite(out).all():
            bad = (~torch.isfinite(out)).reshape(out.shape[0], -1).any(1)
            raise ModelOutputError(
                f"the {self.kind}'s network ({type(self.module).__name__}) returned NaN or Inf "
                f"outputs for {int(bad.sum())} of {out.shape[0]} samples; check the weights and "
                "the input units"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Standard outputs for inputs in bounds units, with autograd, in ``work_dtype``.

        No chunking and no mode change: the building block of the other methods."""
        out = self._call_module(self._module_input(x), tuple(x.shape))
        std = self._standardize(out, x.shape[0])
        if std.is_floating_point() and std.dtype != self.work_dtype:
            std = std.to(self.work_dtype)
        self._check_finite(std.detach())
        return std

    __call__ = forward

    def _chunks(self, n: int) -> Iterator[slice]:
        for start in range(0, n, self.chunk_size):
            yield slice(start, min(n, start + self.chunk_size))

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Outputs for a batch of any size, chunked, without autograd, in the current mode.

        With a randomized defense and class outputs, the scores are the majority vote over
        ``votes`` draws: ``(count_k + mean_softmax_k / 2) / votes`` for class ``k``, so that the
        argmax is the most frequent class (ties broken by the mean probability) and the value is
        the fraction of votes; other output kinds average the draws' outputs."""
        if self.randomized_defense and self.votes > 1:
            parts = [self._vote(x[s]) for s in self._chunks(x.shape[0])]
        else:
            parts = [self.forward(x[s]) for s in self._chunks(x.shape[0])]
        if not parts:
            raise ValueError("logits of an empty batch")
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def _vote(self, x: torch.Tensor) -> torch.Tensor:
        outs = [self.forward(x) for _ in range(self.votes)]
        if self.capabilities.output != "class":
            return torch.stack(outs).mean(0)
        counts = torch.zeros_like(outs[0])
        probs = torch.zeros_like(outs[0])
        for o in outs:
            counts += torch.nn.functional.one_hot(o.argmax(1), o.shape[1]).to(o.dtype)
            probs += o.softmax(1)
        return (counts + probs / (2 * self.votes)) / self.votes

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Decisions (classes, findings or label maps), in eval mode (modes restored)."""
        with self.attack_mode():
            return self.predictions(self.logits(x))

    def value_and_grad(
        self, x: torch.Tensor, loss_fn: LossFn, *, bpda: bool = False, eot: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Outputs, per-sample losses and the gradient of the summed loss with respect to ``x``.

        ``loss_fn(outputs, index)`` gets each chunk's outputs and the index of those rows in ``x``.
        Gradients flow to the input only (``torch.autograd.grad``), chunk by chunk.

        With a defense attached: ``bpda=True`` runs each non-differentiable defense
        straight-through with its backward approximation (Athalye et al., ICML 2018), and
        ``eot=N`` averages outputs, losses and gradients over ``N`` draws of the defense's
        randomness (Expectation over Transformation). Without them the gradient is whatever
        autograd gives (zero where a defense is not differentiable: the naive attack).
        """
        if not self.capabilities.gradients:
            raise TypeError(f"this {self.kind} offers no gradients")
        if isinstance(eot, bool) or not isinstance(eot, int) or eot < 1:
            raise ValueError(f"eot must be a positive integer; got {eot!r}")
        out_parts, loss_parts, grad_parts = [], [], []
        for s in self._chunks(x.shape[0]):
            xi = x[s].detach().requires_grad_(True)
            for draw in range(eot):
                self._bpda = bool(bpda)
                try:
                    with torch.enable_grad():
                        o = self.forward(xi)
                        index = torch.arange(s.start, s.stop, device=o.device)
                        lo = loss_fn(o, index)
                        g = self._input_grad(lo, xi)
                finally:
                    self._bpda = False
                if draw == 0:
                    out, loss, grad = o.detach(), lo.detach(), g.detach()
                else:
                    out, loss, grad = out + o.detach(), loss + lo.detach(), grad + g.detach()
            if eot > 1:
                out, loss, grad = out / eot, loss / eot, grad / eot
            out_parts.append(out.detach())
            loss_parts.append(loss.detach())
            grad_parts.append(grad.detach())
        if len(grad_parts) == 1:  # one chunk: no copies
            return out_parts[0], loss_parts[0], grad_parts[0]
        return torch.cat(out_parts), torch.cat(loss_parts), torch.cat(grad_parts)

    def _input_grad(self, loss: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:
        if self.defense is None:
            (grad,) = torch.autograd.grad(loss.sum(), xi)
            return grad
        # a non-differentiable defense may cut the graph: autograd's answer is then zero
        if not loss.requires_grad:
            return torch.zeros_like(xi)
        (grad,) = torch.autograd.grad(loss.sum(), xi, allow_unused=True)
        return torch.zeros_like(xi) if grad is None else grad

    # ------------------------------------------------------------ attack mode
    @contextlib.contextmanager
    def attack_mode(self) -> Iterator[Model]:
        """Eval mode for the duration of the block; every submodule's mode is restored after."""
        modes = [(m, m.training) for m in self.module.modules()]
        if self.defense is not None:  # learned defenses (denoisers) run in eval mode too
            modes += [(m, m.training) for m in self.defense.modules()]
            self.defense.eval()
        self.module.eval()
        try:
            yield self
        finally:
            for m, mode in modes:
                m.training = mode

    def check_inputs(self, x: torch.Tensor, name: str = "inputs") -> None:
        """Raise a clear error when ``x`` is not a finite floating batch inside the bounds."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(
                f"{name} must be a floating-point tensor in the model's units; got {x.dtype}"
            )
        if x.dim() < 2:
            raise ValueError(f"{name} must be batched, (N, C, ...); got shape {tuple(x.shape)}")
        if self._rank is not None and self.preprocess is None and x.dim() != self._rank + 2:
            what = {1: "(N, C, L)", 2: "(N, C, H, W)", 3: "(N, C, D, H, W)"}[self._rank]
            fix = " (add the batch dimension: x.unsqueeze(0))" if x.dim() == self._rank + 1 else ""
            raise ValueError(
                f"{name} have shape {tuple(x.shape)} but the {self.kind}'s network is "
                f"{self._rank}-D and expects {what}{fix}"
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

    # ------------------------------------------------------------------ the task
    @abstractmethod
    def check_labels(self, labels: Any, n: int, name: str = "labels") -> torch.Tensor:
        """Validate labels (or targets) for a batch of ``n``; return them as a CPU tensor."""

    @abstractmethod
    def check_label_values(
        self, labels: torch.Tensor, target: torch.Tensor | None, num_outputs: int
    ) -> None:
        """Check label (and target) values against the model's ``num_outputs`` classes."""

    @abstractmethod
    def default_criterion(self, targeted: bool) -> Criterion:
        """The criterion used when an attack is called without ``criterion=``."""

    @abstractmethod
    def predictions(self, outputs: torch.Tensor) -> torch.Tensor:
        """Decisions from outputs (classes ``(N,)``, findings ``(N, F)``, label maps ...)."""

    def near_tie(self, outputs: torch.Tensor, rtol: float = 1e-4) -> torch.Tensor:
        """Samples whose decision sits within float noise of flipping (``(N,)`` bool)."""
        if outputs.dim() < 2 or outputs.shape[1] < 2:
            return torch.zeros(outputs.shape[0], dtype=torch.bool, device=outputs.device)
        top2 = outputs.topk(2, dim=1).values
        scale = 1.0 + outputs.abs().amax(1)
        tie = (top2[:, 0] - top2[:, 1]) <= rtol * scale
        return tie.reshape(tie.shape[0], -1).any(1)

    def num_outputs(self, x: torch.Tensor) -> tuple[int, int]:
        """``(K, forward passes spent)``: classes (or findings) per sample, probing if needed."""
        k = getattr(self, "num_classes", None)
        if k is not None:
            return int(k), 0
        return int(self.logits(x[:1]).shape[1]), 1


def check_capabilities(attack: Any, model: Model) -> None:
    """Raise a clear ``TypeError`` when ``attack`` cannot attack ``model`` (by capability).

    An attack declares ``requires_gradients``, ``requires_scores`` and, for each output kind other
    than ``"class"``, ``supports_<kind>`` (``supports_dense``, ``supports_multilabel``,
    ``supports_boxes``)."""
    caps = model.capabilities
    name = type(attack).__name__
    what = f"a {model.kind} ({type(model).__name__})"
    if getattr(attack, "requires_gradients", True) and not caps.gradients:
        raise TypeError(
            f"{name} needs input gradients and {what} offers none; use a score- or "
            "decision-based attack (square, simba, hopskipjump) or a transfer attack from a proxy"
        )
    if getattr(attack, "requires_scores", True) and not caps.scores:
        raise TypeError(
            f"{name} needs real-valued scores and {what} returns labels only; use a "
            "decision-based attack (hopskipjump)"
        )
    if caps.output != "class" and not getattr(attack, f"supports_{caps.output}", False):
        raise TypeError(
            f"{name} cannot attack {what}: it handles class outputs only, and this model's "
            f"outputs are {caps.output!r} (attacks with supports_{caps.output} = True can)"
        )
