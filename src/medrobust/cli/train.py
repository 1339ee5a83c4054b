"""``medrobust train``: train a reference network on a dataset and save the model folder.

Example::

    medrobust train --data pneumoniamnist --model resnet18 --epochs 20 --out runs/pneu-r18

The output folder holds the saved model (``model.json`` + ``weights.safetensors``, see
:mod:`medrobust.modelstore`) and ``metrics.jsonl`` (one line of metrics per epoch). It is written
into a temporary sibling folder and renamed into place at the end, so an error or Ctrl-C leaves
nothing half-written (a run killed with SIGKILL leaves a hidden temporary folder, which the next run
into the same ``--out`` removes). ``--overwrite`` replaces only a folder medrobust wrote (its
manifest lists every file, unchanged); a folder holding anything else is never replaced. The kept
weights are those of the epoch with the best validation AUC (ACC and AUC as the MedMNIST v2
benchmark reports them).
"""

from __future__ import annotations

import argparse
import inspect
import math
import sys
from pathlib import Path
from typing import Any

import torch

from medrobust.cli import CLIError

DEFAULTS = {
    "model": "smallcnn",
    "epochs": 20,
    "batch_size": 128,
    "lr": 1e-3,
    "seed": 0,
}


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "train",
        help="train a reference network and save the model folder",
        description=(
            "Train a network on a dataset (MedMNIST name or .npz, DICOM/NIfTI/image folder, or "
            "'phantom'), keep the state with the best validation AUC, and save a model folder "
            "(model.json + weights.safetensors) with a per-epoch metrics.jsonl."
        ),
    )
    p.add_argument("--data", required=True,
                   help="dataset name (pneumoniamnist, adrenalmnist3d_64, phantom, ...) or path")
    p.add_argument("--model", default=DEFAULTS["model"],
                   help="network: smallcnn, resnet18, resnet50, resnet18_3d, resnet50_3d, unet, "
                        "unet_3d, or package.module:function (default: %(default)s)")
    p.add_argument("--out", required=True, help="output folder for the saved model")
    p.add_argument("--epochs", type=int, default=DEFAULTS["epochs"],
                   help="default: %(default)s")
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"],
                   help="default: %(default)s")
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"], help="default: %(default)s")
    p.add_argument("--optimizer", default="adam", choices=["adam", "adamw", "sgd"],
                   help="default: %(default)s")
    p.add_argument("--weight-decay", type=float, default=0.0, help="default: %(default)s")
    p.add_argument("--schedule", default="multistep", choices=["multistep", "cosine", "none"],
                   help="LR schedule; multistep = x0.1 at 50%% and 75%% (MedMNIST)")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="default: %(default)s")
    p.add_argument("--device", default="auto",
                   help="auto (CUDA if available), cpu, cuda, cuda:1 (default: %(default)s)")
    p.add_argument("--size", type=int, default=None,
                   help="dataset image size (MedMNIST 28/64/128/224; phantom size)")
    p.add_argument("--input-size", default=None,
                   help="resize inputs inside the model to this size, e.g. 28 or 28,28")
    p.add_argument("--window", default=None,
                   help="intensity window CENTER,WIDTH mapped to [0, 1] inside the model "
                        "(e.g. -600,1500 for CT lung in HU)")
    p.add_argument("--limit", type=int, default=None,
                   help="train on a random subset of this many samples (and validate on at most "
                        "as many)")
    p.add_argument("--adversarial", default=None,
                   choices=["fgsm-rs", "pgd", "trades", "mixed", "advprop"],
                   help="adversarial training (medrobust.defenses.training); needs --eps")
    p.add_argument("--eps", default=None,
                   help="L-inf budget of --adversarial in the data's units, e.g. 0.0157 or 4/255")
    p.add_argument("--attack-steps", type=int, default=None,
                   help="inner-maximization steps (default: 1 for fgsm-rs/mixed, 7 otherwise)")
    p.add_argument("--trades-beta", type=float, default=6.0,
                   help="TRADES beta (the weight of the robustness term)")
    p.add_argument("--eps-warmup", type=int, default=0,
                   help="epochs over which the budget grows linearly to --eps (default 0)")
    p.add_argument("--checkpoint", default=None,
                   help="a checkpoint file written after every epoch; when it exists, training "
                        "resumes after its epoch (run the same command again)")
    p.add_argument("--no-test", action="store_true", help="do not evaluate on the test split")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an --out folder an earlier medrobust run wrote (a folder holding "
                        "other files is never replaced)")
    p.add_argument("--task", default="auto", choices=["auto", "detection", "inpaint"],
                   help="auto: classification/segmentation from the data; detection: a RetinaNet "
                        "on CT phantoms; inpaint: the CT-GAN in-painting generator")
    p.add_argument("--lesions", default=None,
                   help="--task inpaint on DICOM series: CSV rows folder,z,y,x of lesions")
    p.set_defaults(command="train")
    return p


# --------------------------------------------------------------------------- helpers
def _load(name: str, split: str, size: int | None, limit: int | None = None) -> Any:
    """Load a split with the data layer's ``load_dataset`` (MedMNIST loader as a fallback)."""
    kw: dict[str, Any] = {}
    if size is not None:
        kw["size"] = size
    if limit is not None and name.lower().startswith("phantom"):
        kw["n"] = limit  # generate only what is used
    try:
        from medrobust.data import load_dataset  # type: ignore[attr-defined]
    except ImportError:
        from medrobust.data.medmnist import load_medmnist

        return load_medmnist(name, split, **kw)
    return load_dataset(name, split=split, **kw)


def _data_error() -> type[Exception]:
    try:
        from medrobust.data.errors import DataError

        return DataError
    except ImportError:  # pragma: no cover
        return ValueError


def _same(a: Any, b: Any) -> bool:
    """Whether two datasets hold the same images (a source that ignores ``split``)."""
    return bool(a.images.shape == b.images.shape and torch.equal(a.images, b.images))


def _subset(data: Any, n: int | None, seed: int) -> Any:
    if n is None or n >= len(data):
        return data
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(data), generator=g)[:n].sort().values
    return data.subset(idx)


def _parse_ints(text: str, what: str) -> list[int]:
    try:
        vals = [int(v) for v in text.replace("x", ",").split(",") if v.strip()]
    except ValueError:
        raise CLIError(f"{what} must be integers like 28 or 28,28; got {text!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise CLIError(f"{what} must be positive integers; got {text!r}")
    return vals


def _window(text: str) -> Any:
    from medrobust.preprocessing import IntensityWindow, PreprocessingError

    try:
        c, w = (float(v) for v in text.split(","))
    except ValueError:
        raise CLIError(f"--window must be CENTER,WIDTH (two numbers); got {text!r}") from None
    try:
        return IntensityWindow(c, w)
    except PreprocessingError as err:
        raise CLIError(f"--window: {err}") from None


def _simple_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """The JSON-friendly scalar entries of a dataset's metadata."""
    out: dict[str, Any] = {}
    for k, v in meta.items():
        if isinstance(v, (str, bool, int)) or v is None:
            out[k] = v
        elif isinstance(v, float) and math.isfinite(v):
            out[k] = v
        elif isinstance(v, (list, tuple)) and len(v) <= 16 and all(
            isinstance(x, (str, int, float, bool)) for x in v
        ):
            out[k] = list(v)
    return out


def _build(model: str, args: dict[str, Any], seed: int) -> tuple[torch.nn.Module, dict[str, Any]]:
    from medrobust.modelstore import ModelError, resolve_factory
    from medrobust.nets import NETWORKS, build_network
    from medrobust.training import seeded

    if ":" in model:
        try:
            fn = resolve_factory(model)
        except ModelError as err:
            raise CLIError(str(err)) from None
        params = inspect.signature(fn).parameters
        accepts_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        kw = {k: v for k, v in args.items() if accepts_kw or k in params}
        try:
            with seeded(seed):
                net = fn(**kw)
        except Exception as err:
            raise CLIError(f"--model {model}: building the network failed ({err})") from None
        if not isinstance(net, torch.nn.Module):
            raise CLIError(f"--model {model}: returned {type(net).__name__}, not a torch Module")
        return net, {"factory": model, "args": kw}
    name = model.lower()
    if name not in NETWORKS:
        raise CLIError(
            f"unknown --model {model!r}; known: {', '.join(sorted(NETWORKS))}, or "
            "package.module:function"
        )
    spec = NETWORKS[name]
    if spec.spatial_dims is not None and spec.spatial_dims != args["spatial_dims"]:
        raise CLIError(
            f"--model {name} is a {spec.spatial_dims}D network but the data has "
            f"{args['spatial_dims']} spatial dimensions"
        )
    try:
        with seeded(seed):
            net = build_network(name, **args)
    except (ValueError, TypeError) as err:
        raise CLIError(f"--model {name}: {err}") from None
    return net, {"name": name}


def _adversarial(args: argparse.Namespace) -> Any:
    """The :class:`~medrobust.defenses.training.AdversarialTraining` asked for, or None."""
    if args.adversarial is None:
        if args.eps is not None:
            raise CLIError("--eps is the budget of --adversarial; give --adversarial METHOD too")
        return None
    if args.eps is None:
        raise CLIError(f"--adversarial {args.adversarial} needs --eps (in the data's units)")
    try:
        num, _, den = str(args.eps).partition("/")
        eps = float(num) / (float(den) if den else 1.0)
    except (ValueError, ZeroDivisionError):
        raise CLIError(
            f"--eps must be a number or a fraction like 4/255; got {args.eps!r}"
        ) from None
    from medrobust.defenses.base import DefenseError
    from medrobust.defenses.training import AdversarialTraining

    try:
        return AdversarialTraining(args.adversarial, eps, steps=args.attack_steps,
                                   beta=args.trades_beta, warmup_epochs=args.eps_warmup,
                                   seed=args.seed)
    except DefenseError as err:
        raise CLIError(f"--adversarial: {err}") from None


def _adversarial_hooks(adversarial: Any) -> dict[str, Any]:
    if adversarial is None:
        return {}
    if adversarial.method in ("fgsm-rs", "pgd"):
        return {"example_generator": adversarial}
    return {"objective": adversarial.objective}


# --------------------------------------------------------------------------- run
def run(args: argparse.Namespace) -> int:
    from medrobust.modelstore import ModelError, atomic_directory, write_model_files
    from medrobust.preprocessing import Compose, Resize
    from medrobust.training import channel_stats, evaluate, resolve_device, train

    DataError = _data_error()
    for name in ("epochs", "batch_size"):
        if getattr(args, name) < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be a positive integer")
    if args.limit is not None and args.limit < 2:
        raise CLIError("--limit must be at least 2")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        raise CLIError("--lr must be a positive number")
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise CLIError(f"--out {out}: folder exists and is not empty (use --overwrite)")
    from medrobust.modelstore import check_replaceable

    try:  # --overwrite replaces only a folder medrobust wrote, nothing else
        check_replaceable(out, bool(args.overwrite), flag="--overwrite")
    except ModelError as err:
        raise CLIError(f"--out {err}") from None
    try:
        device = resolve_device(args.device)
    except (ValueError, RuntimeError) as err:
        raise CLIError(f"--device: {err}") from None
    if getattr(args, "task", "auto") in ("detection", "inpaint"):
        from medrobust.cli import train_tasks

        return (train_tasks.run_detection if args.task == "detection"
                else train_tasks.run_inpaint)(args)

    adversarial = _adversarial(args)

    # ---- data
    try:
        train_data = _load(args.data, "train", args.size, args.limit)
    except (DataError, ValueError, TypeError) as err:
        raise CLIError(f"--data {args.data}: {err}") from None
    val_note = ""
    try:
        val_data = _load(args.data, "val", args.size, args.limit)
    except (DataError, ValueError, TypeError):
        val_data = None
    if val_data is not None and _same(val_data, train_data):
        val_data = None  # a source without splits (one DICOM/NIfTI file or folder)
    has_splits = val_data is not None and len(val_data) > 0
    if not has_splits:
        # hold out 15% of the training data (seeded) for validation
        g = torch.Generator().manual_seed(args.seed)
        perm = torch.randperm(len(train_data), generator=g)
        n_val = max(1, len(train_data) * 15 // 100)
        val_data = train_data.subset(perm[:n_val].sort().values)
        train_data = train_data.subset(perm[n_val:].sort().values)
        val_note = f" (no validation split: {n_val} training samples held out)"
    train_data = _subset(train_data, args.limit, args.seed)
    val_data = _subset(val_data, args.limit, args.seed + 1)
    if len(train_data) < 2:
        raise CLIError(f"{args.data}: only {len(train_data)} training sample(s)")
    task = train_data.task
    spatial_dims = len(train_data.spatial_shape)

    # ---- preprocessing and network
    steps = []
    if args.window:
        steps.append(_window(args.window))
    if args.input_size:
        size = _parse_ints(args.input_size, "--input-size")
        if len(size) not in (1, spatial_dims):
            raise CLIError(f"--input-size has {len(size)} values for {spatial_dims}D data")
        if task == "segmentation":
            raise CLIError("--input-size is not supported for segmentation (masks would differ)")
        steps.append(Resize(size * spatial_dims if len(size) == 1 else size))
    preprocess = Compose(steps) if steps else None
    mean, std = channel_stats(train_data, preprocess)
    num_outputs = max(train_data.num_classes, 2) if task != "multi-label" else (
        train_data.num_classes)
    net_args = {"in_channels": train_data.channels, "num_classes": num_outputs,
                "spatial_dims": spatial_dims}
    net, arch = _build(args.model, net_args, args.seed)
    from medrobust.nets import NETWORKS

    if "name" in arch:
        net_task = NETWORKS[arch["name"]].task
        if (net_task == "segmentation") != (task == "segmentation"):
            raise CLIError(
                f"--model {arch['name']} is a {net_task} network but {args.data} is a "
                f"{task} dataset"
            )
    if adversarial is not None and adversarial.method == "advprop":
        from medrobust.defenses.training import add_auxiliary_bn

        add_auxiliary_bn(net)
    n_params = sum(p.numel() for p in net.parameters())
    print(
        f"medrobust train: {args.data} ({task}, {train_data.num_classes} classes, "
        f"{len(train_data)} train / {len(val_data)} val{val_note}), {args.model} "
        f"({n_params / 1e6:.2f} M parameters) on {device}",
        flush=True,
    )

    def show(rec: dict[str, Any]) -> None:
        parts = [f"epoch {rec['epoch']:>3}/{args.epochs}", f"loss {rec['train_loss']:.4f}",
                 f"train acc {rec['train_acc']:.4f}"]
        for key in ("val_acc", "val_auc", "val_dice"):
            if key in rec:
                v = rec[key]
                parts.append(f"{key.replace('_', ' ')} "
                             f"{'nan' if v is None or v != v else format(v, '.4f')}")
        parts.append(f"{rec['time_s']:.1f} s")
        print("  ".join(parts) + ("  *best" if rec.get("best") else ""), flush=True)

    from medrobust import distributed

    dctx = distributed.current()
    if dctx is not None and not dctx.is_main:
        # under torchrun every rank trains its shard (DistributedDataParallel); rank 0 writes
        try:
            train(net, train_data, val_data, epochs=args.epochs, batch_size=args.batch_size,
                  lr=args.lr, optimizer=args.optimizer, weight_decay=args.weight_decay,
                  schedule=args.schedule, seed=args.seed, device=device, mean=mean, std=std,
                  preprocess=preprocess, progress=False, checkpoint=args.checkpoint,
                  **_adversarial_hooks(adversarial))
        except FloatingPointError as err:
            raise CLIError(str(err)) from None
        return 0
    try:
        with atomic_directory(out, overwrite=args.overwrite, flag="--overwrite") as tmp:
            try:
                result = train(
                    net, train_data, val_data, epochs=args.epochs, batch_size=args.batch_size,
                    lr=args.lr, optimizer=args.optimizer, weight_decay=args.weight_decay,
                    schedule=args.schedule, seed=args.seed, device=device, mean=mean, std=std,
                    preprocess=preprocess, progress=not args.no_progress,
                    log_path=tmp / "metrics.jsonl", on_epoch_end=show,
                    checkpoint=args.checkpoint, **_adversarial_hooks(adversarial),
                )
            except FloatingPointError as err:
                raise CLIError(str(err)) from None
            if adversarial is not None and adversarial.method == "advprop":
                from medrobust.defenses.training import strip_auxiliary_bn

                strip_auxiliary_bn(result.module)  # the main batch norms serve inference
            test_metrics: dict[str, float] | None = None
            if has_splits and not args.no_test and result.classifier is not None:
                try:
                    test_data = _subset(_load(args.data, "test", args.size, args.limit),
                                        args.limit, args.seed + 2)
                except (DataError, ValueError, TypeError):
                    test_data = None
                if test_data is not None and _same(test_data, val_data):
                    test_data = None
                if test_data is not None and len(test_data) > 0:
                    test_metrics = evaluate(result.classifier, test_data)
                    print(f"test ({len(test_data)} samples): acc {test_metrics['acc']:.4f}  "
                          f"auc {test_metrics['auc']:.4f}", flush=True)
            meta = train_data.meta if isinstance(train_data.meta, dict) else {}
            data_info = {
                "name": args.data,
                "dataset": meta.get("dataset", args.data),
                "source": train_data.source,
                "sha256": meta.get("sha256"),
                "split": "train",
                "n_train": len(train_data),
                "n_val": len(val_data),
                "limit": args.limit,
                "size": args.size,
                "meta": _simple_meta({k: v for k, v in meta.items() if k != "indices"}),
            }
            training_info = {
                "epochs": args.epochs,
                "batch_size": args.batch_size,
                "lr": args.lr,
                "optimizer": args.optimizer,
                "weight_decay": args.weight_decay,
                "schedule": args.schedule,
                "seed": args.seed,
                "device": result.device,
                "best_epoch": result.best_epoch,
                "val": result.best_metrics,
                "test": test_metrics,
                "wall_time_s": round(result.wall_time, 2),
                "metrics_log": "metrics.jsonl",
            }
            if adversarial is not None:
                training_info["adversarial"] = adversarial.config()
            write_model_files(
                tmp, result.module,
                architecture=arch.get("name"), factory=arch.get("factory"),
                arch_args=arch.get("args", net_args),
                bounds=train_data.bounds, units=train_data.units, mean=mean, std=std,
                preprocess=preprocess,
                input_size=list(train_data.spatial_shape), in_channels=train_data.channels,
                class_names=train_data.class_names, num_classes=num_outputs, task=task,
                data=data_info, training=training_info,
            )
    except ModelError as err:
        raise CLIError(str(err)) from None
    best = result.best_metrics
    summary = ", ".join(f"{k} {v:.4f}" for k, v in best.items() if k != "loss")
    print(f"saved {out} (best epoch {result.best_epoch}: val {summary}; "
          f"{result.wall_time:.1f} s)", flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover
    from medrobust.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
