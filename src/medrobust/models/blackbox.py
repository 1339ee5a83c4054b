"""A black-box model: any callable that returns labels or scores, with queries counted.

Deployed medical models often sit behind an interface that returns a decision (``"label"``) or a
score vector (``"logits"``, ``"probs"``) and never a gradient. :class:`BlackBox` wraps such a
callable in the model contract (:class:`~medrobust.models.base.Model`) so that the query-based
attacks (HopSkipJump, SimBA, Square) can attack it and the gradient attacks refuse it by capability.

* outputs are standardized so that the criteria work unchanged: a label oracle's answers become
  one-hot rows ``(N, K)`` (their argmax is the label), probabilities become log-probabilities
  (``softmax`` of them gives the probabilities back, so the cross-entropy is ``-log p_y``);
* the oracle is checked on every answer: a wrong shape, NaN/Inf, labels outside ``[0, K)``,
  probabilities that are not a distribution, and (unless ``randomized=True``) a *different label
  for an input it has already answered* are reported with a clear :class:`ModelOutputError`;
* queries are counted: ``queries`` counts every input the oracle was asked about, and
  ``max_queries`` is a per-sample budget that the query-based attacks respect through
  :class:`QueryBudget` (when it is spent, the attack returns the best input found so far, a failure
  unless it is adversarial); ``AttackResult.forward_passes`` reports the queries an attack used.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from medrobust.models.base import Capabilities, Model, ModelOutputError
from medrobust.models.classifier import Classifier, ClassTask

if TYPE_CHECKING:
    from medrobust.attacks.base import AttackContext

OUTPUTS = ("label", "logits", "probs")

__all__ = ["BlackBox", "OUTPUTS", "QueryBudget", "QueryBudgetError"]


class QueryBudgetError(RuntimeError):
    """An attack asked for more queries than a sample's budget allows (a bug in the attack)."""


class _Oracle(nn.Module):
    """Holds the user's callable; a module only so that the model contract applies (eval mode of
    an ``nn.Module`` oracle is set during an attack and restored after)."""

    def __init__(self, fn: Callable[[torch.Tensor], Any]) -> None:
        super().__init__()
        if isinstance(fn, nn.Module):
            self.net = fn
        else:
            self._fn = fn

    def forward(self, x: torch.Tensor) -> Any:
        fn = self.net if hasattr(self, "net") else self._fn
        return fn(x)


class BlackBox(ClassTask, Model):
    """Any callable returning labels or scores, as a model that attacks can query.

    Args:
        fn: ``fn(x) -> outputs`` for a batch ``x`` ``(N, C, ...)`` in the units of ``bounds``;
            returns a tensor or array: class indices ``(N,)`` (``output="label"``), logits
            ``(N, K)`` or probabilities ``(N, K)``.
        bounds: ``(lo, hi)``: the range of valid inputs.
        output: ``"label"``, ``"logits"`` or ``"probs"``.
        max_queries: the per-sample query budget of an attack (``None``: unlimited).
        num_classes: ``K``; required for a label oracle (its one-hot rows need it), checked
            against the outputs otherwise.
        randomized: the oracle may answer the same input differently (a randomized defense); turns
            off the consistency check.
        chunk_size: the largest batch sent to ``fn`` at once.
        device: where inputs are sent (default CPU, or the device of an ``nn.Module`` oracle).
        history: how many answered inputs are remembered for the consistency check.

    Attributes:
        queries: the number of inputs the oracle has answered (all calls; :meth:`reset_queries`).
    """

    kind = "black box"

    def __init__(
        self,
        fn: Callable[[torch.Tensor], Any],
        bounds: tuple[float, float] = (0.0, 1.0),
        output: str = "label",
        max_queries: int | None = None,
        num_classes: int | None = None,
        *,
        randomized: bool = False,
        chunk_size: int = 1024,
        device: torch.device | str | None = None,
        history: int = 100_000,
    ) -> None:
        if not callable(fn):
            raise TypeError(f"fn must be callable (inputs -> labels or scores); got "
                            f"{type(fn).__name__}")
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}; got {output!r}")
        if max_queries is not None and (
            isinstance(max_queries, bool) or int(max_queries) != max_queries or max_queries < 1
        ):
            raise ValueError(f"max_queries must be a positive integer or None; got {max_queries!r}")
        if num_classes is not None and (
            isinstance(num_classes, bool) or int(num_classes) != num_classes or num_classes < 2
        ):
            raise ValueError(f"num_classes must be an integer >= 2; got {num_classes!r}")
        if output == "label" and num_classes is None:
            raise ValueError(
                "a label oracle needs num_classes= (its answers become one-hot rows of K classes)"
            )
        super().__init__(_Oracle(fn), bounds, chunk_size=chunk_size, device=device)
        self.fn = fn
        self.output = output
        self.max_queries = None if max_queries is None else int(max_queries)
        self.num_classes = None if num_classes is None else int(num_classes)
        self.randomized = bool(randomized)
        self.capabilities = Capabilities(
            gradients=False, scores=output != "label", output="class", randomized=self.randomized
        )
        self.queries = 0
        self._history = int(history)
        self._answers: OrderedDict[bytes, int] = OrderedDict()
        # classification semantics (labels, criteria, predictions) are a classifier's
        self._task = Classifier(nn.Identity(), bounds=self.bounds, num_classes=self.num_classes)

    # ------------------------------------------------------------------ the oracle
    def reset_queries(self) -> None:
        """Set :attr:`queries` to zero."""
        self.queries = 0

    def value_and_grad(self, x: torch.Tensor, loss_fn: Any, **adaptive: Any) -> Any:
        raise TypeError(
            "a black box offers no gradients; use a score- or decision-based attack "
            "(square, simba, hopskipjump) or a transfer attack from a proxy"
        )

    def _call_module(self, z: torch.Tensor, shape: tuple[int, ...]) -> Any:
        self.queries += int(z.shape[0])
        try:
            return self.module(z)
        except (RuntimeError, ValueError, TypeError) as e:
            raise ModelOutputError(
                f"the black box's function raised {type(e).__name__} on a batch of shape "
                f"{tuple(shape)}: {str(e).splitlines()[0] if str(e) else ''}"
            ) from e

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._call_module(self._module_input(x), tuple(x.shape))
        std = self._standardize(out, x.shape[0])
        if not self.randomized:
            self._check_consistent(x, std)
        return std

    def _standardize(self, out: Any, n: int) -> torch.Tensor:
        try:
            t = torch.as_tensor(np.asarray(out) if not isinstance(out, torch.Tensor) else out)
        except (TypeError, ValueError, RuntimeError):
            raise ModelOutputError(
                f"the black box returned {type(out).__name__}; expected a tensor or array of "
                + ("labels (N,)" if self.output == "label" else f"{self.output} (N, classes)")
            ) from None
        t = t.detach().to(self.device)
        if self.output == "label":
            return self._one_hot(t, n)
        if not t.is_floating_point():
            t = t.float()
        if t.dim() != 2 or t.shape[0] != n:
            raise ModelOutputError(
                f"the black box returned shape {tuple(t.shape)} for a batch of {n}; expected "
                f"{self.output} of shape ({n}, classes)"
            )
        t = t.to(self.work_dtype)
        if not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).reshape(n, -1).any(1).sum())
            raise ModelOutputError(
                f"the black box returned NaN or Inf {self.output} for {bad} of {n} inputs"
            )
        if self.num_classes is not None and t.shape[1] != self.num_classes:
            raise ModelOutputError(
                f"the black box returned {t.shape[1]} {self.output} per input but num_classes="
                f"{self.num_classes}"
            )
        if t.shape[1] < 2:
            raise ModelOutputError(
                f"the black box returned {t.shape[1]} score per input; expected one per class "
                "(at least 2)"
            )
        if self.output == "probs":
            sums = t.sum(1)
            if (t < -1e-6).any() or (t > 1 + 1e-6).any() or not torch.allclose(
                sums, torch.ones_like(sums), atol=1e-3
            ):
                raise ModelOutputError(
                    "the black box's probs are not probabilities (each row in [0, 1], summing to "
                    f"1; got row sums in [{float(sums.min()):.4g}, {float(sums.max()):.4g}]); use "
                    "output='logits' for unnormalized scores"
                )
            t = t.clamp_min(torch.finfo(t.dtype).tiny).log()
        return t

    def _one_hot(self, t: torch.Tensor, n: int) -> torch.Tensor:
        k = int(self.num_classes)  # type: ignore[arg-type]
        if t.dim() == 2 and t.shape[1] == 1:
            t = t[:, 0]
        if t.dim() != 1 or t.shape[0] != n:
            raise ModelOutputError(
                f"the black box returned shape {tuple(t.shape)} for a batch of {n}; a label "
                f"oracle returns one class index per input, shape ({n},)"
            )
        if t.is_floating_point():
            if not torch.isfinite(t).all():
                bad = int((~torch.isfinite(t)).sum())
                raise ModelOutputError(f"the black box returned NaN or Inf labels for {bad} of "
                                       f"{n} inputs")
            if (t != t.round()).any():
                raise ModelOutputError(
                    "the black box returned non-integer labels; a label oracle returns class "
                    "indices (use output='logits' or 'probs' for scores)"
                )
        elif t.dtype == torch.bool or t.is_complex():
            raise ModelOutputError(f"the black box returned labels of dtype {t.dtype}; expected "
                                   "integer class indices")
        t = t.long()
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= k):
            raise ModelOutputError(
                f"the black box returned labels in [{int(t.min())}, {int(t.max())}], outside "
                f"[0, {k - 1}] (num_classes={k})"
            )
        return torch.nn.functional.one_hot(t, k).to(self.work_dtype)

    def _check_consistent(self, x: torch.Tensor, outputs: torch.Tensor) -> None:
        labels = outputs.argmax(1).tolist()
        rows = x.detach().to("cpu", torch.float32).contiguous().reshape(x.shape[0], -1).numpy()
        for i, row in enumerate(rows):
            key = hashlib.blake2b(row.tobytes(), digest_size=16).digest()
            old = self._answers.get(key)
            if old is not None and old != labels[i]:
                raise ModelOutputError(
                    f"the black box answered class {labels[i]} for an input it had answered "
                    f"class {old} before: its decisions are not deterministic (dropout left on, "
                    "a randomized defense?); pass randomized=True if this is intended"
                )
            if old is None:
                self._answers[key] = labels[i]
                if len(self._answers) > self._history:
                    self._answers.popitem(last=False)


    def near_tie(self, outputs: torch.Tensor, rtol: float = 1e-4) -> torch.Tensor:
        if self.output == "label":  # one-hot rows: never a float tie
            return torch.zeros(outputs.shape[0], dtype=torch.bool, device=outputs.device)
        return super().near_tie(outputs, rtol)

    def __repr__(self) -> str:
        name = getattr(self.fn, "__name__", type(self.fn).__name__)
        return (f"BlackBox({name}, bounds={self.bounds}, output={self.output!r}, "
                f"max_queries={self.max_queries}, num_classes={self.num_classes})")


class QueryBudget:
    """Per-sample query ledger of one attack call.

    The limit is the smaller of the attack's own ``max_queries`` and the model's (a
    :class:`BlackBox`'s ``max_queries``); ``None`` when neither sets one. Queries already spent by
    the attack's set-up (``ctx.forward_passes``, e.g. probing the number of classes) are charged to
    the first sample. :meth:`query` evaluates rows owned by samples (several rows may belong to one
    sample) through ``ctx.logits`` (so ``forward_passes`` counts them) and charges each owner.
    """

    def __init__(self, ctx: AttackContext, limit: int | None = None) -> None:
        limits = [v for v in (limit, getattr(ctx.model, "max_queries", None)) if v is not None]
        self.limit: int | None = int(min(limits)) if limits else None
        self.ctx = ctx
        self.used = torch.zeros(ctx.n, dtype=torch.long, device=ctx.x.device)
        if ctx.forward_passes:
            self.used[0] += int(ctx.forward_passes)

    def remaining(self, index: torch.Tensor | None = None) -> torch.Tensor:
        """Queries left per sample (a large number when unlimited)."""
        used = self.used if index is None else self.used[index]
        if self.limit is None:
            return torch.full_like(used, 2**62)
        return (self.limit - used).clamp_min(0)

    def allows(self, index: torch.Tensor, k: int | torch.Tensor = 1) -> torch.Tensor:
        """Bool per sample of ``index``: at least ``k`` queries left."""
        return self.remaining(index) >= k

    def query(self, x: torch.Tensor, owners: torch.Tensor) -> torch.Tensor:
        """Outputs for the rows ``x``, each charged to the sample ``owners[i]``."""
        if x.shape[0] == 0:
            return torch.zeros(0, self.ctx.num_classes, device=x.device, dtype=x.dtype)
        counts = torch.bincount(owners, minlength=self.ctx.n)
        if self.limit is not None and bool((self.used + counts > self.limit).any()):
            raise QueryBudgetError(
                "an attack asked for more queries than a sample's budget allows "
                f"(limit {self.limit})"
            )
        self.used += counts
        return self.ctx.logits(x)
