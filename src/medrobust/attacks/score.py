"""SimBA: a score-based attack that climbs the loss one basis direction at a time.

Guo, Gardner, You, Wilson & Weinberger, "Simple Black-box Adversarial Attacks", ICML 2019
(Algorithm 1; reference code ``simba.py``). Directions ``q`` are drawn without replacement from an
orthonormal basis; for each, ``x - eps q`` is tried first and then ``x + eps q``, and the first that
lowers the probability of the true class (raises the target's, when targeted) is kept. Each
iteration costs one or two queries per sample; a sample stops when it is adversarial, when the
basis is exhausted, or when its query budget is spent.

Bases:

* ``"pixel"`` — the standard basis (one input element at a time), in random order;
* ``"dct"`` — the orthonormal DCT-II basis per channel (SimBA-DCT), low frequencies first: the
  block of the lowest ``freq_ratio`` of the frequencies along every axis (the paper's 28 of 224,
  1/8) in random order, then rings ``stride_ratio`` wide (7 of 224, 1/32), each in random order, as
  the reference ``block_order``. Separable, so it works for any rank (1D signals, 2D images, 3D
  volumes) and any shape.

The "probability" is the criterion's loss (``loss="ce"``: ``-log p_y``, the paper's objective up
to a monotone map; ``"margin"`` for the logit margin), so it works on any model with scores: a
classifier, or a :class:`~medrobust.models.BlackBox` with ``output="logits"`` or ``"probs"``.
"""

from __future__ import annotations

import math

import torch

from medrobust.attacks.base import Attack, AttackContext, RunOutput
from medrobust.models.blackbox import QueryBudget

BASES = ("pixel", "dct")


def dct_matrix(size: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The orthonormal DCT-II basis: row ``k`` is the ``k``-th basis function of length ``size``."""
    n = torch.arange(size, dtype=dtype)
    k = n[:, None]
    m = torch.cos(math.pi * (2 * n[None, :] + 1) * k / (2 * size)) * math.sqrt(2.0 / size)
    m[0] /= math.sqrt(2.0)
    return m


def _frequency_group(shape: tuple[int, ...], freq_ratio: float, stride_ratio: float
                     ) -> torch.Tensor:
    """Group of every (channel, frequency...) coordinate: 0 for the low block, then the rings."""
    spatial = shape[1:]
    if not spatial:
        return torch.zeros(shape, dtype=torch.float64).reshape(-1)
    grids = torch.meshgrid(*[torch.arange(s, dtype=torch.float64) / s for s in spatial],
                           indexing="ij")
    rel = torch.stack(grids).amax(0)
    group = torch.where(rel < freq_ratio, torch.zeros_like(rel),
                        1 + torch.floor((rel - freq_ratio) / stride_ratio))
    return group.expand(shape).reshape(-1)


class SimBA(Attack):
    """Simple Black-box Attack (Guo et al., ICML 2019), pixel or DCT basis, (un)targeted.

    Args:
        basis: ``"pixel"`` or ``"dct"``.
        step: ``eps`` of the paper, the length of each step in input units (default
            ``0.2 * (hi - lo)``, the paper's 0.2 for [0, 1] images).
        max_queries: the per-sample query budget (the clean query included).
        max_iterations: the most directions tried per sample (default: the whole basis).
        freq_ratio, stride_ratio: the DCT order (the low-frequency block and the ring width as a
            fraction of each axis).
        loss: ``"ce"`` (the class probability) or ``"margin"``.
        seed, generator: the random order of the directions.
    """

    name = "simba"
    requires_gradients = False
    requires_scores = True

    def __init__(
        self,
        basis: str = "dct",
        *,
        step: float | None = None,
        max_queries: int = 10_000,
        max_iterations: int | None = None,
        freq_ratio: float = 1 / 8,
        stride_ratio: float = 1 / 32,
        loss: str = "ce",
        seed: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(loss=loss, seed=seed, generator=generator)
        if basis not in BASES:
            raise ValueError(f"basis must be one of {BASES}; got {basis!r}")
        if step is not None and not (isinstance(step, (int, float)) and step > 0
                                     and math.isfinite(step)):
            raise ValueError(f"step must be a finite number > 0; got {step!r}")
        for name, v in (("max_queries", max_queries), ("max_iterations", max_iterations)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be a positive integer; got {v!r}")
        for name, r in (("freq_ratio", freq_ratio), ("stride_ratio", stride_ratio)):
            if not 0 < r <= 1:
                raise ValueError(f"{name} must lie in (0, 1]; got {r!r}")
        self.basis = basis
        self.step = None if step is None else float(step)
        self.max_queries = max_queries
        self.max_iterations = max_iterations
        self.freq_ratio = float(freq_ratio)
        self.stride_ratio = float(stride_ratio)

    def _order(self, ctx: AttackContext) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample order of the basis coordinates ``(N, D)`` and how many are usable ``(N,)``."""
        x = ctx.x
        n, d = x.shape[0], x[0].numel()
        key = torch.rand(n, d, generator=ctx.generator, dtype=torch.float64)
        if self.basis == "dct":
            key = key + 2 * _frequency_group(tuple(x.shape[1:]), self.freq_ratio,
                                             self.stride_ratio)[None, :]
            usable = torch.full((n,), d, dtype=torch.long)
        elif ctx.mask is not None:  # pixel basis: only the allowed elements
            allowed = (ctx.mask != 0).reshape(n, -1).cpu()
            key = key + 2 * (~allowed).to(key.dtype)
            usable = allowed.sum(1)
        else:
            usable = torch.full((n,), d, dtype=torch.long)
        return key.argsort(1).to(x.device), usable.to(x.device)

    def _directions(self, ctx: AttackContext, coords: torch.Tensor, rows: torch.Tensor,
                    mats: list[torch.Tensor]) -> torch.Tensor:
        """Unit basis vectors for flat coordinates ``coords`` of samples ``rows``."""
        x = ctx.x
        shape = x.shape[1:]
        m = coords.numel()
        if self.basis == "pixel":
            q = torch.zeros(m, x[0].numel(), device=x.device, dtype=x.dtype)
            q[torch.arange(m), coords] = 1
            return q.view(m, *shape)
        idx = torch.unravel_index(coords, tuple(shape))
        v = torch.ones(m, device=x.device, dtype=x.dtype)
        for axis, mat in enumerate(mats):
            row = mat[idx[axis + 1]]  # (m, S_axis)
            v = (v.unsqueeze(-1) * row.view(m, *([1] * axis), -1))
        q = torch.zeros(m, *shape, device=x.device, dtype=x.dtype)
        q[torch.arange(m), idx[0]] = v.reshape(m, *shape[1:])
        if ctx.mask is not None:
            q = q * ctx.mask[rows]
        return q

    def run(self, ctx: AttackContext) -> RunOutput:
        x, n = ctx.x, ctx.n
        lo, hi = ctx.bounds
        eps = self.step if self.step is not None else 0.2 * (hi - lo)
        budget = QueryBudget(ctx, self.max_queries)
        all_idx = ctx.all_index()
        mats = [dct_matrix(s).to(x.device, x.dtype) for s in x.shape[2:]]
        order, usable = self._order(ctx)
        limit = int(usable.max())
        if self.max_iterations is not None:
            limit = min(limit, self.max_iterations)

        ok = budget.allows(all_idx)
        u = ok.nonzero().flatten()
        cur = x.clone()
        out = torch.zeros(n, ctx.num_classes, device=x.device, dtype=x.dtype)
        out[u] = budget.query(x[u], u).to(x.dtype)
        loss = torch.full((n,), -math.inf, device=x.device, dtype=x.dtype)
        loss[u] = ctx.criterion.loss(out[u], u).to(x.dtype)
        success = torch.zeros(n, dtype=torch.bool, device=x.device)
        success[u] = ctx.is_adversarial(out[u], u)
        trace_q, trace_s = [budget.used.clone()], [success.clone()]

        for t in range(limit):
            act = (~success & (t < usable) & budget.allows(all_idx)).nonzero().flatten()
            if act.numel() == 0:
                break
            q = self._directions(ctx, order[act, t], act, mats)
            improved = torch.zeros(act.numel(), dtype=torch.bool, device=x.device)
            for sign in (-1.0, 1.0):
                p = (~improved & budget.allows(act)).nonzero().flatten()
                if p.numel() == 0:
                    break
                cand = ctx.clip(cur[act[p]] + sign * eps * q[p])
                moved = (cand != cur[act[p]]).flatten(1).any(1)
                p, cand = p[moved], cand[moved]
                if p.numel() == 0:
                    continue
                o = budget.query(cand, act[p])
                lc = ctx.criterion.loss(o, act[p]).to(x.dtype)
                better = lc > loss[act[p]]
                b = act[p[better]]
                cur[b], out[b], loss[b] = cand[better], o[better].to(x.dtype), lc[better]
                success[b] = ctx.is_adversarial(o[better], b)
                improved[p[better]] = True
            trace_q.append(budget.used.clone())
            trace_s.append(success.clone())
        return RunOutput(
            cur,
            out if bool(ok.all()) else None,
            extra={
                "queries": budget.used.cpu(),
                "query_trace": torch.stack(trace_q).cpu(),
                "success_trace": torch.stack(trace_s).cpu(),
            },
        )


__all__ = ["BASES", "SimBA", "dct_matrix"]
