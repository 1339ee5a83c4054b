"""Sanity checks that catch gradient masking (Athalye, Carlini & Wagner, ICML 2018; Carlini et
al., "On Evaluating Adversarial Robustness", 2019, section 5).

Every check reads each attack's own raw results at each budget — ``raw_accuracy``, the accuracy on
that attack's output alone, never a cumulative minimum over budgets and never an attack seeded
with another's output — so that a weak or masked attack cannot hide behind a stronger one.

The checks, for each fixed-budget attack:

* ``eps0``: at eps = 0 the accuracy equals the clean accuracy, exactly (0 samples of tolerance:
  a zero budget leaves the input unchanged, so any difference means a randomized or stateful
  model, or an attack that leaves its ball).
* ``monotonic``: the accuracy never rises from one budget to the next larger one by more than
  ``tolerance`` samples.
* ``iterative``: an iterative attack (more than one step) is at least as strong as each
  single-step attack (FGSM) at every budget > 0, within ``tolerance`` samples.
* ``large_eps``: at a budget containing the whole input range the attack fools all the samples
  it attacked that the model got right, but ``tolerance`` at most. For a single-step attack a
  failure here is reported as a warning only (one gradient step from the clean point need not
  reach a far-away decision boundary even on an honest model); for an iterative attack it fails.
  (An ensemble runs this check with its first, gradient-based component.)
* ``gradient_free``: a gradient-free attack (Square) must not break more than ``tolerance``
  samples that the gradient attacks all missed, at any budget: within an ensemble, the samples it
  broke after the gradient components failed; among separate attacks, the samples only it fooled.
  More is the classic sign of gradient masking (Athalye et al. 2018; Croce & Hein 2020).

Ensembles (``kind == "ensemble"``) are checked like fixed-budget attacks.

Tolerance: ``max(1, ceil(1% of the attacked samples))`` samples. The results at two budgets are
paired — the same samples, the same model — so sampling noise does not enter the comparison, and
a confidence-interval tolerance (about +-7 points for BreastMNIST's 156 test images) would hide
exactly the masking the checks are there to catch. The small slack absorbs the few samples that a
random start or a saturated loss treats differently from one budget to the next.

A failed check is reported as a sign of gradient masking: the robust accuracy measured is then an
upper bound at best, and should not be quoted before the attack has been repaired (more steps,
the margin loss, restarts, BPDA / EOT for non-differentiable or randomized defenses).
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["INFO", "check", "run_checks", "tolerance_samples"]

PASS, FAIL, WARN, SKIP, INFO = "pass", "fail", "warn", "skipped", "info"


def tolerance_samples(n_attacked: int) -> int:
    """The slack of the comparisons, in samples: ``max(1, ceil(0.01 * n_attacked))``."""
    return max(1, math.ceil(0.01 * n_attacked))


def check(cid: str, name: str, attack: str | None, status: str, detail: str,
           values: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"id": cid, "check": name, "attack": attack, "status": status, "detail": detail,
            "values": values or {}}


def run_checks(results: dict[str, Any]) -> dict[str, Any]:
    """The ``sanity`` block of ``results.json`` from its ``clean`` and ``attacks`` blocks."""
    clean = results["clean"]["accuracy"]
    attacks: dict[str, Any] = results["attacks"]
    fixed = {n: a for n, a in attacks.items() if a["kind"] in ("fixed-budget", "ensemble")}
    n_attacked = max([e["n_attacked"] for a in attacks.values() for e in a["per_eps"]] or [0])
    tol = tolerance_samples(n_attacked)
    checks: list[dict[str, Any]] = []

    for name, a in fixed.items():
        per = a["per_eps"]
        # eps = 0 gives the clean accuracy
        zero = [e for e in per if e["eps"] == 0]
        if zero:
            k0 = zero[0]["raw_accuracy"]["k"]
            ok = k0 == clean["k"]
            checks.append(check(
                f"eps0:{name}", "eps0", name, PASS if ok else FAIL,
                f"{name} at eps=0: {k0}/{clean['n']} correct vs {clean['k']}/{clean['n']} clean"
                + ("" if ok else " — the model or the attack is not deterministic"),
                {"attack_correct": k0, "clean_correct": clean["k"]},
            ))
        else:
            checks.append(check(f"eps0:{name}", "eps0", name, SKIP,
                                 "eps=0 is not among the budgets"))
        # accuracy never rises with eps
        rises = []
        for prev, cur in zip(per, per[1:], strict=False):
            d = cur["raw_accuracy"]["k"] - prev["raw_accuracy"]["k"]
            if d > tol:
                rises.append(f"{prev['eps_label']} -> {cur['eps_label']}: +{d} samples")
        if len(per) < 2:
            checks.append(check(f"monotonic:{name}", "monotonic", name, SKIP,
                                 "needs two budgets or more"))
        else:
            checks.append(check(
                f"monotonic:{name}", "monotonic", name, FAIL if rises else PASS,
                (f"{name}: accuracy rises with eps ({'; '.join(rises)}; tolerance {tol})"
                 if rises else f"{name}: accuracy does not rise with eps (tolerance {tol})"),
                {"correct": [e["raw_accuracy"]["k"] for e in per],
                 "eps": [e["eps"] for e in per]},
            ))

    singles = [n for n, a in fixed.items() if a["single_step"]]
    iteratives = [n for n, a in fixed.items() if not a["single_step"]]
    if not singles or not iteratives:
        checks.append(check("iterative", "iterative", None, SKIP,
                             "needs a single-step (fgsm) and an iterative attack"))
    for it in iteratives:
        for si in singles:
            worse = []
            for e_it, e_si in zip(fixed[it]["per_eps"], fixed[si]["per_eps"], strict=True):
                if e_it["eps"] == 0:
                    continue
                d = e_it["raw_accuracy"]["k"] - e_si["raw_accuracy"]["k"]
                if d > tol:
                    worse.append(f"eps {e_it['eps_label']}: {it} leaves {d} more correct")
            checks.append(check(
                f"iterative:{it}>{si}", "iterative", it, FAIL if worse else PASS,
                (f"{it} is weaker than {si} ({'; '.join(worse)}; tolerance {tol})" if worse
                 else f"{it} is at least as strong as {si} at every eps (tolerance {tol})"),
            ))

    for name, a in attacks.items():
        big = a.get("large_eps")
        if big is None:
            if a["kind"] == "fixed-budget":
                checks.append(check(f"large_eps:{name}", "large_eps", name, SKIP,
                                     "not run (large_eps=False)"))
            continue
        sr = big.get("success_on_correct") or big["success_rate"]
        missed = sr["n"] - sr["k"]
        ok = missed <= tol
        status = PASS if ok else (WARN if a["single_step"] else FAIL)
        checks.append(check(
            f"large_eps:{name}", "large_eps", name, status,
            f"{name} at eps={big['eps_label']}: success {sr['k']}/{sr['n']}"
            + ("" if ok else f" — {missed} correct sample(s) survive an unbounded attack"
               + (" (single-step: a warning)" if a["single_step"] else "")),
            {"eps": big["eps"], "fooled": sr["k"], "n": sr["n"]},
        ))

    checks.extend(_gradient_free_checks(results, tol))

    failed = [c["id"] for c in checks if c["status"] == FAIL]
    warned = [c["id"] for c in checks if c["status"] == WARN]
    return {
        "passed": not failed,
        "failed": failed,
        "warnings": warned,
        "tolerance_samples": tol,
        "gradient_masking_suspected": bool(failed),
        "checks": checks,
    }


def _gradient_free_checks(results: dict[str, Any], tol: int) -> list[dict[str, Any]]:
    """Square (or another gradient-free attack) succeeding where the gradient attacks failed."""
    out: list[dict[str, Any]] = []
    attacks: dict[str, Any] = results["attacks"]
    for name, a in attacks.items():
        comps = a.get("components") or []
        free = [c["attack"] for c in comps if c.get("gradient_free")]
        grad = [c["attack"] for c in comps if not c.get("gradient_free")]
        if a.get("kind") != "ensemble" or not free or not grad:
            continue
        found = []
        values = {}
        for e in a["per_eps"]:
            k = sum(int((e.get("broken_by") or {}).get(f, 0)) for f in free)
            values[e["eps_label"]] = k
            if k > tol:
                found.append(f"eps {e['eps_label']}: {k}")
        out.append(check(
            f"gradient_free:{name}", "gradient_free", name, FAIL if found else PASS,
            (f"{', '.join(free)} broke samples that {', '.join(grad)} all missed "
             f"({'; '.join(found)}; tolerance {tol}) — a sign of gradient masking"
             if found else f"{', '.join(free)} broke no more than {tol} sample(s) that the "
             f"gradient attacks missed"),
            {"broken_by_gradient_free": values},
        ))
    free_sep = [n for n, a in attacks.items() if a.get("gradient_free")
                and a.get("kind") == "fixed-budget"]
    grad_sep = [n for n, a in attacks.items() if not a.get("gradient_free")
                and a.get("kind") in ("fixed-budget", "ensemble")]
    for name in free_sep:
        if not grad_sep:
            continue
        found = []
        for w in results.get("worst_case", []):
            k = int((w.get("fooled_only_by") or {}).get(name, 0))
            if k > tol:
                found.append(f"eps {w['eps_label']}: {k}")
        out.append(check(
            f"gradient_free:{name}", "gradient_free", name, FAIL if found else PASS,
            (f"{name} fooled samples no gradient attack ({', '.join(grad_sep)}) fooled "
             f"({'; '.join(found)}; tolerance {tol}) — a sign of gradient masking" if found
             else f"{name} fooled no more than {tol} sample(s) the gradient attacks missed"),
        ))
    return out
