"""Training loop for classifiers (and segmenters), as a Python API.

``train(module, train_data, val_data, ...)`` trains a network on :class:`~medrobust.data.ImageData`
the way the MedMNIST v2 benchmark does (Yang et al., Scientific Data 10, 41, 2023): cross-entropy
(binary tasks as two-logit softmax, multi-label with BCE-with-logits), Adam with learning rate 1e-3,
and a learning rate divided by 10 at 50% and 75% of the epochs (or a cosine schedule). After every
epoch it evaluates ACC and AUC on the validation data exactly as MedMNIST's ``getACC``/``getAUC``
do, and keeps the state with the best validation AUC.

The network runs inside a :class:`medrobust.Classifier` wrapper, so the preprocessing and
normalization used in training are the ones an attack will see, and inputs are in the data's own
units. ``example_generator(wrapper, x, y) -> x_used`` replaces each training batch (adversarial
training plugs in here: Madry et al. 2018).

Reproducibility: the data order comes from a private ``torch.Generator`` seeded with ``seed``, and
everything else that draws random numbers during training (dropout, an example generator's random
start) runs inside ``torch.random.fork_rng()`` seeded with ``seed``, so the caller's global RNG
state is left exactly as it was. On the CPU two runs with the same seed give bit-identical weights.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medrobust.data.base import ImageData
from medrobust.metrics import dice_scores, medmnist_acc, medmnist_auc, roc_auc
from medrobust.models import Classifier

ExampleGenerator = Callable[[Classifier, torch.Tensor, torch.Tensor], torch.Tensor]
"""``(wrapper, x, y) -> x_used``: the inputs to train on for the batch ``(x, y)``."""

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("multistep", "cosine", "none")


# --------------------------------------------------------------------------- helpers
def resolve_device(device: torch.device | str | None = None) -> torch.device:
    """``None``/``"auto"``: CUDA when available, else CPU; otherwise the device given."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} requested but CUDA is not available")
    return dev


@contextlib.contextmanager
def seeded(seed: int, device: torch.device | str | None = None) -> Iterator[None]:
    """Seed torch's global RNG inside the block and restore the caller's RNG state after.

    Build (initialise) a network reproducibly: ``with seeded(0): net = build_network(...)``.
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    devices = [dev.index or 0] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed))
        yield


def channel_stats(
    data: ImageData, preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
    batch_size: int = 512,
) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of ``data.images`` after ``preprocess`` (for normalization)."""
    c = data.channels
    total = torch.zeros(c, dtype=torch.float64)
    sq = torch.zeros(c, dtype=torch.float64)
    count = 0
    with torch.no_grad():
        for i in range(0, len(data), batch_size):
            x = data.images[i : i + batch_size].float()
            if preprocess is not None:
                x = preprocess(x)
            x = x.transpose(0, 1).reshape(c, -1).double()
            total += x.sum(1)
            sq += (x * x).sum(1)
            count += x.shape[1]
    mean = total / max(count, 1)
    std = (sq / max(count, 1) - mean * mean).clamp_min(0).sqrt()
    std = torch.where(std > 1e-8, std, torch.ones_like(std))
    return [float(m) for m in mean], [float(s) for s in std]


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes:
        module: the trained network with the best state loaded (on the training device).
        classifier: the wrapper used in training (bounds, normalization, preprocessing); ``None``
            for segmentation.
        history: one dict of metrics per epoch (as written to the log).
        best_epoch: the epoch (1-based) whose state was kept.
        best_metrics: that epoch's validation metrics.
        best_state: a CPU copy of the kept state dict.
        device: the device trained on.
        seed: the seed used.
        wall_time: seconds spent.
    """

    module: nn.Module
    classifier: Classifier | None
    history: list[dict[str, Any]]
    best_epoch: int
    best_metrics: dict[str, float]
    best_state: dict[str, torch.Tensor] = field(repr=False)
    device: str
    seed: int
    wall_time: float


class _SegWrapper:
    """Preprocess + normalize + module for segmentation (no logits reshaping)."""

    def __init__(self, clf: Classifier) -> None:
        self.clf = clf

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.clf.module(self.clf._normalize(x.to(self.clf.device, self.clf.dtype)))


def _evaluate(
    wrapper: Classifier, data: ImageData, task: str, batch_size: int, device: torch.device
) -> dict[str, float]:
    module = wrapper.module
    was_training = module.training
    module.eval()
    losses: list[float] = []
    scores: list[torch.Tensor] = []
    targets: list[torch.Tensor] = []
    dices: list[list[float]] = []
    try:
        with torch.no_grad():
            for i in range(0, len(data), batch_size):
                x = data.images[i : i + batch_size].to(device)
                y = data.labels[i : i + batch_size].to(device)
                if task == "segmentation":
                    logits = _SegWrapper(wrapper).forward(x)
                    # mean over voxels, summed over samples
                    losses.append(float(F.cross_entropy(logits, y)) * int(y.shape[0]))
                    dices.append(dice_scores(logits.argmax(1), y, logits.shape[1]))
                    continue
                logits = wrapper.forward(x)
                if task == "multi-label":
                    losses.append(float(F.binary_cross_entropy_with_logits(
                        logits, y.float(), reduction="sum")) / max(1, y.shape[1]))
                    scores.append(torch.sigmoid(logits).cpu())
                else:
                    losses.append(float(F.cross_entropy(logits, y, reduction="sum")))
                    scores.append(torch.softmax(logits, 1).cpu())
                targets.append(y.cpu())
    finally:
        module.train(was_training)
    n = max(1, len(data))
    if task == "segmentation":
        per_class = np.nanmean(np.array(dices, dtype=np.float64), axis=0) if dices else []
        dice = float(np.nanmean(per_class)) if len(per_class) else float("nan")
        return {"loss": sum(losses) / n, "dice": dice}
    s = torch.cat(scores).double().numpy()
    t = torch.cat(targets).numpy()
    return {
        "loss": sum(losses) / n,
        "acc": medmnist_acc(t, s, task),
        "auc": medmnist_auc(t, s, task),
    }


def _score(metrics: dict[str, float], task: str) -> float:
    keys = ("dice",) if task == "segmentation" else ("auc", "acc")
    for k in keys:
        v = metrics.get(k, float("nan"))
        if not math.isnan(v):
            return v
    return -math.inf


def _make_optimizer(
    name: str, params: Any, lr: float, weight_decay: float, momentum: float
) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                           nesterov=momentum > 0)


def train(
    module: nn.Module,
    train_data: ImageData,
    val_data: ImageData | None = None,
    *,
    epochs: int = 10,
    batch_size: int = 128,
    lr: float = 1e-3,
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    schedule: str = "multistep",
    seed: int = 0,
    device: torch.device | str | None = None,
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
    preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
    example_generator: ExampleGenerator | None = None,
    progress: bool = True,
    log_path: str | os.PathLike[str] | None = None,
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
    eval_batch_size: int = 512,
) -> TrainResult:
    """Train ``module`` on ``train_data``; keep the state with the best validation AUC.

    Args:
        module: the network (logits ``(N, K)``; per-pixel ``(N, K, *spatial)`` for segmentation).
            It is trained in place and moved to ``device``.
        train_data, val_data: :class:`ImageData` of the same task. Without ``val_data`` the last
            epoch is kept.
        epochs, batch_size, lr, weight_decay, momentum: the usual.
        optimizer: ``"adam"`` (MedMNIST), ``"adamw"`` or ``"sgd"`` (Nesterov momentum).
        schedule: ``"multistep"`` (x0.1 at 50% and 75% of the epochs, MedMNIST), ``"cosine"``
            (Loshchilov & Hutter 2017, per epoch) or ``"none"``.
        seed: seeds the data order and every random draw during training (see module docstring).
        device: ``None``/``"auto"`` picks CUDA when available, else CPU.
        mean, std, preprocess: the wrapper's normalization and preprocessing (see
            :class:`medrobust.Classifier`); save the same values with the model.
        example_generator: ``(wrapper, x, y) -> x_used``; called on every training batch, its
            output (detached) is what the network is trained on.
        progress: show a tqdm bar per epoch (only when stderr is a terminal).
        log_path: write one JSON line of metrics per epoch there (``metrics.jsonl``).
        on_epoch_end: called with each epoch's metrics dict.
        eval_batch_size: batch size for validation.

    Epoch metrics: ``epoch``, ``lr``, ``train_loss``, ``train_acc`` and, with validation data,
    ``val_loss``, ``val_acc``, ``val_auc`` (``val_dice`` for segmentation), ``best``, ``time_s``.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module; got {type(module).__name__}")
    if len(train_data) == 0:
        raise ValueError("train_data is empty")
    for name, value in (("epochs", epochs), ("batch_size", batch_size),
                        ("eval_batch_size", eval_batch_size)):
        if isinstance(value, bool) or int(value) != value or value < 1:
            raise ValueError(f"{name} must be a positive integer; got {value!r}")
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be positive; got {lr!r}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; expected one of {OPTIMIZERS}")
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; expected one of {SCHEDULES}")
    task = train_data.task
    if val_data is not None and (val_data.task != task or
                                 val_data.num_classes != train_data.num_classes):
        raise ValueError(
            f"validation data ({val_data.task}, {val_data.num_classes} classes) does not match "
            f"the training data ({task}, {train_data.num_classes} classes)"
        )
    if task == "segmentation" and example_generator is not None:
        raise ValueError("example_generator is supported for classification tasks only")

    from medrobust import distributed

    dctx = distributed.current()  # set when launched by torchrun (medrobust.distributed.init)
    dev = dctx.device if dctx is not None else resolve_device(device)
    module.to(dev)
    was_training = module.training
    k = train_data.num_classes
    wrapper = Classifier(
        module,
        bounds=train_data.bounds,
        mean=mean,
        std=std,
        num_classes=k if task in ("binary", "multi-class", "ordinal") and k >= 2 else None,
        preprocess=preprocess,
        chunk_size=eval_batch_size,
    )
    # Under torchrun the loss goes through DistributedDataParallel (gradients averaged across
    # ranks); attacks and validation use the plain module (input-only gradients never touch DDP).
    fit = wrapper
    if dctx is not None:
        fit = Classifier(distributed.wrap_ddp(module, dctx), bounds=train_data.bounds, mean=mean,
                         std=std, num_classes=wrapper.num_classes, preprocess=preprocess,
                         chunk_size=eval_batch_size)
    seg = _SegWrapper(fit) if task == "segmentation" else None
    opt = _make_optimizer(optimizer, module.parameters(), float(lr), float(weight_decay),
                          float(momentum))
    sched: torch.optim.lr_scheduler.LRScheduler | None
    if schedule == "multistep":
        sched = torch.optim.lr_scheduler.MultiStepLR(
            opt, milestones=sorted({max(1, int(0.5 * epochs)), max(1, int(0.75 * epochs))}),
            gamma=0.1,
        )
    elif schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    else:
        sched = None

    from tqdm.auto import tqdm

    show = bool(progress) and sys.stderr.isatty() and (dctx is None or dctx.is_main)
    order_gen = torch.Generator().manual_seed(int(seed))
    n = len(train_data)
    history: list[dict[str, Any]] = []
    best_score = -math.inf
    best_epoch = 0
    best_metrics: dict[str, float] = {}
    best_state: dict[str, torch.Tensor] = {}
    start = time.perf_counter()
    log = None
    if log_path is not None and (dctx is None or dctx.is_main):
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        log = open(log_path, "w", encoding="utf-8")  # noqa: SIM115
    devices = [dev.index or 0] if dev.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(int(seed) + (0 if dctx is None else 7919 * dctx.rank))
            for epoch in range(1, int(epochs) + 1):
                t0 = time.perf_counter()
                perm = distributed.shard_permutation(torch.randperm(n, generator=order_gen), dctx)
                n_here = int(perm.numel())
                starts = list(range(0, n_here, int(batch_size)))
                if n_here > 1 and n_here - starts[-1] == 1:  # a batch of one breaks batch norm
                    starts.pop()
                total_loss, correct, seen = 0.0, 0, 0
                bar = tqdm(starts, desc=f"epoch {epoch}/{epochs}", unit="batch",
                           disable=not show, leave=False, file=sys.stderr)
                for s in bar:
                    idx = perm[s : s + int(batch_size)]
                    x = train_data.images[idx].to(dev)
                    y = train_data.labels[idx].to(dev)
                    if example_generator is not None:
                        x = example_generator(wrapper, x, y)
                        if not isinstance(x, torch.Tensor) or x.shape[0] != y.shape[0]:
                            raise ValueError("example_generator must return a tensor batch "
                                             "of the same size as its input")
                        x = x.detach().to(dev)
                    module.train()
                    if seg is not None:
                        logits = seg.forward(x)
                        loss = F.cross_entropy(logits, y)
                        pred_ok = (logits.argmax(1) == y).float().mean(
                            dim=tuple(range(1, y.dim())))
                    elif task == "multi-label":
                        logits = fit.forward(x)
                        loss = F.binary_cross_entropy_with_logits(logits, y.float())
                        pred_ok = ((logits > 0) == y.bool()).float().mean(1)
                    else:
                        logits = fit.forward(x)
                        loss = F.cross_entropy(logits, y)
                        pred_ok = (logits.argmax(1) == y).float()
                    if not torch.isfinite(loss):
                        raise FloatingPointError(
                            f"the training loss became {float(loss)} in epoch {epoch}; "
                            "lower the learning rate"
                        )
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    bs = int(y.shape[0])
                    total_loss += float(loss.detach()) * bs
                    correct += float(pred_ok.sum())  # type: ignore[assignment]
                    seen += bs
                    if show:
                        bar.set_postfix(loss=f"{total_loss / seen:.4f}")
                bar.close()
                total_loss, correct, seen = distributed.all_reduce_sums(  # type: ignore[assignment]
                    dctx, total_loss, correct, seen)
                record: dict[str, Any] = {
                    "epoch": epoch,
                    "lr": float(opt.param_groups[0]["lr"]),
                    "train_loss": total_loss / max(seen, 1),
                    "train_acc": correct / max(seen, 1),
                }
                if sched is not None:
                    sched.step()
                if val_data is not None and len(val_data) > 0:
                    vm = _evaluate(wrapper, val_data, task, int(eval_batch_size), dev)
                    record.update({f"val_{k_}": v for k_, v in vm.items()})
                    score = _score(vm, task)
                else:
                    vm = {}
                    score = float(epoch)  # keep the last epoch
                is_best = score > best_score or best_epoch == 0
                if is_best:
                    best_score, best_epoch, best_metrics = score, epoch, dict(vm)
                    best_state = {k_: v.detach().to("cpu", copy=True)
                                  for k_, v in module.state_dict().items()}
                record["best"] = is_best
                record["time_s"] = time.perf_counter() - t0
                history.append(record)
                if log is not None:
                    log.write(json.dumps(_finite_json(record)) + "\n")
                    log.flush()
                if on_epoch_end is not None and (dctx is None or dctx.is_main):
                    on_epoch_end(dict(record))
    finally:
        if log is not None:
            log.close()
        module.train(was_training)
    module.load_state_dict(best_state)
    return TrainResult(
        module=module,
        classifier=None if task == "segmentation" else wrapper,
        history=history,
        best_epoch=best_epoch,
        best_metrics=best_metrics,
        best_state=best_state,
        device=str(dev),
        seed=int(seed),
        wall_time=time.perf_counter() - start,
    )


def evaluate(
    classifier: Classifier, data: ImageData, batch_size: int = 512
) -> dict[str, float]:
    """Loss, ACC and AUC (MedMNIST definitions) of a wrapped classifier on ``data``."""
    return _evaluate(classifier, data, data.task, batch_size, classifier.device)


def _finite_json(record: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in record.items()}


__all__ = [
    "ExampleGenerator",
    "OPTIMIZERS",
    "SCHEDULES",
    "TrainResult",
    "channel_stats",
    "dice_scores",
    "evaluate",
    "medmnist_acc",
    "medmnist_auc",
    "resolve_device",
    "roc_auc",
    "seeded",
    "train",
]
