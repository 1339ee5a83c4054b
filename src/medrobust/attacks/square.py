"""Square Attack (Andriushchenko, Croce, Flammarion & Hein, "Square Attack: a query-efficient
black-box adversarial attack via random search", ECCV 2020), L-inf and L2.

A score-based random search: it needs the model's outputs only, never a gradient. Per sample, the
current perturbation changes inside one random square (a cube for volumes, a segment for signals)
whose side ``s`` follows the paper's schedule: the fraction ``p`` of changed positions starts at
``p_init`` and halves after iterations 10, 50, 200, 500, 1000, 2000, 4000, 6000 and 8000 (with
``rescale_schedule`` those checkpoints are scaled from 10,000 to ``n_queries``), and
``s = round((p * positions) ** (1 / rank))``. A candidate is kept when it lowers the loss (the
margin ``z_y - max_{j != y} z_j`` by default, or the cross-entropy); a sample stops as soon as it is
adversarial, and queries are counted per sample.

* L-inf (Algorithm 2 of the paper): start from vertical stripes ``x +- eps`` (one random sign per
  channel and position along the last axis); each step sets the square of every channel to
  ``x +- eps`` with a random sign per channel.
* L2 (Algorithm 3): start from a grid of squares holding the paper's pattern ``eta`` (nested
  rectangles of weights ``1 / (k + 1)^2``, one half positive, one half negative) with random signs,
  rescaled to norm ``eps``; each step moves the mass of a second random square into the first one,
  re-drawn as ``eta`` plus the old content, per channel, so that the norm stays ``eps``.

Follows the reference code (``fra31/auto-attack``, ``square.py``) except that every sample draws its
own square (the reference draws one position per batch), the model's bounds replace [0, 1], any
input rank works, and a mask restricts the perturbation.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from medrobust.attacks.base import AttackContext, FixedBudgetAttack, RunOutput
from medrobust.norms import Norm, batch_view, flat

_CHECKPOINTS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def p_selection(p_init: float, it: int, n_queries: int, rescale: bool = True) -> float:
    """The fraction of positions changed at iteration ``it`` (the paper's piecewise-constant
    schedule, halving after each checkpoint; rescaled from 10,000 to ``n_queries`` iterations)."""
    if rescale:
        it = int(it / n_queries * 10000)
    return p_init / 2 ** sum(it > c for c in _CHECKPOINTS)


def _nested_boxes(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype
                  ) -> torch.Tensor:
    """The paper's ``M(r, s)``: sum over the boxes centred at ``shape // 2`` that contain a position
    of ``1 / (k + 1)^2`` (``k`` the box's half-width), for any number of axes."""
    grids = torch.meshgrid(*[torch.arange(n, device=device) for n in shape], indexing="ij")
    cheb = torch.zeros(shape, dtype=torch.long, device=device)
    for g, n in zip(grids, shape, strict=True):
        cheb = torch.maximum(cheb, (g - n // 2).abs())
    kmax = max(n // 2 + 1 for n in shape)
    w = 1.0 / (torch.arange(kmax, device=device, dtype=dtype) + 1) ** 2
    tail = w.flip(0).cumsum(0).flip(0)  # tail[k] = sum_{j >= k} w_j
    return tail[cheb.clamp_max(kmax - 1)]


def eta_pattern(side: int, rank: int, axis: int, device: torch.device, dtype: torch.dtype
                ) -> torch.Tensor:
    """The L2 pattern ``eta`` of side ``side`` in ``rank`` dimensions: the first half along ``axis``
    holds ``M``, the second ``-M``; unit L2 norm."""
    shape = [side] * rank
    first = list(shape)
    first[axis] = side // 2
    second = list(shape)
    second[axis] = side - side // 2
    parts = []
    if side // 2 > 0:
        parts.append(_nested_boxes(tuple(first), device, dtype))
    parts.append(-_nested_boxes(tuple(second), device, dtype))
    eta = torch.cat(parts, dim=axis)
    return eta / eta.norm().clamp_min(1e-12)


class Square(FixedBudgetAttack):
    """Square Attack (Andriushchenko et al., ECCV 2020): score-based, L-inf and L2.

    Args:
        eps: the budget in input units (a number or one per sample).
        norm: "linf" or "l2".
        n_queries: the most model queries per sample and restart, the first one (the starting
            point) included (paper: 10,000; AutoAttack: 5,000).
        p_init: the initial fraction of positions in a square (AutoAttack: 0.8; the paper tunes
            0.05 for L-inf and 0.1 for L2 on ImageNet-size models).
        restarts: runs from new random starts on the samples not yet fooled.
        loss: "margin" (default; the paper's untargeted loss) or "ce"; targeted attacks use the
            loss of the target class (the paper uses "ce" there).
        rescale_schedule: scale the checkpoints of the ``p`` schedule from 10,000 iterations to
            ``n_queries`` (AutoAttack's standard version does not: ``False``).
        seed, generator: the randomness of the search.

    ``result.extra["queries"]`` holds the queries each sample used (its clean check included).
    """

    name = "square"
    requires_gradients = False
    requires_scores = True
    supports_multilabel = True  # the search uses only the criterion's loss and success test
    supports_dense = False
    supported_norms = ("linf", "l2")

    def __init__(
        self,
        eps: float | torch.Tensor,
        norm: str | Norm = "linf",
        *,
        n_queries: int = 5000,
        p_init: float = 0.8,
        restarts: int = 1,
        loss: str = "margin",
        rescale_schedule: bool = True,
        seed: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(eps, norm, loss=loss, seed=seed, generator=generator)
        if self.norm.name not in self.supported_norms:
            raise ValueError(f"Square supports norm 'linf' or 'l2'; got {self.norm.name!r}")
        for name, v in (("n_queries", n_queries), ("restarts", restarts)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer; got {v!r}")
        if not 0.0 < p_init <= 1.0:
            raise ValueError(f"p_init must lie in (0, 1]; got {p_init!r}")
        self.n_queries = n_queries
        self.p_init = float(p_init)
        self.restarts = restarts
        self.rescale_schedule = bool(rescale_schedule)

    @classmethod
    def fast_config(cls) -> dict[str, Any]:
        """Small settings for quick tests."""
        return {"n_queries": 30}

    # ------------------------------------------------------------------ run
    def run(self, ctx: AttackContext) -> RunOutput:
        x = ctx.x
        n = ctx.n
        eps = self._budget(n, x.device).to(x.dtype)
        queries = torch.zeros(n, dtype=torch.long, device=x.device)
        logits = ctx.logits(x)
        queries += 1
        index = ctx.all_index()
        success = ctx.is_adversarial(logits, index)
        best = x.clone()
        best_logits = logits.clone()
        best_loss = -ctx.criterion.loss(logits, index)
        # a black box's per-sample query budget (BlackBox(max_queries=...)) caps every sample
        cap = getattr(ctx.model, "max_queries", None)
        for _ in range(self.restarts):
            live = ~success if cap is None else ~success & (queries < int(cap))
            idx = live.nonzero().flatten()
            if idx.numel() == 0:
                break
            allowance = None if cap is None else int(cap) - queries[idx]
            adv, lg, loss, ok, q = self._single_run(ctx, idx, eps[idx], allowance)
            queries[idx] += q
            take = ok | (loss < best_loss[idx])
            sel = idx[take]
            best[sel] = adv[take]
            best_logits[sel] = lg[take]
            best_loss[sel] = loss[take]
            success[sel] = ok[take]
        return RunOutput(best, best_logits, extra={"queries": queries.cpu(),
                                                   "loss": (-best_loss).cpu()})

    def _single_run(self, ctx: AttackContext, index: torch.Tensor, eps: torch.Tensor,
                    allowance: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                               torch.Tensor]:
        """One run of the random search; ``allowance``: queries each sample may still spend."""
        x0 = ctx.x[index]
        shape = x0.shape
        # signals without a spatial axis are one channel over their features
        xs = x0 if x0.dim() > 2 else x0.unsqueeze(1)
        mask = None if ctx.mask is None else ctx.mask[index].reshape(xs.shape)
        spatial = tuple(xs.shape[2:])
        rank, c = len(spatial), xs.shape[1]
        n_pos = math.prod(spatial)
        linf = self.norm.name == "linf"
        e = batch_view(eps, xs)
        lo, hi = ctx.bounds

        def evaluate(xa: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
            lg = ctx.logits(xa.view((-1,) + shape[1:]))
            ok = ctx.is_adversarial(lg, index[rows])
            return lg, -ctx.criterion.loss(lg, index[rows]), ok

        if linf:
            stripes = self._signs((xs.shape[0], c) + (1,) * (rank - 1) + (spatial[-1],), ctx)
            delta = e * stripes.expand_as(xs)
        else:
            delta = self._l2_init(ctx, xs, spatial, e)
        if mask is not None:
            delta = delta * mask
        if not linf:
            delta = delta * e / batch_view(flat(delta).norm(dim=1).clamp_min(1e-12), delta)
        x_best = ctx.clip(xs + delta)
        all_rows = torch.arange(xs.shape[0], device=xs.device)
        logits, loss, ok = evaluate(x_best, all_rows)
        queries = torch.ones(xs.shape[0], dtype=torch.long, device=xs.device)
        grids = [torch.arange(s, device=xs.device) for s in spatial]
        etas: dict[int, torch.Tensor] = {}  # the L2 patterns by side, in every orientation
        for it in range(self.n_queries - 1):
            live = ~ok if allowance is None else ~ok & (queries < allowance)
            rows = live.nonzero().flatten()
            if rows.numel() == 0:
                break
            m = rows.numel()
            p = p_selection(self.p_init, it, self.n_queries, self.rescale_schedule)
            side = max(int(round((p * n_pos) ** (1.0 / rank))), 1 if linf else 3)
            if not linf and side % 2 == 0:
                side += 1
            side = min(side, min(spatial))
            xc, xb = xs[rows], x_best[rows]
            win, local = self._window(ctx, m, spatial, side, grids)
            allowed = win if mask is None else win * mask[rows]
            if linf:
                signs = self._signs((m, c) + (1,) * rank, ctx)
                x_new = torch.where(allowed != 0, ctx.clip(xc + e[rows] * signs), xb)
            else:
                x_new = self._l2_step(ctx, xc, xb, e[rows], win, local, side, grids, mask, rows,
                                      etas)
            lg, new_loss, new_ok = evaluate(x_new, rows)
            queries[rows] += 1
            improved = (new_loss < loss[rows]) | new_ok
            sel = rows[improved]
            x_best[sel] = x_new[improved]
            logits[sel] = lg[improved]
            loss[sel] = torch.where(new_loss < loss[rows], new_loss, loss[rows])[improved]
            ok[sel] = new_ok[improved]
        return x_best.view(shape), logits, loss, ok, queries

    def _signs(self, shape: tuple[int, ...], ctx: AttackContext) -> torch.Tensor:
        return (torch.randint(0, 2, shape, generator=ctx.generator) * 2 - 1).to(
            device=ctx.x.device, dtype=ctx.x.dtype)

    def _window(self, ctx: AttackContext, m: int, spatial: tuple[int, ...], side: int,
                grids: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """A random square of side ``side`` per sample: its 0/1 indicator ``(m, 1, *spatial)`` and,
        per axis, the positions relative to its corner (broadcastable to the same shape)."""
        rank = len(spatial)
        win = torch.ones((m, 1) + (1,) * rank, dtype=ctx.x.dtype, device=ctx.x.device)
        local = []
        for d, (size, g) in enumerate(zip(spatial, grids, strict=True)):
            v = torch.randint(0, size - side + 1, (m,), generator=ctx.generator).to(g.device)
            view = [m, 1] + [1] * rank
            view[2 + d] = size
            rel = (g.unsqueeze(0) - v.unsqueeze(1)).view(view)
            local.append(rel)
            win = win * ((rel >= 0) & (rel < side)).to(win.dtype)
        return win, local

    def _eta_at(self, ctx: AttackContext, m: int, side: int, rank: int,
                local: list[torch.Tensor], cache: dict[int, torch.Tensor]) -> torch.Tensor:
        """The pattern ``eta`` (random orientation per sample) placed at each sample's square."""
        if side not in cache:
            cache[side] = torch.stack([eta_pattern(side, rank, a, ctx.x.device, ctx.x.dtype)
                                       for a in range(rank)])
        etas = cache[side]
        axis = torch.randint(0, rank, (m,), generator=ctx.generator).to(ctx.x.device)
        idx = [axis.view([m, 1] + [1] * rank)] + [r.clamp(0, side - 1) for r in local]
        return etas[tuple(idx)]

    def _l2_init(self, ctx: AttackContext, xs: torch.Tensor, spatial: tuple[int, ...],
                 e: torch.Tensor) -> torch.Tensor:
        """A grid of ``eta`` squares of side ``min(spatial) // 5`` with random signs per sample,
        channel and square (Algorithm 3's initialization); the caller rescales it to ``eps``."""
        n, c, rank = xs.shape[0], xs.shape[1], len(spatial)
        side = max(min(spatial) // 5, 1)
        etas = torch.stack([eta_pattern(side, rank, a, xs.device, xs.dtype) for a in range(rank)])
        tile_idx, local = [], []
        valid = torch.ones(spatial, dtype=torch.bool, device=xs.device)
        counts = []
        for d, size in enumerate(spatial):
            start = (size - side * 5) // 2 if size >= side * 5 else 0
            count = max((size - start) // side, 1)
            pos = torch.arange(size, device=xs.device) - start
            view = [1] * rank
            view[d] = size
            ok = ((pos >= 0) & (pos < count * side)).view(view)
            valid = valid & ok
            tile_idx.append((pos.clamp(0, count * side - 1) // side).view(view))
            local.append((pos.clamp(0, count * side - 1) % side).view(view))
            counts.append(count)
        n_tiles = math.prod(counts)
        flat_tile = torch.zeros(spatial, dtype=torch.long, device=xs.device)
        for d in range(rank):
            flat_tile = flat_tile * counts[d] + tile_idx[d]
        signs = self._signs((n, c, n_tiles), ctx)
        axis = torch.randint(0, rank, (n, n_tiles), generator=ctx.generator).to(xs.device)
        ft = flat_tile.unsqueeze(0).expand((n,) + spatial)
        ax = axis.gather(1, ft.reshape(n, -1)).view((n,) + spatial)
        pattern = etas[(ax,) + tuple(lc.unsqueeze(0) for lc in local)]  # (n, *spatial)
        s = signs.gather(2, ft.reshape(n, 1, -1).expand(n, c, -1)).view((n, c) + spatial)
        return pattern.unsqueeze(1) * s * valid.to(xs.dtype)

    def _l2_step(self, ctx: AttackContext, xc: torch.Tensor, xb: torch.Tensor, e: torch.Tensor,
                 win1: torch.Tensor, local: list[torch.Tensor], side: int,
                 grids: list[torch.Tensor], mask: torch.Tensor | None, rows: torch.Tensor,
                 etas: dict[int, torch.Tensor]) -> torch.Tensor:
        """Algorithm 3's update: move the mass of a second square into the first one."""
        m, c = xc.shape[0], xc.shape[1]
        rank = xc.dim() - 2
        sp = tuple(range(2, xc.dim()))
        delta = xb - xc
        win2, _ = self._window(ctx, m, tuple(xc.shape[2:]), side, grids)
        union = torch.maximum(win1, win2)
        norm_w1 = (delta * win1).pow(2).sum(sp, keepdim=True).sqrt()
        norm_img = batch_view(flat(delta).norm(dim=1), delta)
        norm_union = (delta * union).pow(2).sum(sp, keepdim=True).sqrt()
        eta = self._eta_at(ctx, m, side, rank, local, etas) * win1  # (m, 1, *spatial)
        new = eta * self._signs((m, c) + (1,) * rank, ctx) + delta * win1 / (1e-12 + norm_w1)
        if mask is not None:
            new = new * mask[rows]
        budget = ((e * e - norm_img * norm_img).clamp_min(0.0) / c + norm_union ** 2).sqrt()
        new = new / (1e-12 + new.pow(2).sum(sp, keepdim=True).sqrt()) * budget
        delta = delta * (1 - win2)
        delta = torch.where(win1 != 0, new, delta)
        if mask is not None:
            delta = delta * mask[rows]
        scale = e / batch_view(flat(delta).norm(dim=1).clamp_min(1e-12), delta)
        return ctx.clip(xc + delta * scale)


__all__ = ["Square", "eta_pattern", "p_selection"]
