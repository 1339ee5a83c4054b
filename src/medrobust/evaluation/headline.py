"""The figure to quote: the worst-case robust accuracy — unless a check failed.

When a sanity or pre-flight check fails (a sign of gradient masking, a randomized or constant
model), the worst case of the attacks that were asked for is an upper bound at best. The summary
card then does not show it as the result: it shows it marked unreliable, next to the strongest
alternative already computed — the worst case including the fallback attacks the engine ran
because of the failure (a margin/DLR-loss attack and the gradient-free Square; see
:data:`medrobust.evaluation.families.ensemble.FALLBACK`), or, when the attacks asked for already
contained such attacks (the ``standard`` ensemble), the same worst case with that said — and
says which one to quote (the lowest, as an upper bound, with the failed checks named).
"""

from __future__ import annotations

from typing import Any

__all__ = ["headline"]


def headline(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One entry per budget: ``value`` (the worst case of the attacks asked for), ``reliable``,
    ``alternative`` (``None`` or ``{name, value, ...}``), ``quote`` (which figure) and
    ``quote_value``, and ``advice`` (a sentence)."""
    sanity = results["sanity"]
    failed = list(sanity.get("failed") or [])
    alt = results.get("alternative")
    has_masking_resistant = _has_masking_resistant(results)
    out = []
    for i, w in enumerate(results["worst_case"]):
        value = w["robust_accuracy"]["value"]
        e: dict[str, Any] = {"eps": w["eps"], "eps_label": w["eps_label"], "value": value,
                             "reliable": not failed, "alternative": None,
                             "quote": "worst case", "quote_value": value, "advice": ""}
        if failed:
            if alt is not None:
                aw = alt["worst_case"][i]["robust_accuracy"]
                e["alternative"] = {"name": f"worst case with {', '.join(alt['attacks'])}",
                                    **aw}
                if aw["value"] is not None and (value is None or aw["value"] <= value):
                    e["quote"] = e["alternative"]["name"]
                    e["quote_value"] = aw["value"]
            e["advice"] = (
                f"checks failed ({', '.join(failed)}): the figures are upper bounds at best. "
                + (f"Quote {e['quote']} as an upper bound" if alt is not None else
                   "The worst case already includes margin/DLR-loss and gradient-free attacks; "
                   "quote it as an upper bound" if has_masking_resistant else
                   "No masking-resistant alternative could be computed (register Square, or "
                   "use attacks='standard'); do not quote these figures")
                + ", naming the failed checks."
            )
            if alt is None and not has_masking_resistant:
                e["quote"] = None
                e["quote_value"] = None
        out.append(e)
    return out


def _has_masking_resistant(results: dict[str, Any]) -> bool:
    """The attacks asked for include a gradient-free attack (alone or in an ensemble)."""
    for a in results["attacks"].values():
        if a.get("gradient_free"):
            return True
        if any(c.get("gradient_free") for c in a.get("components") or []):
            return True
    return False
