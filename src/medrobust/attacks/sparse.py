"""Sparse attacks: they change few input elements (JSMA) or few pixels (One-Pixel).

* JSMA — Papernot, McDaniel, Jha, Fredrikson, Celik & Swami, "The Limitations of Deep Learning in
  Adversarial Settings", IEEE EuroS&P 2016: a greedy walk that, at every iteration, sets the pair of
  features with the largest adversarial saliency to the bound.
* One-Pixel — Su, Vargas & Sakurai, "One Pixel Attack for Fooling Deep Neural Networks", IEEE
  Transactions on Evolutionary Computation 23(5), 2019: differential evolution over the positions
  and values of ``k`` pixels, using only the model's probabilities.

Neither attack is budgeted by an eps-ball: JSMA's budget is the fraction ``gamma`` of features it
may change, One-Pixel's the number ``pixels`` of pixels. Both are therefore plain
:class:`~medrobust.attacks.base.Attack` subclasses, and both guarantee their budget by construction.
The result's ``perturbation_norms["l0"]`` counts changed elements and ``["pixels"]`` changed pixels
(all channels of one position counting once).
"""

from __future__ import annotations

import math

import torch

from medrobust import progress
from medrobust.attacks.base import Attack, AttackContext, RunOutput

_PAIR_BLOCK = 1 << 23  # elements of one (samples x rows x d) block of JSMA's pair scores


# ============================================================================ JSMA
def best_pairs(
    alpha: torch.Tensor, beta: torch.Tensor, domain: torch.Tensor, increase: bool,
    max_elements: int = _PAIR_BLOCK, prune: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The paper's saliency map over all feature pairs (Papernot et al. 2016, Algorithm 3).

    For every pair ``p != q`` of features in the search domain, with ``A = alpha_p + alpha_q`` (the
    target class's forward derivative) and ``B = beta_p + beta_q`` (the sum over the other classes):
    the pair is admissible when ``A > 0 and B < 0`` (increasing features; ``A < 0 and B > 0`` when
    decreasing them), and its saliency is ``-A * B``. Returns per sample the two feature indices of
    the admissible pair with the largest saliency, and whether an admissible pair exists.

    The search is exact over all pairs. With ``prune`` it is done as branch and bound: the
    saliency of any pair holding ``p`` is at most ``ub_p = relu(a_p + max a) * relu(-b_p - min
    b)``; the best pair among the features with the largest ``ub`` gives a lower bound ``L``, and
    only features with ``ub_p > L`` can be in a better pair, so only their ``(k x k)`` map is
    scored. Where too many features survive, the full ``(d x d)`` map is scored in blocks of rows
    (and of samples) of at most ``max_elements`` elements, so memory stays bounded for large ``d``.

    Args:
        alpha, beta: ``(m, d)`` forward derivatives.
        domain: ``(m, d)`` bool, the search domain.
        increase: the sign conditions of the increasing (theta > 0) or decreasing variant.
    """
    m, d = alpha.shape
    # the score is relu(A) * relu(-B): positive exactly on the admissible pairs. Features outside
    # the domain get a huge negative alpha and -beta, so their pairs score 0.
    big = torch.tensor(1e30 if alpha.dtype != torch.float16 else 6e4, dtype=alpha.dtype,
                       device=alpha.device)
    a = alpha if increase else -alpha  # A < 0, B > 0  <=>  -A > 0, -B < 0; -A*B is unchanged
    nb = -beta if increase else beta
    a = torch.where(domain, a, -big)
    nb = torch.where(domain, nb, -big)
    if prune and d > 64:
        ub = (a + a.amax(1, keepdim=True)).clamp(min=0) * (
            nb + nb.amax(1, keepdim=True)).clamp(min=0)
        k0 = min(d, 64)
        top = ub.topk(k0, dim=1).indices
        low, p, q = _gathered_best(a, nb, top, max_elements)
        k = int((ub > low[:, None]).sum(1).max())
        if k <= k0:
            return p, q, low > 0
        if k * k * 4 <= d * d:
            top = ub.topk(k, dim=1).indices
            val, p, q = _gathered_best(a, nb, top, max_elements)
            return p, q, val > 0
    best_score = torch.zeros(m, dtype=alpha.dtype, device=alpha.device)
    best_index = torch.zeros(m, dtype=torch.long, device=alpha.device)
    rows = max(1, min(d, max_elements // max(1, d)))
    samples = max(1, min(m, max_elements // max(1, rows * d)))
    for s0 in range(0, m, samples):
        s1 = min(m, s0 + samples)
        a_s, nb_s = a[s0:s1], nb[s0:s1]
        for r0 in range(0, d, rows):
            r1 = min(d, r0 + rows)
            # pairs (p, q) with p in [r0, r1) and q >= r0: the upper triangle, by symmetry
            score = (a_s[:, r0:r1, None] + a_s[:, None, r0:]).clamp_(min=0)
            score.mul_((nb_s[:, r0:r1, None] + nb_s[:, None, r0:]).clamp_(min=0))
            diag = torch.arange(r1 - r0, device=alpha.device)
            score[:, diag, diag] = 0  # p != q
            val, idx = score.reshape(s1 - s0, -1).max(1)
            width = d - r0
            flat = (idx // width + r0) * d + (idx % width + r0)
            better = val > best_score[s0:s1]  # strictly: the paper's "if ... > max"
            best_score[s0:s1] = torch.where(better, val, best_score[s0:s1])
            best_index[s0:s1] = torch.where(better, flat, best_index[s0:s1])
    found = best_score > 0
    return best_index // d, best_index % d, found


def _gathered_best(a: torch.Tensor, nb: torch.Tensor, idx: torch.Tensor, max_elements: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The best pair among the features ``idx`` ``(m, k)`` (distinct per row): score, p, q."""
    m, k = idx.shape
    ag, ng = a.gather(1, idx), nb.gather(1, idx)
    samples = max(1, min(m, max_elements // max(1, k * k)))
    vals, flats = [], []
    diag = torch.arange(k, device=a.device)
    for s0 in range(0, m, samples):
        s1 = min(m, s0 + samples)
        score = (ag[s0:s1, :, None] + ag[s0:s1, None, :]).clamp_(min=0)
        score.mul_((ng[s0:s1, :, None] + ng[s0:s1, None, :]).clamp_(min=0))
        score[:, diag, diag] = 0
        v, f = score.reshape(s1 - s0, -1).max(1)
        vals.append(v)
        flats.append(f)
    val, flat = torch.cat(vals), torch.cat(flats)
    p = idx.gather(1, (flat // k)[:, None])[:, 0]
    q = idx.gather(1, (flat % k)[:, None])[:, 0]
    return val, p, q


class JSMA(Attack):
    """Jacobian-based Saliency Map Attack (Papernot et al., "The Limitations of Deep Learning in
    Adversarial Settings", IEEE EuroS&P 2016), the pairwise version of the paper (Algorithms 2-3).

    Every iteration computes, for the samples still active, the forward derivative of the logits
    (the paper uses the last hidden layer rather than the softmax): ``alpha`` for the target class
    and ``beta`` summed over all other classes, then the saliency of *every* pair of features still
    in the search domain (:func:`best_pairs`, the exact ``(d x d)`` map, in blocks), and moves the
    most salient pair by ``theta * (hi - lo)``, clipped to the bounds. A feature leaves the search
    domain when it reaches the bound (with ``|theta| = 1``, after one change). A sample stops when
    it reaches its goal, when its domain holds fewer than two features, or after
    ``floor(gamma * d / 2)`` iterations, so at most ``gamma * d`` features change (``d`` = all input
    elements, channels included).

    Args:
        theta: the change per selected feature as a fraction of the bounds' range; ``+1`` sets
            features to the upper bound (the paper's increasing variant), ``-1`` to the lower
            bound (the decreasing variant). Any value in ``[-1, 1]`` except 0.
        gamma: the maximum fraction of features changed (the paper's Upsilon: 14.5% on MNIST).
        untargeted_target: how an untargeted attack picks its target class, which the paper does
            not define (it is targeted): ``"runner_up"`` (default) — at every iteration the
            highest-scoring class other than the label, so the walk pushes toward the nearest
            decision boundary; ``"loss"`` — ``alpha`` is the gradient of the criterion's loss
            (CE or margin, see ``loss``) and ``beta = -alpha``, i.e. the pair that increases the
            loss most under the sign conditions.
        fallback: when no pair meets the paper's sign conditions (where the paper's loop would
            stall), move the two domain features with the largest ``sign(theta) * (alpha - beta)``
            instead of stopping. ``False`` stops the sample there (a failure).
        max_pair_elements: memory bound of one block of pair scores (elements).
        loss, seed, generator: see :class:`~medrobust.attacks.base.Attack` (JSMA is deterministic).

    A sample the model already gets wrong (untargeted) or already puts in the target class stays
    unchanged. ``extra["iterations"]`` holds the iterations spent per sample.
    """

    name = "jsma"

    def __init__(
        self,
        theta: float = 1.0,
        gamma: float = 0.145,
        *,
        untargeted_target: str = "runner_up",
        fallback: bool = True,
        max_pair_elements: int = _PAIR_BLOCK,
        loss: str = "ce",
        seed: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(loss=loss, seed=seed, generator=generator)
        if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not (
            -1.0 <= theta <= 1.0) or theta == 0:
            raise ValueError(f"theta must be a nonzero number in [-1, 1]; got {theta!r}")
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not (
            0.0 < gamma <= 1.0):
            raise ValueError(f"gamma must be in (0, 1]; got {gamma!r}")
        if untargeted_target not in ("runner_up", "loss"):
            raise ValueError(
                f"untargeted_target must be 'runner_up' or 'loss'; got {untargeted_target!r}")
        if int(max_pair_elements) < 1:
            raise ValueError(f"max_pair_elements must be >= 1; got {max_pair_elements!r}")
        self.theta = float(theta)
        self.gamma = float(gamma)
        self.untargeted_target = untargeted_target
        self.fallback = bool(fallback)
        self.max_pair_elements = int(max_pair_elements)

    def max_iterations(self, d: int) -> int:
        """The paper's ``max_iter = floor(d * gamma / 2)`` (two features per iteration)."""
        return int(math.floor(d * self.gamma / 2 + 1e-9))

    def _alpha_beta(self, ctx: AttackContext, xa: torch.Tensor, index: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits and the (alpha, beta) forward derivatives of the active rows ``index``."""
        m = xa.shape[0]
        if not ctx.targeted and self.untargeted_target == "loss":
            logits, _, g = ctx.value_and_grad(xa, index)
            g = g.reshape(m, -1)
            return logits, g, -g
        # one forward/backward of the doubled batch: rows < m give d z_t / dx, rows >= m give
        # d sum_j z_j / dx; beta = (sum over all classes) - alpha
        def loss_fn(logits: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
            first = pos < m
            if ctx.target is not None:
                t = ctx.target[index[pos % m]]
            else:
                y = ctx.labels[index[pos % m]]
                t = logits.detach().scatter(1, y[:, None], float("-inf")).argmax(1)
            zt = logits.gather(1, t[:, None])[:, 0]
            return torch.where(first, zt, logits.sum(1))

        both = torch.cat([xa, xa])
        pos = torch.arange(2 * m, device=xa.device)
        logits, _, g = ctx.value_and_grad(both, pos, loss_fn)
        g = g.reshape(2 * m, -1)
        alpha = g[:m]
        return logits[:m], alpha, g[m:] - alpha

    def run(self, ctx: AttackContext) -> RunOutput:
        x = ctx.x
        n = ctx.n
        d = int(x[0].numel())
        lo, hi = ctx.bounds
        increase = self.theta > 0
        step = self.theta * (hi - lo)
        max_iter = self.max_iterations(d)
        adv = x.clone().reshape(n, d)
        logits_out = torch.zeros(n, ctx.num_classes, device=x.device, dtype=x.dtype)
        iterations = torch.zeros(n, dtype=torch.long)
        domain = adv < hi if increase else adv > lo
        if ctx.mask is not None:
            domain &= ctx.mask.reshape(n, d) != 0
        index = ctx.all_index()
        it = 0
        while index.numel():
            xa = adv[index].reshape((-1,) + tuple(x.shape[1:]))
            if it >= max_iter:
                logits_out[index] = ctx.logits(xa).to(logits_out.dtype)
                break
            logits, alpha, beta = self._alpha_beta(ctx, xa, index)
            logits_out[index] = logits.to(logits_out.dtype)
            dom = domain[index]
            done = ctx.is_adversarial(logits, index) | (dom.sum(1) < 2)
            p, q, found = best_pairs(alpha, beta, dom, increase, self.max_pair_elements)
            if self.fallback and not bool(found.all()):
                sign = 1.0 if increase else -1.0
                score = torch.where(dom, sign * (alpha - beta),
                                    torch.tensor(float("-inf"), dtype=alpha.dtype,
                                                 device=alpha.device))
                top = score.topk(2, dim=1).indices
                p = torch.where(found, p, top[:, 0])
                q = torch.where(found, q, top[:, 1])
                found = torch.ones_like(found)
            done |= ~found
            keep = ~done
            if not keep.any():
                break
            index, p, q = index[keep], p[keep], q[keep]
            for f in (p, q):
                new = (adv[index, f] + step).clamp(lo, hi)
                adv[index, f] = new
                domain[index, f] = (new < hi) if increase else (new > lo)
            iterations[index.cpu()] += 1
            it += 1
        return RunOutput(adv.reshape(x.shape), logits_out, extra={"iterations": iterations})


# ======================================================================= One-Pixel
def _distinct_offsets(m: int, pop: int, gen: torch.Generator) -> torch.Tensor:
    """Three distinct random population indices per (image, member), all different from the
    member itself: DE/rand/1's r1, r2, r3. Returns ``(m, pop, 3)`` long (CPU)."""
    u = torch.rand(m, pop, 3, generator=gen, dtype=torch.float64)
    a = (u[..., 0] * (pop - 1)).long()
    b = (u[..., 1] * (pop - 2)).long()
    c = (u[..., 2] * (pop - 3)).long()
    b = b + (b >= a).long()
    lo_, hi_ = torch.minimum(a, b), torch.maximum(a, b)
    c = c + (c >= lo_).long()
    c = c + (c >= hi_).long()
    offsets = torch.stack([a, b, c], -1) + 1  # distinct values in [1, pop - 1]
    me = torch.arange(pop)[None, :, None]
    return (me + offsets) % pop


class OnePixel(Attack):
    """One-Pixel attack (Su, Vargas & Sakurai, "One Pixel Attack for Fooling Deep Neural
    Networks", IEEE Transactions on Evolutionary Computation 23(5), 2019).

    Differential evolution (DE/rand/1, ``F = 0.5``) over candidate solutions that each encode
    ``pixels`` pixels as (position, value per channel) — 2 coordinates in 2D, 3 in 3D. As in the
    paper, the initial positions are uniform over the image and the initial values Gaussian around
    the middle of the bounds (``N(128, 127)`` on 0..255, scaled to the bounds), every child competes
    with its parent only (one-to-one selection), and there is no crossover (``crossover=None``;
    ``crossover=CR`` adds scipy's binomial crossover with probability ``CR``). The fitness is the
    probability of the true class (minimized; untargeted) or of the target class (maximized;
    targeted). A sample stops as soon as one member of its population is adversarial (that member
    is returned); otherwise after ``generations`` the fittest member is returned.

    All candidates of all active images are evaluated in one batched forward per generation,
    chunked to at most ``max_batch_elements`` input elements at a time. Positions are rounded to the
    nearest pixel; when several encoded pixels coincide, fewer pixels change. At most ``pixels``
    pixels ever change. With a ``mask``, initial positions are drawn among the allowed pixels;
    channels the mask forbids keep their value (a candidate that lands on a forbidden pixel changes
    nothing there).

    Args:
        pixels: the number ``k`` of pixels changed (the paper's 1, 3 and 5).
        population: candidates per image (the paper: 400).
        generations: the maximum number of generations (the paper: 100).
        f: DE's scale factor (the paper: 0.5).
        crossover: ``None`` (the paper) or the binomial crossover probability in (0, 1].
        strategy: ``"rand1"`` (DE/rand/1, the paper) or ``"best1"`` (DE/best/1: the base vector
            is the image's fittest member; scipy's default, used by ART and torchattacks, and
            greedier: more successes within few generations).
        max_batch_elements: memory bound of one forward chunk (input elements).
        loss, seed, generator: see :class:`~medrobust.attacks.base.Attack`; all randomness comes
            from the attack's generator.

    ``extra["generations"]`` holds the generations each sample ran and ``extra["fitness"]`` its
    final best fitness.
    """

    name = "onepixel"

    def __init__(
        self,
        pixels: int = 1,
        *,
        population: int = 400,
        generations: int = 100,
        f: float = 0.5,
        crossover: float | None = None,
        strategy: str = "rand1",
        max_batch_elements: int = 1 << 24,
        loss: str = "ce",
        seed: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(loss=loss, seed=seed, generator=generator)
        for name, v, low in (("pixels", pixels, 1), ("population", population, 4),
                             ("generations", generations, 0)):
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{name} must be an integer >= {low}; got {v!r}")
        if not (isinstance(f, (int, float)) and 0 < f <= 2):
            raise ValueError(f"f must be in (0, 2]; got {f!r}")
        if crossover is not None and not (0 < crossover <= 1):
            raise ValueError(f"crossover must be None or in (0, 1]; got {crossover!r}")
        if strategy not in ("rand1", "best1"):
            raise ValueError(f"strategy must be 'rand1' or 'best1'; got {strategy!r}")
        if int(max_batch_elements) < 1:
            raise ValueError(f"max_batch_elements must be >= 1; got {max_batch_elements!r}")
        self.strategy = strategy
        self.pixels = pixels
        self.population = population
        self.generations = generations
        self.f = float(f)
        self.crossover = None if crossover is None else float(crossover)
        self.max_batch_elements = int(max_batch_elements)

    # candidates: (m, P, k, S + C): S spatial coordinates (continuous), then C channel values
    def _apply(self, ctx: AttackContext, img: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
        """Images ``(B, C, *spatial)`` with the candidates' pixels written in; ``img`` holds the
        batch row of each candidate ``(B,)``, ``cand`` is ``(B, k, S + C)``."""
        x = ctx.x
        c = x.shape[1]
        spatial = tuple(x.shape[2:])
        s = len(spatial)
        pos = cand[..., :s].round().long()
        flat_pos = torch.zeros(pos.shape[:2], dtype=torch.long, device=x.device)
        for i, size in enumerate(spatial):
            flat_pos = flat_pos * size + pos[..., i].clamp(0, size - 1)
        out = x[img].reshape(img.shape[0], c, -1).clone()
        idx = flat_pos[:, None, :].expand(-1, c, -1)
        val = cand[..., s:].transpose(1, 2).to(out.dtype)  # (B, C, k)
        if ctx.mask is not None:
            allowed = ctx.mask[img].reshape(img.shape[0], c, -1).gather(2, idx) != 0
            val = torch.where(allowed, val, out.gather(2, idx))
        out.scatter_(2, idx, val)
        return out.reshape((img.shape[0],) + tuple(x.shape[1:]))

    def _evaluate(self, ctx: AttackContext, index: torch.Tensor, cand: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fitness (lower is better) and success of candidates ``(m, P, k, S + C)`` of the active
        rows ``index``, in batched chunks."""
        m, pop = cand.shape[:2]
        per_image = int(ctx.x[0].numel())
        chunk = max(1, self.max_batch_elements // per_image)
        img = index[:, None].expand(m, pop).reshape(-1)
        flat = cand.reshape(m * pop, *cand.shape[2:])
        fit_parts, succ_parts = [], []
        for s0 in range(0, m * pop, chunk):
            s1 = min(m * pop, s0 + chunk)
            logits = ctx.logits(self._apply(ctx, img[s0:s1], flat[s0:s1]))
            probs = torch.softmax(logits.double(), dim=1)
            if ctx.target is not None:
                fit = -probs.gather(1, ctx.target[img[s0:s1], None])[:, 0]
            else:
                fit = probs.gather(1, ctx.labels[img[s0:s1], None])[:, 0]
            fit_parts.append(fit)
            succ_parts.append(ctx.is_adversarial(logits, img[s0:s1]))
        return torch.cat(fit_parts).reshape(m, pop), torch.cat(succ_parts).reshape(m, pop)

    def _init_population(self, ctx: AttackContext, index: torch.Tensor) -> torch.Tensor:
        x = ctx.x
        m, c = index.numel(), x.shape[1]
        spatial = tuple(x.shape[2:])
        s = len(spatial)
        k, pop = self.pixels, self.population
        lo, hi = ctx.bounds
        npix = math.prod(spatial)
        g = ctx.generator
        if ctx.mask is None:
            flat = (torch.rand(m, pop, k, generator=g, dtype=torch.float64) * npix).long()
        else:
            allowed = (ctx.mask[index].reshape(m, c, -1) != 0).any(1).cpu().double()
            allowed = torch.where(allowed.sum(1, keepdim=True) > 0, allowed,
                                  torch.ones_like(allowed))
            flat = torch.multinomial(allowed, pop * k, replacement=True,
                                     generator=g).reshape(m, pop, k)
        flat = flat.clamp_max(npix - 1)
        coords = []
        for size in reversed(spatial):
            coords.append((flat % size).double())
            flat = flat // size
        pos = torch.stack(coords[::-1], -1)  # (m, pop, k, S)
        # the paper: values ~ N(128, 127) on 0..255
        mid, sd = lo + (hi - lo) * 128.0 / 255.0, (hi - lo) * 127.0 / 255.0
        val = (mid + sd * torch.randn(m, pop, k, c, generator=g, dtype=torch.float64)
               ).clamp(lo, hi)
        assert pos.shape[-1] == s
        return torch.cat([pos, val], -1).to(x.device)

    def run(self, ctx: AttackContext) -> RunOutput:
        x = ctx.x
        n = ctx.n
        spatial = tuple(x.shape[2:])
        s = len(spatial)
        lo, hi = ctx.bounds
        pop = self.population
        adv = x.clone()
        logits_out = ctx.logits(x).to(x.dtype)
        done = ctx.is_adversarial(logits_out, ctx.all_index())
        gens = torch.zeros(n, dtype=torch.long)
        best_fit = torch.full((n,), float("nan"), dtype=torch.float64)
        index = (~done).nonzero().flatten()
        if index.numel() == 0 or not spatial:
            return RunOutput(adv, logits_out, extra={"generations": gens, "fitness": best_fit})
        upper = torch.tensor([sz - 1 for sz in spatial] + [hi] * x.shape[1],
                             dtype=torch.float64, device=x.device)
        lower = torch.tensor([0.0] * s + [lo] * x.shape[1], dtype=torch.float64,
                             device=x.device)
        popu = self._init_population(ctx, index)
        fit, succ = self._evaluate(ctx, index, popu)
        g = 0
        for _ in progress.track(range(self.generations + 1), f"One-Pixel ({ctx.n} samples)"):
            hit = succ.any(1)
            if g >= self.generations or hit.any():
                # finished samples: adversarial ones take their first adversarial member, the
                # rest (at the last generation) their fittest one
                finish = hit if g < self.generations else torch.ones_like(hit)
                choice = torch.where(hit, succ.double().argmax(1), fit.argmin(1))
                rows = finish.nonzero().flatten()
                if rows.numel():
                    sel = index[rows]
                    cand = popu[rows, choice[rows]]
                    xa = self._apply(ctx, sel, cand)
                    adv[sel] = xa
                    logits_out[sel] = ctx.logits(xa).to(logits_out.dtype)
                    gens[sel.cpu()] = g
                    best_fit[sel.cpu()] = fit[rows, choice[rows]].cpu()
                keep = ~finish
                if not keep.any():
                    break
                index, popu, fit, succ = index[keep], popu[keep], fit[keep], succ[keep]
            m = index.numel()
            r = _distinct_offsets(m, pop, ctx.generator).to(x.device)
            rows_ = torch.arange(m, device=x.device)[:, None]
            b, c = popu[rows_, r[..., 1]], popu[rows_, r[..., 2]]
            if self.strategy == "best1":
                a = popu[torch.arange(m, device=x.device), fit.argmin(1)][:, None]
            else:
                a = popu[rows_, r[..., 0]]
            child = a + self.f * (b - c)
            if self.crossover is not None:
                shape = popu.shape
                cross = torch.rand(shape, generator=ctx.generator, dtype=torch.float64
                                   ).to(x.device) < self.crossover
                # scipy's binomial crossover: at least one parameter comes from the mutant
                forced = (torch.rand(shape[:2], generator=ctx.generator, dtype=torch.float64)
                          * (shape[2] * shape[3])).long().to(x.device)
                cross = cross.reshape(m, pop, -1)
                cross.scatter_(2, forced[..., None], True)
                child = torch.where(cross.reshape(shape), child, popu)
            child = torch.minimum(torch.maximum(child, lower), upper)
            cfit, csucc = self._evaluate(ctx, index, child)
            better = cfit <= fit
            popu = torch.where(better[..., None, None], child, popu)
            fit = torch.where(better, cfit, fit)
            succ = torch.where(better, csucc, succ)
            # a successful child always counts, even when its fitness is worse than its parent's
            take = csucc & ~succ
            if take.any():
                popu = torch.where(take[..., None, None], child, popu)
                fit = torch.where(take, cfit, fit)
                succ = succ | take
            g += 1
        return RunOutput(adv, logits_out, extra={"generations": gens, "fitness": best_fit})


__all__ = ["JSMA", "OnePixel", "best_pairs"]
