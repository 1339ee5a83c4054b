"""Naive versus adaptive evaluation of a defended model (``medrobust evaluate --adaptive``).

Athalye, Carlini & Wagner ("Obfuscated Gradients Give a False Sense of Security", ICML 2018) showed
that input-transform defenses look robust to an attack that differentiates through them naively
and fall to an adaptive one. This runs the evaluation pipeline twice on the same data, budgets and
seed: once with the attacks as asked (naive: the gradient autograd gives through the defense),
once with every attack that supports it made adaptive (``bpda=True`` when a defense is not
differentiable, ``eot=N`` when one is randomized), and puts the worst-case robust accuracies side
by side. The defense is flagged as masking gradients at a budget when the adaptive attack lowers
robust accuracy by more than ``max(5 points, the 95% interval)`` (the larger half-width of the two
Wilson intervals); the adaptive figure is the one to quote.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from medrobust.evaluation.errors import EvaluationError

MIN_DROP = 0.05

__all__ = ["MIN_DROP", "adaptive_attack_kwargs", "compare", "evaluate_adaptive", "table"]


def adaptive_attack_kwargs(attacks: Sequence[str], defense: Any, eot: int
                           ) -> dict[str, dict[str, Any]]:
    """``attack_kwargs`` making each named attack adaptive to ``defense`` (a chain)."""
    from medrobust.attacks import ATTACKS
    from medrobust.evaluation.util import accepts

    extra: dict[str, Any] = {}
    if not defense.differentiable:
        extra["bpda"] = True
    if defense.randomized:
        extra["eot"] = int(eot)
    if not extra:  # differentiable and deterministic: the naive attack is already adaptive
        extra["bpda"] = True
    out = {}
    for name in attacks:
        key = name.strip().lower().replace("-", "").replace("_", "")
        cls = ATTACKS.get(key)
        if cls is not None and accepts(cls, "bpda") and accepts(cls, "eot"):
            out[key] = dict(extra)
    if not out:
        capable = sorted(k for k, c in ATTACKS.items() if accepts(c, "bpda"))
        raise EvaluationError(
            f"none of the attacks {', '.join(attacks)} can be made adaptive (bpda/eot); use one "
            f"of {', '.join(capable)}"
        )
    return out


def compare(naive: Mapping[str, Any], adaptive: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per budget: both worst-case robust accuracies, the drop, the threshold and the flag."""
    rows = []
    for wn, wa in zip(naive["worst_case"], adaptive["worst_case"], strict=True):
        rn, ra = wn["robust_accuracy"], wa["robust_accuracy"]
        vn, va = rn["value"], ra["value"]
        half = max((r["ci_high"] - r["ci_low"]) / 2 for r in (rn, ra)
                   if r.get("ci_high") is not None and r.get("ci_low") is not None) if (
            rn.get("ci_high") is not None or ra.get("ci_high") is not None) else 0.0
        threshold = max(MIN_DROP, half)
        drop = None if vn is None or va is None else vn - va
        rows.append({
            "eps": wn["eps"], "eps_label": wn["eps_label"],
            "naive": rn, "adaptive": ra, "drop": drop, "threshold": threshold,
            "masking": bool(drop is not None and drop > threshold),
            "quote_value": va,
        })
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """The side-by-side table printed by the CLI."""
    lines = ["eps          naive   adaptive   drop    masking",
             "-----------  ------  ---------  ------  -------"]
    for r in rows:
        def pct(v: float | None) -> str:
            return "   n/a" if v is None else f"{100 * v:5.1f}%"

        lines.append(f"{r['eps_label']:<11}  {pct(r['naive']['value'])}  "
                     f"{pct(r['adaptive']['value']):>9}  "
                     f"{'  n/a' if r['drop'] is None else format(100 * r['drop'], '5.1f')}   "
                     f"{'YES' if r['masking'] else 'no'}")
    if any(r["masking"] for r in rows):
        lines.append("gradient masking: the adaptive attack lowers robust accuracy by more than "
                     "max(5 points, the 95% interval); quote the adaptive figures")
    else:
        lines.append("robust accuracy quoted: the adaptive figures")
    return "\n".join(lines)


def evaluate_adaptive(loaded: Any, data: Any, *, attacks: Sequence[str], out: str | Path,
                      eot: int = 8, attack_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
                      **options: Any) -> dict[str, Any]:
    """Evaluate ``loaded`` (a defended model folder) naively into ``out/naive`` and adaptively
    into ``out/adaptive``; write and return ``out/adaptive.json`` (the comparison)."""
    from medrobust.evaluation import evaluate

    clf = getattr(loaded, "classifier", loaded)
    defense = getattr(clf, "defense", None)
    if defense is None:
        raise EvaluationError("the model has no defense: --adaptive compares naive and adaptive "
                              "attacks on a defended model (a 'defense' entry in model.json)")
    if isinstance(eot, bool) or int(eot) < 1:
        raise EvaluationError(f"eot must be a positive integer; got {eot!r}")
    names = list(attacks)
    extra = adaptive_attack_kwargs(names, defense, int(eot))
    base = {k.lower(): dict(v) for k, v in (attack_kwargs or {}).items()}
    adaptive_kw = {**base}
    for k, v in extra.items():
        adaptive_kw[k] = {**base.get(k, {}), **v}
    out = Path(out)
    res_n = evaluate(loaded, data, attacks=names, out=out / "naive", attack_kwargs=base or None,
                     **options)
    res_a = evaluate(loaded, data, attacks=names, out=out / "adaptive", attack_kwargs=adaptive_kw,
                     **options)
    rows = compare(res_n.results, res_a.results)
    summary = {
        "defense": defense.config(),
        "adaptive_kwargs": extra,
        "attacks": names,
        "rows": rows,
        "masking": any(r["masking"] for r in rows),
        "quote": "adaptive",
    }
    (out / "adaptive.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary
