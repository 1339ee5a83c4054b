"""What :func:`medrobust.evaluate` returns."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medrobust.evaluation.output import REPORT_HTML, RESULTS_JSON

__all__ = ["REPORT_HTML", "RESULTS_JSON", "EvaluationResult"]


@dataclass
class EvaluationResult:
    """The outcome of :func:`evaluate`.

    Attributes:
        results: the content of ``results.json`` (see :mod:`medrobust.evaluation.schema`).
        out: the output folder, or ``None``.
        gallery: the gallery examples (images included) used for the report.
    """

    results: dict[str, Any]
    out: Path | None = None
    gallery: list[dict[str, Any]] = field(default_factory=list, repr=False)

    @property
    def clean_accuracy(self) -> float:
        return float(self.results["clean"]["accuracy"]["value"])

    @property
    def clean_auc(self) -> float | None:
        v = self.results["clean"]["auc"]["value"]
        return None if v is None else float(v)

    @property
    def eps(self) -> list[float]:
        return [float(e["eps"]) for e in self.results["worst_case"]]

    @property
    def robust_accuracy(self) -> dict[float, float]:
        """Worst case over all attacks, per budget: the robust accuracy to quote."""
        return {float(e["eps"]): float(e["robust_accuracy"]["value"])
                for e in self.results["worst_case"]}

    def attack_accuracy(self, attack: str) -> dict[float, float]:
        """One attack's robust accuracy per budget."""
        return {float(e["eps"]): float(e["robust_accuracy"]["value"])
                for e in self.results["attacks"][attack]["per_eps"]}

    @property
    def sanity_passed(self) -> bool:
        return bool(self.results["sanity"]["passed"])

    @property
    def checks(self) -> list[dict[str, Any]]:
        return list(self.results["sanity"]["checks"])

    @property
    def json_path(self) -> Path | None:
        return None if self.out is None else self.out / RESULTS_JSON

    @property
    def report_path(self) -> Path | None:
        return None if self.out is None else self.out / REPORT_HTML

    def summary_table(self) -> str:
        """A plain-text table: budget, worst-case robust accuracy (95% CI), each attack."""
        from medrobust.evaluation.report import summary_text

        return summary_text(self.results)

    def write_report(self, path: str | os.PathLike[str]) -> Path:
        """Write the HTML report to ``path`` (also for an evaluation run without ``out``)."""
        from medrobust.evaluation.report import write_report

        return write_report(self.results, self.gallery, Path(path))

    def __repr__(self) -> str:
        ra = ", ".join(f"{e:g}: {a:.3f}" for e, a in self.robust_accuracy.items())
        return (
            f"EvaluationResult(clean_accuracy={self.clean_accuracy:.3f}, "
            f"robust_accuracy={{{ra}}}, sanity_passed={self.sanity_passed}, out={self.out})"
        )
