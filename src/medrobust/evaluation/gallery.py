"""The gallery of the report: a few samples, clean and adversarial, with their top-3 classes.

The engine keeps no images. The gallery picks its samples from the stored per-sample vectors —
the strongest attack at the smallest budget where the worst case breaks half the samples (else the
largest budget), the first samples it fooled (then, if too few, samples it did not) — and
recomputes the adversarial examples of their batch with the same derived seed, so they are the
exact examples counted in the numbers (each item records whether the prediction reproduced).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from medrobust.data.base import ImageData
from medrobust.evaluation.aggregate import attack_vectors
from medrobust.evaluation.budgets import Budget
from medrobust.evaluation.families import family_of
from medrobust.evaluation.plan import CLEAN_UNIT, Unit
from medrobust.evaluation.runner import RunSettings, attack_index, compute_unit
from medrobust.evaluation.specs import AttackSpec
from medrobust.models import Classifier

__all__ = ["build_gallery", "choose_gallery"]

_MAX_BATCHES = 3


def choose_gallery(results: dict[str, Any], budgets: list[Budget], specs: list[AttackSpec]
                   ) -> tuple[AttackSpec, Budget] | None:
    """The attack and budget the gallery shows (``None`` without a budget > 0)."""
    positive = [(i, b) for i, b in enumerate(budgets) if b.value > 0]
    if not positive or not specs:
        return None
    chosen_i, chosen = positive[-1]
    for i, b in positive:
        sr = results["worst_case"][i]["success_on_correct"]["value"]
        if sr is not None and sr >= 0.5:
            chosen_i, chosen = i, b
            break
    best = None
    best_acc = float("inf")
    # fixed-budget attacks show an example at exactly this budget; a minimum-norm attack's
    # example is shown only when there is no fixed-budget attack
    fixed = [s for s in specs if not s.minimization] or specs
    for s in fixed:  # the strongest; ties go to the later attack (usually the iterative one)
        acc = results["attacks"][s.name]["per_eps"][chosen_i]["robust_accuracy"]["value"]
        acc = float("inf") if acc is None else acc
        if acc <= best_acc:
            best, best_acc = s, acc
    assert best is not None
    return best, chosen


def _top3(probs: torch.Tensor, names: list[str]) -> list[dict[str, Any]]:
    p, c = probs.topk(min(3, probs.numel()))
    return [{"class": int(ci), "name": names[int(ci)] if int(ci) < len(names) else str(int(ci)),
             "prob": float(pi)} for pi, ci in zip(p, c, strict=True)]


def build_gallery(
    clf: Classifier, data: ImageData, labels: torch.Tensor, specs: list[AttackSpec],
    budgets: list[Budget], results: dict[str, Any], collected: Any, settings: RunSettings,
    batch_size: int, count: int, window: tuple[float, float],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Gallery items with images (for the figures) and without (for ``results.json``)."""
    if count <= 0:
        return [], []
    choice = choose_gallery(results, budgets, specs)
    if choice is None:
        return [], []
    spec, budget = choice
    y = labels.numpy()
    clean = collected[f"{CLEAN_UNIT}|"]
    clean_pred = clean["pred"].astype(np.int64)
    v = attack_vectors(collected, spec, budget, clean_pred)
    cc = (clean_pred == y) & v["attacked"]
    fooled = cc & (v["pred"] != y)
    order = [int(i) for i in np.flatnonzero(fooled)]
    order += [int(i) for i in np.flatnonzero(cc & ~fooled)]
    picked: list[int] = []
    batches: list[int] = []
    for i in order:
        b = int(i) // batch_size
        if b not in batches:
            if len(batches) >= _MAX_BATCHES:
                continue
            batches.append(b)
        picked.append(int(i))
        if len(picked) >= count:
            break
    names = list(data.class_names) or [str(i) for i in range(clean["probs"].shape[1])]
    eps_key = family_of(spec).unit_budget(spec, budget)
    stored = collected[f"{spec.key}|{eps_key}"]
    raw_pred = dict(zip(stored["idx"].tolist(), stored["pred"].tolist(), strict=True))
    items: list[dict[str, Any]] = []
    n = len(data)
    for b in sorted(set(batches)):
        sl = slice(b * batch_size, min(n, (b + 1) * batch_size))
        x = data.images[sl].to(clf.dtype)
        yb = labels[sl]
        idx = attack_index(yb, settings.direction, settings.positive_class)
        clean_b = {k: v[sl] for k, v in clean.items()}
        unit = Unit(spec, eps_key, None if eps_key != budget.key else budget, b)
        res = compute_unit(clf, unit, x, yb, clean_b, settings, float(clf.bounds[1] -
                                                                      clf.bounds[0]),
                           int(clean["probs"].shape[1]))
        assert res.adversarial is not None
        local = {int(j) + sl.start: r for r, j in enumerate(idx.tolist())}
        want = [i for i in picked if sl.start <= i < sl.stop and i in local]
        if not want:
            continue
        rows = torch.tensor([local[i] for i in want])
        xc = x[idx][rows]
        xa = res.adversarial[rows]
        with clf.attack_mode():
            pc = torch.softmax(clf.logits(xc).float(), 1)
            pa = torch.softmax(clf.logits(xa.to(clf.dtype)).float(), 1)
        for j, i in enumerate(want):
            delta = (xa[j] - xc[j]).double()
            items.append({
                "index": i,
                "label": int(y[i]),
                "label_name": names[int(y[i])] if int(y[i]) < len(names) else str(int(y[i])),
                "attack": spec.name,
                "eps": budget.value,
                "eps_label": budget.label,
                # counted as fooled at this budget (a minimum-norm example may need more)
                "fooled": bool(v["pred"][i] != int(y[i])),
                "reproduced": bool(int(pa[j].argmax()) == int(raw_pred[i])),
                "linf": float(delta.abs().max()),
                "l2": float(delta.norm()),
                "clean_top3": _top3(pc[j], names),
                "adversarial_top3": _top3(pa[j], names),
                "clean_image": xc[j].detach().float().cpu(),
                "adversarial_image": xa[j].detach().float().cpu(),
                "window": list(window),
            })
    items.sort(key=lambda d: picked.index(d["index"]))
    as_json = [{k: val for k, val in d.items() if not k.endswith("_image")} for d in items]
    return items, as_json
