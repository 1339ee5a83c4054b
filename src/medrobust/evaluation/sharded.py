"""Evaluation over several processes (``torchrun ... -m medrobust evaluate``): the shard phase.

Every rank computes the units of its share of the batches (round-robin,
:func:`medrobust.distributed.batches_for_rank`) into its own resumable store in the output folder
(``results.sqlite`` for rank 0, ``results.rank<r>.sqlite`` for the others — the folder must be on a
filesystem all nodes share). Rank 0 then copies the other ranks' rows into its store, and the
ordinary single-process pipeline runs on rank 0: it finds every unit already computed, aggregates,
checks and writes ``results.json`` and the report.

Each unit's attack seed depends on the run's seed, the attack, the budget and the batch index only
(:func:`~medrobust.evaluation.util.unit_seed`), never on which rank computed it, so the numbers
equal a single-process run's. A killed rank's units are in its store: rerunning the same command
continues where every rank stopped.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import torch

from medrobust import distributed
from medrobust.data.base import ImageData
from medrobust.evaluation.errors import EvaluationError
from medrobust.evaluation.output import OutputLock, clear_previous, existing_run_hash, prepare_out
from medrobust.evaluation.plan import Plan
from medrobust.evaluation.runner import RunSettings, run_plan
from medrobust.evaluation.store import DB_NAME, ResultsStore

__all__ = ["rank_db_name", "shard_phase"]


def rank_db_name(rank: int) -> str:
    """The store of rank ``rank`` in the output folder."""
    return DB_NAME if rank == 0 else f"results.rank{rank}.sqlite"


def _prepare(out_dir: Path, overwrite: bool, run_hash: str, world: int) -> None:
    """Rank 0: create the folder; with ``overwrite`` remove only what medrobust wrote there."""
    prepare_out(out_dir, overwrite)
    if overwrite:
        clear_previous(out_dir)
        for p in out_dir.glob("results.rank*.sqlite*"):
            p.unlink()
    prior = existing_run_hash(out_dir)
    if prior is not None and prior != run_hash and not overwrite:
        raise EvaluationError(
            f"{out_dir}: holds the results of another evaluation (results.json); choose another "
            "folder or pass overwrite to replace them"
        )


def _merge_into(main_db: Path, others: list[Path]) -> None:
    """Copy the rows of the other ranks' stores into rank 0's."""
    conn = sqlite3.connect(str(main_db), timeout=30.0)
    try:
        for i, other in enumerate(others):
            if not other.is_file():
                continue
            ResultsStore(other).close()  # the same checks as any store: format, integrity
            alias = f"r{i}"
            conn.execute(f"ATTACH DATABASE ? AS {alias}", (str(other),))
            with conn:
                conn.execute(f"INSERT OR REPLACE INTO batches SELECT * FROM {alias}.batches")
            conn.execute(f"DETACH DATABASE {alias}")
    except sqlite3.Error as err:
        raise EvaluationError(f"{main_db}: cannot merge the ranks' results ({err})") from err
    finally:
        conn.close()


def shard_phase(ctx: distributed.DistContext, *, clf: Any, data: ImageData,
                labels: torch.Tensor, plan: Plan, settings: RunSettings, out_dir: Path,
                overwrite: bool, run_hash: str, run_id: str) -> None:
    """Compute this rank's share of ``plan`` into its store; on return (every rank has finished)
    rank 0's store holds every unit. Any rank's error stops every rank with that message."""
    failure = ""
    if ctx.is_main:
        try:
            _prepare(out_dir, overwrite, run_hash, ctx.world_size)
        except EvaluationError as err:
            failure = str(err)
    errors = distributed.all_ranks_ok(ctx, not failure, failure)
    if errors:
        raise EvaluationError("; ".join(errors))
    distributed.check_same(
        ctx, {"run": run_hash, "units": settings.unit_hash, "samples": len(data),
              "batches": plan.batches, "out": str(out_dir.resolve())},
        "arguments (model, data, attacks, budgets, seed or --out)")
    distributed.check_enough_work(plan.batches, ctx.world_size, "batches")
    mine = distributed.batches_for_rank(plan.batches, ctx.rank, ctx.world_size)
    try:
        with OutputLock(out_dir, name=f".medrobust-evaluate.rank{ctx.rank}.lock"):
            store = ResultsStore(out_dir / rank_db_name(ctx.rank), run_id=run_id)
            try:
                run_plan(clf, data, labels, plan, store, settings, batches=mine)
            finally:
                store.close()
    except (EvaluationError, OSError, RuntimeError, ValueError) as err:
        failure = f"{type(err).__name__}: {err}".splitlines()[0]
    errors = distributed.all_ranks_ok(ctx, not failure, failure)
    if errors:
        raise EvaluationError("; ".join(errors))
    if ctx.is_main:
        _merge_into(out_dir / DB_NAME,
                    [out_dir / rank_db_name(r) for r in range(1, ctx.world_size)])
