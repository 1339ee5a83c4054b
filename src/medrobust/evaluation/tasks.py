"""Task types of an evaluation: what a per-budget entry reports beyond robust accuracy.

* binary — sensitivity and specificity (robust accuracy on the positive / negative class);
* multi-class — per-class robust accuracy only;
* ordinal — ordered grades (RetinaMNIST): also the mean absolute grade error under attack and the
  mean absolute grade shift the attack causes (``|adversarial grade - clean grade|``);
* multi-label — see :mod:`medrobust.evaluation.multilabel`.

A task type plugs in with :func:`register_task` (one object with ``entry`` and ``clean``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from medrobust.evaluation.metrics import Proportion, summary_stats

__all__ = ["TASKS", "TaskType", "class_block", "register_task", "task_type"]


def class_block(correct: np.ndarray, y: np.ndarray, k: int, names: list[str] | None = None
                ) -> list[dict[str, Any]]:
    return [
        {"class": c, "name": names[c] if names and c < len(names) else str(c),
         **Proportion.of(correct, y == c).to_dict()}
        for c in range(k)
    ]


@dataclass
class TaskType:
    """The extra numbers of one task type."""

    name: str

    def clean(self, clean_pred: np.ndarray, y: np.ndarray, k: int, pos: int) -> dict[str, Any]:
        return self.entry(clean_pred, clean_pred, y, clean_pred == y, k, pos, clean=True)

    def entry(self, pred: np.ndarray, clean_pred: np.ndarray, y: np.ndarray,
              robust: np.ndarray, k: int, pos: int, clean: bool = False) -> dict[str, Any]:
        return {}


class Binary(TaskType):
    def entry(self, pred: np.ndarray, clean_pred: np.ndarray, y: np.ndarray,
              robust: np.ndarray, k: int, pos: int, clean: bool = False) -> dict[str, Any]:
        return {"sensitivity": Proportion.of(robust, y == pos).to_dict(),
                "specificity": Proportion.of(robust, y != pos).to_dict()}


class Ordinal(TaskType):
    def entry(self, pred: np.ndarray, clean_pred: np.ndarray, y: np.ndarray,
              robust: np.ndarray, k: int, pos: int, clean: bool = False) -> dict[str, Any]:
        err = np.abs(pred.astype(np.int64) - y.astype(np.int64)).astype(np.float64)
        out: dict[str, Any] = {"grade_error": summary_stats(err)}
        if not clean:
            shift = np.abs(pred.astype(np.int64) - clean_pred.astype(np.int64))
            out["grade_shift"] = summary_stats(shift.astype(np.float64))
        return out


TASKS: dict[str, TaskType] = {
    "binary": Binary("binary"),
    "multi-class": TaskType("multi-class"),
    "ordinal": Ordinal("ordinal"),
}


def register_task(task: TaskType) -> None:
    TASKS[task.name] = task


def task_type(task: str, k: int) -> TaskType:
    """The task type of ``task`` (a two-class model is binary whatever the data says)."""
    if k == 2 and task != "multi-label":
        return TASKS["binary"]
    return TASKS.get(task, TASKS["multi-class"])
