"""HopSkipJump: a decision-based attack that needs only the model's label.

Chen, Jordan & Wainwright, "HopSkipJumpAttack: A Query-Efficient Decision-Based Attack", IEEE S&P
2020 (Algorithm 2; reference code ``hsja.py``). From an adversarial starting point it repeats:

1. **binary search** to the decision boundary between the clean input ``x*`` and the current
   adversarial point, to precision ``theta = gamma / d^{3/2}`` (L2) or ``gamma / d^2`` (L-inf) of
   the interpolation (L2: blending ``(1 - a) x* + a x``; L-inf: clipping ``x`` to the ``a``-box
   around ``x*``);
2. **gradient-direction estimate** at the boundary point by Monte-Carlo over ``B_t`` random unit
   directions ``u_b`` (Gaussian for L2, uniform for L-inf) at radius ``delta_t``, with the
   baseline-corrected decisions ``phi_b - mean(phi)`` (Eq. 16); ``B_t = B_0 sqrt(t)`` capped at
   ``max_evals`` (the paper's schedule, ``B_0 = 100``), ``delta_1 = 0.1 (hi - lo)`` and
   ``delta_t = sqrt(d) theta d_{t-1}`` (L2) or ``d theta d_{t-1}`` (L-inf), ``d_{t-1}`` the
   distance after the last binary search;
3. **geometric step-size search**: ``xi_t = ||x_t - x*|| / sqrt(t)``, halved until
   ``x_t + xi_t v_t`` is adversarial (``v_t`` the normalized estimate under L2, its sign under
   L-inf), then binary search again.

The starting point is, per sample, the nearest input of the batch that the model already
classifies as the goal requires (another image of the target class, as in the paper's targeted
setting), else uniform noise (up to ``init_attempts`` draws) blended back by binary search.

Queries are counted per sample (:class:`~medrobust.models.blackbox.QueryBudget`): a sample stops
when its budget (the attack's ``max_queries``, or a :class:`~medrobust.models.BlackBox`'s if
smaller) cannot pay for the next query, and the attack returns the last adversarial point it
found. HopSkipJump is a minimum-norm attack; with ``eps`` it answers the fixed-budget question
instead: a sample whose adversarial point is farther than ``eps`` is returned clean (a failure) and
samples stop as soon as they are within ``eps`` (``early_stop``). ``extra["distance_trace"]`` and
``extra["query_trace"]`` (``(iterations + 1, N)``) give the distance reached against the queries
spent, for success-versus-queries curves.
"""

from __future__ import annotations

import math

import torch

from medrobust.attacks.base import AttackContext, MinimumNormAttack, RunOutput
from medrobust.models.blackbox import QueryBudget
from medrobust.norms import L2, Linf, Norm, batch_view, get_norm

_INF = float("inf")


def _positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer; got {value!r}")
    return value


class HopSkipJump(MinimumNormAttack):
    """HopSkipJumpAttack (Chen et al., IEEE S&P 2020), L2 or L-inf, untargeted or targeted.

    Args:
        norm: ``"l2"`` or ``"linf"``.
        eps: optional budget: success then means adversarial within ``eps`` (see module doc).
        max_queries: the per-sample query budget (clean query and initialization included).
        max_iterations: the most gradient-estimate iterations.
        init_evals: ``B_0``, the directions of the first estimate (grows as ``sqrt(t)``).
        max_evals: the cap on the directions of one estimate.
        gamma: the binary-search precision constant (``theta = gamma / d^{3/2}`` or ``/ d^2``).
        init_attempts: uniform-noise draws tried per sample when no input of the batch can start.
        early_stop: with ``eps``, stop a sample once it is within ``eps`` (default: on).
        seed, generator: the randomness (noise starts and directions).
    """

    name = "hopskipjump"
    requires_gradients = False
    requires_scores = False

    def __init__(
        self,
        norm: str | Norm = "l2",
        *,
        eps: float | None = None,
        max_queries: int = 10_000,
        max_iterations: int = 64,
        init_evals: int = 100,
        max_evals: int = 10_000,
        gamma: float = 1.0,
        init_attempts: int = 100,
        early_stop: bool | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(norm, seed=seed, generator=generator)
        if not isinstance(self.norm, (L2, Linf)):
            raise ValueError(f"HopSkipJump supports norm 'l2' or 'linf'; got {self.norm.name!r}")
        if eps is not None and (isinstance(eps, bool) or not float(eps) >= 0 or
                                not math.isfinite(float(eps))):
            raise ValueError(f"eps must be a finite number >= 0 or None; got {eps!r}")
        if not (isinstance(gamma, (int, float)) and gamma > 0):
            raise ValueError(f"gamma must be > 0; got {gamma!r}")
        self.eps = None if eps is None else float(eps)
        self.max_queries = _positive_int(max_queries, "max_queries")
        self.max_iterations = _positive_int(max_iterations, "max_iterations")
        self.init_evals = _positive_int(init_evals, "init_evals")
        self.max_evals = _positive_int(max_evals, "max_evals")
        self.gamma = float(gamma)
        self.init_attempts = _positive_int(init_attempts, "init_attempts")
        self.early_stop = (eps is not None) if early_stop is None else bool(early_stop)

    # the optional budget is enforced (and reported) like a fixed-budget attack's
    def _budget(self, n: int, device: torch.device) -> torch.Tensor | None:
        if self.eps is None:
            return None
        return torch.full((n,), self.eps, device=device)

    def _norm_for_budget(self) -> Norm | None:
        return self.norm if self.eps is not None else None

    # ------------------------------------------------------------------ helpers
    def _interpolate(self, x0: torch.Tensor, xa: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        av = batch_view(a, x0)
        if isinstance(self.norm, L2):
            return (1 - av) * x0 + av * xa
        return torch.minimum(torch.maximum(xa, x0 - av), x0 + av)

    def _binary_search(
        self, ctx: AttackContext, budget: QueryBudget, idx: torch.Tensor, xa: torch.Tensor,
        out_a: torch.Tensor, theta: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Boundary points between ``ctx.x[idx]`` and the adversarial ``xa`` (each an evaluated
        adversarial tensor), their outputs, and the distance after the search."""
        x0 = ctx.x[idx]
        m = idx.numel()
        if isinstance(self.norm, L2):
            high = torch.ones(m, device=x0.device, dtype=x0.dtype)
            thr = theta
        else:
            high = self.norm.measure(xa - x0).to(x0.dtype)
            thr = torch.minimum(high * theta, theta)
        low = torch.zeros_like(high)
        best_x, best_out = xa.clone(), out_a.clone()
        while True:
            act = ((high - low) > thr) & budget.allows(idx)
            if not act.any():
                break
            a = act.nonzero().flatten()
            mid = (high[a] + low[a]) / 2
            xm = self._interpolate(x0[a], xa[a], mid)
            out = budget.query(xm, idx[a])
            adv = ctx.is_adversarial(out, idx[a])
            up, dn = a[adv], a[~adv]
            high[up] = mid[adv]
            best_x[up] = xm[adv]
            best_out[up] = out[adv].to(best_out.dtype)
            low[dn] = mid[~adv]
        if isinstance(self.norm, L2):
            dist = self.norm.measure(best_x - x0).to(x0.dtype)
        else:
            dist = high
        return best_x, best_out, dist

    def _initialize(
        self, ctx: AttackContext, budget: QueryBudget, out0: torch.Tensor, need: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Adversarial starting points for the samples ``need`` (bool ``(N,)``): returns the
        points, their outputs and a bool ``found`` (all ``(N, ...)``)."""
        x, n = ctx.x, ctx.n
        start, start_out = x.clone(), out0.clone()
        found = torch.zeros(n, dtype=torch.bool, device=x.device)
        idx = need.nonzero().flatten()
        if idx.numel() == 0:
            return start, start_out, found
        # 1) the nearest input of the batch that already meets sample i's goal
        goal = torch.stack([
            ctx.is_adversarial(out0, torch.full((n,), int(i), device=x.device)) for i in idx
        ])  # (m, N): out0[j] meets the goal of sample idx[m]
        d = torch.cdist(x[idx].reshape(idx.numel(), -1), x.reshape(n, -1))
        d = torch.where(goal, d, torch.full_like(d, _INF))
        d[torch.arange(idx.numel()), idx] = _INF
        j = d.argmin(1)
        has = torch.isfinite(d.gather(1, j[:, None])[:, 0]) & budget.allows(idx)
        if has.any():
            a, jj = idx[has], j[has]
            cand = x[jj] if ctx.mask is None else torch.where(ctx.mask[a] != 0, x[jj], x[a])
            out = budget.query(cand, a)
            ok = ctx.is_adversarial(out, a)
            start[a[ok]], start_out[a[ok]], found[a[ok]] = cand[ok], out[ok], True
        # 2) uniform noise (inside the mask)
        lo, hi = ctx.bounds
        for _ in range(self.init_attempts):
            rest = need & ~found & budget.allows(torch.arange(n, device=x.device))
            r = rest.nonzero().flatten()
            if r.numel() == 0:
                break
            noise = lo + (hi - lo) * ctx.rand(r.numel(), *x.shape[1:]).to(x.dtype)
            if ctx.mask is not None:
                noise = torch.where(ctx.mask[r] != 0, noise, x[r])
            out = budget.query(noise, r)
            ok = ctx.is_adversarial(out, r)
            start[r[ok]], start_out[r[ok]], found[r[ok]] = noise[ok], out[ok], True
        return start, start_out, found

    def _estimate(
        self, ctx: AttackContext, budget: QueryBudget, idx: torch.Tensor, cur: torch.Tensor,
        delta: torch.Tensor, evals: torch.Tensor, num_evals: int
    ) -> torch.Tensor:
        """The normalized gradient-direction estimate at the boundary points ``cur`` (Eq. 16),
        ``evals[i] <= num_evals`` directions for sample ``idx[i]``."""
        shape = cur.shape[1:]
        grads = torch.zeros_like(cur)
        per = max(1, 16384 // max(1, num_evals))  # samples per query chunk
        for s in range(0, idx.numel(), per):
            sl = slice(s, min(idx.numel(), s + per))
            c, m = cur[sl], cur[sl].shape[0]
            if isinstance(self.norm, L2):
                rv = ctx.randn(m, num_evals, *shape).to(c.dtype)
            else:
                rv = (2 * ctx.rand(m, num_evals, *shape) - 1).to(c.dtype)
            if ctx.mask is not None:
                rv = rv * ctx.mask[idx[sl]].unsqueeze(1)
            rv = rv / rv.flatten(2).norm(dim=2).clamp_min(1e-12).view(m, num_evals,
                                                                       *([1] * len(shape)))
            dv = delta[sl].view(m, 1, *([1] * len(shape)))
            pert = ctx.clip(c.unsqueeze(1) + dv * rv)
            rv = (pert - c.unsqueeze(1)) / dv
            keep = torch.arange(num_evals, device=c.device)[None, :] < evals[sl][:, None]
            owners = idx[sl][:, None].expand(m, num_evals)
            rows = pert.reshape(m * num_evals, *shape)[keep.flatten()]
            out = budget.query(rows, owners[keep])
            phi_rows = ctx.is_adversarial(out, owners[keep]).to(c.dtype) * 2 - 1
            phi = torch.zeros(m, num_evals, device=c.device, dtype=c.dtype)
            phi[keep] = phi_rows
            cnt = keep.sum(1).to(c.dtype).clamp_min(1)
            mean = phi.sum(1) / cnt
            centered = torch.where(keep, phi - mean[:, None], torch.zeros_like(phi))
            # all +1 or all -1: the mean direction itself (the reference code's special case)
            sign = torch.where(mean.abs() == 1, mean, torch.zeros_like(mean))
            w = centered + sign[:, None] * keep.to(c.dtype)
            g = (w.view(m, num_evals, *([1] * len(shape))) * rv).sum(1) / batch_view(cnt, c)
            grads[sl] = g
        if isinstance(self.norm, L2):
            return grads / batch_view(grads.flatten(1).norm(dim=1).clamp_min(1e-12), grads)
        return grads.sign()

    # ------------------------------------------------------------------ run
    def run(self, ctx: AttackContext) -> RunOutput:
        x, n = ctx.x, ctx.n
        dev, dt = x.device, x.dtype
        budget = QueryBudget(ctx, self.max_queries)
        all_idx = ctx.all_index()
        lo, hi = ctx.bounds
        free = (
            torch.full((n,), float(x[0].numel()), device=dev)
            if ctx.mask is None
            else (ctx.mask != 0).flatten(1).sum(1).to(torch.float64).clamp_min(1)
        ).to(dt)
        theta = self.gamma / (free * free.sqrt() if isinstance(self.norm, L2) else free * free)

        usable = budget.allows(all_idx)
        out0 = torch.zeros(n, ctx.num_classes, device=dev, dtype=dt)
        u = usable.nonzero().flatten()
        out0[u] = budget.query(x[u], u).to(dt)
        clean_adv = torch.zeros(n, dtype=torch.bool, device=dev)
        clean_adv[u] = ctx.is_adversarial(out0[u], u)

        cur, cur_out, found = self._initialize(ctx, budget, out0, usable & ~clean_adv)
        dist = torch.full((n,), _INF, device=dev, dtype=dt)
        dist[clean_adv] = 0
        dist_post = dist.clone()
        f = found.nonzero().flatten()
        if f.numel():
            cur[f], cur_out[f], dist_post[f] = self._binary_search(
                ctx, budget, f, cur[f], cur_out[f], theta[f]
            )
            dist[f] = self.norm.measure(cur[f] - x[f]).to(dt)
        eps = self.eps
        done = clean_adv | ~found
        best_x, best_out, best_dist = cur.clone(), cur_out.clone(), dist.clone()
        if eps is not None and self.early_stop:
            done |= dist <= eps
        dist_trace, query_trace = [dist.clone()], [budget.used.clone()]

        for t in range(1, self.max_iterations + 1):
            act = (~done & (budget.remaining(all_idx) >= 2)).nonzero().flatten()
            if act.numel() == 0:
                break
            num_evals = int(min(self.init_evals * math.sqrt(t), self.max_evals))
            if t == 1:
                delta = torch.full((act.numel(),), 0.1 * (hi - lo), device=dev, dtype=dt)
            elif isinstance(self.norm, L2):
                delta = free[act].sqrt() * theta[act] * dist_post[act]
            else:
                delta = free[act] * theta[act] * dist_post[act]
            # keep one query for the step-size search
            evals = (budget.remaining(act) - 1).clamp(max=num_evals)
            update = self._estimate(ctx, budget, act, cur[act], delta, evals, num_evals)
            # geometric progression of the step size
            step = dist[act] / math.sqrt(t)
            accepted = torch.zeros(act.numel(), dtype=torch.bool, device=dev)
            cand_x, cand_out = cur[act].clone(), cur_out[act].clone()
            while True:
                pend = (~accepted & budget.allows(act) & (step > 1e-12 * (hi - lo)))
                if not pend.any():
                    break
                p = pend.nonzero().flatten()
                xs = ctx.clip(cur[act[p]] + batch_view(step[p], cur[act[p]]) * update[p])
                out = budget.query(xs, act[p])
                ok = ctx.is_adversarial(out, act[p])
                cand_x[p[ok]], cand_out[p[ok]] = xs[ok], out[ok].to(dt)
                accepted[p[ok]] = True
                step[p[~ok]] /= 2
            # samples that could not step are finished (budget spent or no step found)
            done[act[~accepted]] = True
            a = act[accepted]
            if a.numel():
                nx, no, dp = self._binary_search(
                    ctx, budget, a, cand_x[accepted], cand_out[accepted], theta[a]
                )
                nd = self.norm.measure(nx - x[a]).to(dt)
                cur[a], cur_out[a], dist[a], dist_post[a] = nx, no, nd, dp
                better = nd < best_dist[a]  # the closest adversarial point found is returned
                best_x[a[better]], best_out[a[better]] = nx[better], no[better]
                best_dist[a[better]] = nd[better]
            if eps is not None and self.early_stop:
                done |= best_dist <= eps
            dist_trace.append(best_dist.clone())
            query_trace.append(budget.used.clone())

        adv, adv_out = best_x, best_out
        fail = ~found & ~clean_adv
        if eps is not None:
            fail |= best_dist > eps
        if fail.any():  # the clean input (already evaluated, unless no query was allowed)
            adv, adv_out = adv.clone(), adv_out.clone()
            adv[fail] = x[fail]
            adv_out[fail] = out0[fail]
        logits = adv_out if bool(usable.all()) else None
        return RunOutput(
            adv,
            logits,
            extra={
                "queries": budget.used.cpu(),
                "distance_trace": torch.stack(dist_trace).cpu(),
                "query_trace": torch.stack(query_trace).cpu(),
            },
        )


__all__ = ["HopSkipJump", "get_norm"]
