"""Running medrobust on several processes and machines with PyTorch's own engine (torchrun).

medrobust has no scheduler of its own: ``torchrun --nproc-per-node N -m medrobust evaluate ...``
(and ``--nnodes``/``--rdzv-endpoint`` for several machines) starts one process per rank with the
usual environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``);
:func:`init` reads it, joins the process group — ``gloo`` on CPUs, ``nccl`` on GPUs with one GPU per
local rank — and returns a :class:`DistContext`. Without that environment everything runs in one
process, unchanged.

The helpers here are what the evaluation and training use:

* :func:`batches_for_rank` — work split by batches, round-robin, so every rank's share is fixed by
  the batch index alone (a unit's result, seeded by its batch index, is the same whichever rank
  computes it: a distributed run gives the numbers of a single-process run);
* :func:`check_same` — every rank must have been started with the same arguments;
* :func:`gather_to_main`, :func:`broadcast`, :func:`barrier` — thin, typed wrappers of the
  ``torch.distributed`` object collectives.

Collective operations time out after ``MEDROBUST_DIST_TIMEOUT`` seconds (default 120), so a rank
that was killed fails the run in minutes at most, not after torch's default 30 minutes.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
DEFAULT_TIMEOUT_S = 120.0

__all__ = [
    "DistContext",
    "DistributedError",
    "ENV_VARS",
    "all_ranks_ok",
    "all_reduce_sums",
    "barrier",
    "batches_for_rank",
    "broadcast",
    "check_enough_work",
    "check_same",
    "current",
    "gather_to_main",
    "init",
    "launched",
    "shard_permutation",
    "shutdown",
    "wrap_ddp",
]


class DistributedError(RuntimeError):
    """A distributed run cannot go on (incomplete environment, disagreeing ranks, too little
    work for the ranks)."""


@dataclass(frozen=True)
class DistContext:
    """This process's place in a distributed run."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_CURRENT: DistContext | None = None


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher setting the env)."""
    present = [v for v in ENV_VARS if os.environ.get(v)]
    if not present:
        return False
    missing = [v for v in ENV_VARS if not os.environ.get(v)]
    if missing:
        raise DistributedError(
            f"incomplete torchrun environment: {', '.join(present)} set but {', '.join(missing)} "
            "missing; start the run with `torchrun --nproc-per-node N -m medrobust ...` or unset "
            f"{', '.join(present)} for a single process"
        )
    return int(os.environ["WORLD_SIZE"]) > 1


def _timeout_s() -> float:
    raw = os.environ.get("MEDROBUST_DIST_TIMEOUT", "")
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        raise DistributedError(
            f"MEDROBUST_DIST_TIMEOUT must be a number of seconds; got {raw!r}"
        ) from None
    if value <= 0:
        raise DistributedError(f"MEDROBUST_DIST_TIMEOUT must be > 0; got {raw!r}")
    return value


def init(device: str | torch.device | None = None) -> DistContext | None:
    """Join the process group when launched by torchrun; ``None`` in a single process.

    ``device``: ``None``/``"auto"`` takes the GPU of this local rank when CUDA is available (and the
    ``nccl`` backend), else the CPU (``gloo``); ``"cpu"`` forces CPUs and ``gloo``.
    """
    global _CURRENT
    if _CURRENT is not None:
        return _CURRENT
    if not launched():
        return None
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    local = int(os.environ["LOCAL_RANK"])
    want = "auto" if device is None else str(device)
    use_cuda = torch.cuda.is_available() and not want.startswith("cpu")
    if want.startswith("cuda") and not torch.cuda.is_available():
        raise DistributedError(f"device {want!r} requested but CUDA is not available")
    if use_cuda:
        dev = torch.device("cuda", local % max(1, torch.cuda.device_count()))
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        dev = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        timeout = _dt.timedelta(seconds=_timeout_s())
        if use_cuda:
            dist.init_process_group(backend=backend, timeout=timeout, device_id=dev)
        else:
            dist.init_process_group(backend=backend, timeout=timeout)
    _CURRENT = DistContext(rank=rank, world_size=world, local_rank=local, backend=backend,
                           device=dev)
    return _CURRENT


def current() -> DistContext | None:
    """The context :func:`init` created in this process, if any."""
    return _CURRENT


def shutdown() -> None:
    """Leave the process group (idempotent)."""
    global _CURRENT
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _CURRENT = None


def batches_for_rank(num_batches: int, rank: int, world_size: int) -> list[int]:
    """The batch indices rank ``rank`` of ``world_size`` works on: round-robin."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size}")
    return list(range(rank, num_batches, world_size))


def check_enough_work(num_items: int, world_size: int, what: str = "samples") -> None:
    """Refuse a run with fewer work items than ranks (some rank would have nothing to do)."""
    if num_items < world_size:
        raise DistributedError(
            f"{num_items} {what} for {world_size} ranks: every rank needs at least one; run with "
            f"--nproc-per-node {max(1, num_items)} or fewer, or on more data"
        )


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def check_same(ctx: DistContext, args: dict[str, Any], what: str = "arguments") -> None:
    """Every rank must hold the same ``args``; otherwise every rank raises, naming the keys and
    the ranks that disagree."""
    gathered: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(gathered, args)
    ref = gathered[0]
    bad = {}
    for r, other in enumerate(gathered):
        if _digest(other) != _digest(ref):
            keys = sorted(k for k in set(ref) | set(other) if ref.get(k) != other.get(k))
            bad[r] = keys
    if bad:
        detail = "; ".join(f"rank {r}: {', '.join(k)}" for r, k in sorted(bad.items()))
        raise DistributedError(
            f"the ranks were started with different {what} (differing from rank 0 — {detail}); "
            "start every rank with the same command line"
        )


def gather_to_main(ctx: DistContext, obj: Any) -> list[Any] | None:
    """Rank 0 gets ``[obj of rank 0, obj of rank 1, ...]``; the other ranks get ``None``."""
    out: list[Any] | None = [None] * ctx.world_size if ctx.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast(ctx: DistContext, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    box = [obj if ctx.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(ctx: DistContext | None) -> None:
    """Wait for every rank (a no-op in a single process)."""
    if ctx is not None:
        dist.barrier()


def all_ranks_ok(ctx: DistContext | None, ok: bool, message: str = "") -> Sequence[str]:
    """Collect every rank's failure message (empty when all ranks succeeded), so that one rank's
    error stops all of them cleanly instead of leaving the others waiting until the timeout."""
    if ctx is None:
        return [] if ok else [message]
    gathered: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(gathered, (bool(ok), str(message)))
    return [f"rank {r}: {m}" for r, (good, m) in enumerate(gathered) if not good]


# --------------------------------------------------------------------------- training
def wrap_ddp(module: torch.nn.Module, ctx: DistContext) -> torch.nn.Module:
    """``module`` for distributed data-parallel training: batch norm synchronised across ranks
    with NCCL (``SyncBatchNorm`` has no CPU/gloo implementation, so on gloo each rank keeps its
    own statistics), wrapped in ``DistributedDataParallel``. The parameters are ``module``'s own:
    what the ranks learn is in ``module`` after training."""
    from torch.nn.parallel import DistributedDataParallel

    if ctx.backend == "nccl":
        module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids)


def shard_permutation(perm: torch.Tensor, ctx: DistContext | None) -> torch.Tensor:
    """This rank's share of one epoch's sample order (every rank draws the same ``perm``):
    ``perm[rank::world]`` after dropping the remainder, so every rank runs the same number of
    batches (as ``DistributedSampler(drop_last=True)``)."""
    if ctx is None:
        return perm
    usable = (perm.numel() // ctx.world_size) * ctx.world_size
    check_enough_work(perm.numel(), ctx.world_size, "training samples")
    return perm[:usable][ctx.rank :: ctx.world_size]


def all_reduce_sums(ctx: DistContext | None, *values: float) -> list[float]:
    """The sums of ``values`` over all ranks (the values themselves in a single process)."""
    if ctx is None:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64,
                     device=ctx.device if ctx.backend == "nccl" else "cpu")
    dist.all_reduce(t)
    return [float(v) for v in t.cpu()]
