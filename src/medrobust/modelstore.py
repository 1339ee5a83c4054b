"""Saved models: a directory with ``weights.safetensors`` and ``model.json``.

``model.json`` records everything another command needs to rebuild and wrap the model with no code:
the architecture (a registered network, or a user's ``"package.module:function"``) and its
arguments, the input bounds and units, the preprocessing (intensity window, resize, normalization
mean/std), the input size, class names, task, the data it was trained on (with its sha256) and the
medrobust version. Weights are stored with safetensors, which holds tensors only; a ``.pt`` state
dict is read with ``torch.load(..., weights_only=True)`` (torch >= 2.6). Nothing is ever unpickled.

A model folder is data, never code. Loading one builds only the networks in
:data:`medrobust.nets.NETWORKS` and the steps of :mod:`medrobust.preprocessing`; a folder whose
``architecture`` names a user's ``"package.module:function"`` factory (which would import and run
that code) is refused unless the caller opts in: ``load_model(..., trust_code=True)`` in Python,
``--trust-code`` on the command line. The weights' sha256 is recorded in ``model.json`` and checked
on load; weights whose dtype does not match the architecture's (integers saved over float
parameters) or that hold NaN/Inf are refused.

Schema (``format_version`` 1)::

    {
      "format": "medrobust-model", "format_version": 1, "medrobust_version": "0.1.0",
      "created": "2026-01-01T00:00:00+00:00",
      "architecture": {"name": "resnet18", "args": {"in_channels": 1, "num_classes": 2, ...}}
                      | {"factory": "package.module:function", "args": {...}},
      "weights": "weights.safetensors", "weights_sha256": "...",
      "task": "binary" | "multi-class" | "multi-label" | "ordinal" | "segmentation",
      "num_classes": 2, "class_names": ["normal", "pneumonia"],
      "input": {"bounds": [0.0, 1.0], "units": "intensity", "channels": 1,
                "spatial_dims": 2, "size": [28, 28]},
      "preprocessing": {"steps": {"type": "compose", "steps": [...]} | null,
                        "mean": [0.5] | null, "std": [0.5] | null},
      "defense": {"steps": [{"name": "jpeg", "options": {"quality": 75}}, ...],
                  "votes": 10} | null,    (optional; registered defenses only)
      "data": {"dataset": "pneumoniamnist", "sha256": "...", ...} | null,
      "training": {...} | null,
      "extra": {...}
    }

A directory is written atomically: into a temporary sibling directory, then renamed into place, so
an error never leaves a half-written model behind; a run killed on the way leaves a hidden temporary
folder that the next write to the same target removes. A written folder holds a manifest of its
files (:data:`medrobust._files.MANIFEST`); ``overwrite`` replaces a folder only when every file in
it is one medrobust wrote, unchanged.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import importlib
import json
import math
import os
import shutil
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medrobust._files import (
    apply_umask,
    few,
    foreign_files,
    mark_folder_written,
    sha256_of,
)
from medrobust.models import Classifier, Segmenter
from medrobust.preprocessing import PreprocessingError, from_config, output_size
from medrobust.preprocessing import to_config as preprocessing_to_config

MODEL_JSON = "model.json"
WEIGHTS_FILE = "weights.safetensors"
FORMAT = "medrobust-model"
FORMAT_VERSION = 1
_TASKS = ("binary", "multi-class", "multi-label", "ordinal", "segmentation")


class ModelError(ValueError):
    """A saved model (directory, ``model.json`` or weights) that cannot be loaded or written.

    The message names the file and what is wrong with it.
    """


def _version() -> str:
    try:
        import medrobust

        return str(getattr(medrobust, "__version__", "unknown"))
    except Exception:  # pragma: no cover - import cycle guard
        return "unknown"


# --------------------------------------------------------------------------- atomic directories
def _check_target(target: Path, overwrite: bool, flag: str = "overwrite=True") -> None:
    """Refuse a target that is a file, a non-empty folder without ``overwrite``, or a folder
    holding files medrobust did not write (never replaced, even with ``overwrite``)."""
    if target.exists() and not target.is_dir():
        raise ModelError(f"{target}: exists and is not a directory")
    if target.is_dir() and any(target.iterdir()):
        if not overwrite:
            raise ModelError(f"{target}: directory exists and is not empty (use {flag})")
        foreign = foreign_files(target)
        if foreign:
            raise ModelError(
                f"{target}: holds files medrobust did not write (or that changed since): "
                f"{few(foreign)}; it is never replaced, even with {flag}: choose another folder "
                "or remove it yourself"
            )


def check_replaceable(target: str | os.PathLike[str], overwrite: bool,
                      flag: str = "overwrite=True") -> None:
    """Raise :class:`ModelError` unless :func:`atomic_directory` may write ``target`` (``flag``
    is how the message names the overwrite switch: ``--overwrite`` on the command line)."""
    _check_target(Path(target).expanduser().absolute(), overwrite, flag)


def _clean_stale(tgt: Path) -> None:
    """Remove the temporary folders of earlier writes to ``tgt`` whose process died (their lock
    file is no longer held); restore a previous folder a killed run had moved aside."""
    for lock in tgt.parent.glob(f".{glob_escape(tgt.name)}.lock-*"):
        tag = lock.name.rsplit(".lock-", 1)[-1]
        try:
            fd = os.open(lock, os.O_RDWR)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # another live run holds it
            old = tgt.parent / f".{tgt.name}.old-{tag}"
            if (old / "d").is_dir() and not tgt.exists():
                os.rename(old / "d", tgt)  # killed between moving the old folder and the new in
            for d in (tgt.parent / f".{tgt.name}.tmp-{tag}", old):
                if d.is_dir():
                    shutil.rmtree(d, ignore_errors=True)
            with contextlib.suppress(OSError):
                lock.unlink()
        finally:
            os.close(fd)


def glob_escape(name: str) -> str:
    """``name`` with glob's special characters escaped."""
    import glob

    return glob.escape(name)


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike[str], overwrite: bool = False,
                     flag: str = "overwrite=True") -> Iterator[Path]:
    """Yield a temporary directory that replaces ``target`` when the block succeeds.

    The temporary directory is a hidden sibling of ``target`` (same file system, so the final
    rename is atomic), guarded by a lock file held while the block runs: the temporary folders of
    a run that was killed are removed by the next write to the same ``target``. If the block
    raises, the temporary directory is removed and ``target`` is left as it was. A manifest of
    the files written (:data:`medrobust._files.MANIFEST`) is added. An existing non-empty
    ``target`` is replaced only with ``overwrite``, and only when it holds nothing but files
    medrobust wrote.

    Raises:
        ModelError: ``target`` is a file, a non-empty directory without ``overwrite``, or holds
            files medrobust did not write.
    """
    tgt = Path(target).expanduser().absolute()
    _check_target(tgt, overwrite, flag)
    tgt.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(tgt)
    tag = uuid.uuid4().hex[:12]
    lock = tgt.parent / f".{tgt.name}.lock-{tag}"
    fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    tmp = tgt.parent / f".{tgt.name}.tmp-{tag}"
    try:
        tmp.mkdir(mode=0o700)
        yield tmp
        _check_target(tgt, overwrite, flag)
        mark_folder_written(tmp)
        apply_umask(tmp)
        old: Path | None = None
        if tgt.exists():
            old = tgt.parent / f".{tgt.name}.old-{tag}"
            old.mkdir(mode=0o700)
            os.rename(tgt, old / "d")
        try:
            os.rename(tmp, tgt)
        except BaseException:
            if old is not None:
                os.rename(old / "d", tgt)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()
        os.close(fd)


# --------------------------------------------------------------------------- writing
def _jsonable(value: Any, where: str) -> Any:
    """Check that ``value`` survives JSON (numbers finite); convert tuples and tensors."""
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, (tuple, list)):
        return [_jsonable(v, where) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v, where) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if hasattr(value, "item"):  # numpy scalars
        return _jsonable(value.item(), where)
    raise ModelError(f"{where}: {type(value).__name__} value {value!r} cannot be stored in JSON")


def _channel_list(value: float | Sequence[float] | torch.Tensor | None) -> list[float] | None:
    if value is None:
        return None
    t = torch.as_tensor(value, dtype=torch.float64).flatten()
    return [float(v) for v in t]


def _state_dict_for_safetensors(module: nn.Module) -> dict[str, torch.Tensor]:
    # clone: safetensors refuses tensors that share memory, and wants contiguous CPU tensors
    return {k: v.detach().to("cpu").clone().contiguous() for k, v in module.state_dict().items()}


def write_model_files(
    directory: str | os.PathLike[str],
    module: nn.Module,
    *,
    architecture: str | None = None,
    arch_args: Mapping[str, Any] | None = None,
    factory: str | None = None,
    bounds: tuple[float, float] = (0.0, 1.0),
    units: str = "intensity",
    mean: float | Sequence[float] | torch.Tensor | None = None,
    std: float | Sequence[float] | torch.Tensor | None = None,
    preprocess: nn.Module | Mapping[str, Any] | None = None,
    input_size: Sequence[int] | None = None,
    in_channels: int | None = None,
    class_names: Sequence[str] | None = None,
    num_classes: int | None = None,
    task: str | None = None,
    data: Mapping[str, Any] | None = None,
    training: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    defense: Any = None,
) -> dict[str, Any]:
    """Write ``weights.safetensors`` and ``model.json`` into an existing ``directory``.

    Not atomic by itself: :func:`save_model` wraps it in :func:`atomic_directory`; a caller that
    writes more files into the same folder (``medrobust train``) does the same. The arguments are
    those of :func:`save_model`. Returns the metadata written.
    """
    from safetensors.torch import save_file

    d = Path(directory)
    if not d.is_dir():
        raise ModelError(f"{d}: not a directory")
    meta = build_metadata(
        module,
        architecture=architecture,
        arch_args=arch_args,
        factory=factory,
        bounds=bounds,
        units=units,
        mean=mean,
        std=std,
        preprocess=preprocess,
        input_size=input_size,
        in_channels=in_channels,
        class_names=class_names,
        num_classes=num_classes,
        task=task,
        data=data,
        training=training,
        extra=extra,
        defense=defense,
    )
    try:
        save_file(_state_dict_for_safetensors(module), str(d / WEIGHTS_FILE), metadata={
            "format": FORMAT,
        })
    except Exception as err:
        raise ModelError(f"{d / WEIGHTS_FILE}: cannot write the weights ({err})") from err
    if meta.get("defense", {}).get("weights"):
        _write_defense_weights(d / meta["defense"]["weights"], defense)
        meta["defense"]["weights_sha256"] = sha256_of(d / meta["defense"]["weights"])
    meta["weights_sha256"] = sha256_of(d / WEIGHTS_FILE)
    text = json.dumps(meta, indent=2, allow_nan=False) + "\n"
    (d / MODEL_JSON).write_text(text, encoding="utf-8")
    return meta


def build_metadata(
    module: nn.Module,
    *,
    architecture: str | None = None,
    arch_args: Mapping[str, Any] | None = None,
    factory: str | None = None,
    bounds: tuple[float, float] = (0.0, 1.0),
    units: str = "intensity",
    mean: float | Sequence[float] | torch.Tensor | None = None,
    std: float | Sequence[float] | torch.Tensor | None = None,
    preprocess: nn.Module | Mapping[str, Any] | None = None,
    input_size: Sequence[int] | None = None,
    in_channels: int | None = None,
    class_names: Sequence[str] | None = None,
    num_classes: int | None = None,
    task: str | None = None,
    data: Mapping[str, Any] | None = None,
    training: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    defense: Any = None,
) -> dict[str, Any]:
    """The ``model.json`` content for ``module`` (see the module docstring for the schema)."""
    recorded = getattr(module, "medrobust_architecture", None) or {}
    if factory is not None and architecture is not None:
        raise ModelError("give either architecture (a registered network) or factory, not both")
    args = dict(arch_args) if arch_args is not None else dict(recorded.get("args", {}))
    if factory is not None:
        _split_factory(factory)
        arch: dict[str, Any] = {"factory": factory, "args": args}
    else:
        name = architecture or recorded.get("name")
        if not name:
            raise ModelError(
                "the architecture is unknown: build the network with medrobust.nets."
                "build_network, or pass architecture=... (a registered name) or "
                "factory='package.module:function'"
            )
        from medrobust.nets import NETWORKS

        if name not in NETWORKS:
            raise ModelError(
                f"unknown architecture {name!r}; known: {', '.join(sorted(NETWORKS))} "
                "(or use factory='package.module:function')"
            )
        arch = {"name": name, "args": args}
    lo, hi = (float(b) for b in bounds)
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo >= hi:
        raise ModelError(f"bounds must be finite with lo < hi; got {bounds!r}")
    if isinstance(preprocess, Mapping):
        try:
            pre_mod = from_config(dict(preprocess))
        except PreprocessingError as err:
            raise ModelError(f"preprocessing: {err}") from err
    else:
        pre_mod = preprocess
    try:
        pre_cfg = preprocessing_to_config(pre_mod)
    except PreprocessingError as err:
        raise ModelError(str(err)) from err
    if num_classes is None:
        num_classes = args.get("num_classes")
        if num_classes is None and class_names is not None:
            num_classes = len(class_names)
    if class_names is None and num_classes is not None:
        class_names = [str(i) for i in range(int(num_classes))]
    if class_names is not None and num_classes is not None and len(class_names) != num_classes:
        # a binary model with one logit has 2 class names
        if not (int(num_classes) == 1 and len(class_names) == 2):
            raise ModelError(
                f"{len(class_names)} class names for a model with {num_classes} outputs"
            )
    if task is None:
        if factory is None and arch.get("name", "").startswith("unet"):
            task = "segmentation"
        elif class_names is not None and len(class_names) == 2:
            task = "binary"
        else:
            task = "multi-class"
    if task not in _TASKS:
        raise ModelError(f"unknown task {task!r}; expected one of {_TASKS}")
    size = list(input_size) if input_size is not None else None
    pre_size = output_size(pre_mod)
    if pre_size is not None:
        size = list(pre_size)
    channels = in_channels if in_channels is not None else args.get("in_channels")
    spatial_dims = args.get("spatial_dims") or (len(size) if size else None)
    if size is not None and len(size) == 1 and isinstance(spatial_dims, int):
        size = size * spatial_dims
    meta: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "medrobust_version": _version(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "architecture": arch,
        "weights": WEIGHTS_FILE,
        "weights_sha256": None,
        "task": task,
        "num_classes": None if num_classes is None else int(num_classes),
        "class_names": None if class_names is None else [str(c) for c in class_names],
        "input": {
            "bounds": [lo, hi],
            "units": str(units),
            "channels": channels,
            "spatial_dims": spatial_dims,
            "size": size,
        },
        "preprocessing": {
            "steps": pre_cfg,
            "mean": _channel_list(mean),
            "std": _channel_list(std),
        },
        "data": None if data is None else dict(data),
        "training": None if training is None else dict(training),
        "extra": {} if extra is None else dict(extra),
    }
    if defense is not None:
        meta["defense"] = _defense_config(defense)
    return _jsonable(meta, MODEL_JSON)  # type: ignore[no-any-return]


def _defense_config(defense: Any) -> dict[str, Any]:
    """``{"steps": [...], "votes": N}`` for a defense, a list of them, or a defended model."""
    from medrobust.defenses import DefenseError, as_chain

    votes = getattr(defense, "votes", 10)
    if hasattr(defense, "defense") and hasattr(defense, "module"):  # a defended model
        defense = defense.defense
    try:
        chain = as_chain(defense)
    except DefenseError as err:
        raise ModelError(f"defense: {err}") from err
    out: dict[str, Any] = {"steps": [] if chain is None else chain.config(), "votes": int(votes)}
    if chain is not None and chain.state_dict():
        out["weights"] = DEFENSE_WEIGHTS_FILE  # learned defenses (denoisers, generators)
    return out


DEFENSE_WEIGHTS_FILE = "defense.safetensors"


def _write_defense_weights(path: Path, defense: Any) -> None:
    from safetensors.torch import save_file

    from medrobust.defenses import as_chain

    if hasattr(defense, "defense") and hasattr(defense, "module"):
        defense = defense.defense
    chain = as_chain(defense)
    assert chain is not None
    try:
        save_file(_state_dict_for_safetensors(chain), str(path), metadata={"format": FORMAT})
    except Exception as err:
        raise ModelError(f"{path}: cannot write the defense's weights ({err})") from err


def save_model(
    directory: str | os.PathLike[str],
    module: nn.Module,
    *,
    overwrite: bool = False,
    architecture: str | None = None,
    arch_args: Mapping[str, Any] | None = None,
    factory: str | None = None,
    bounds: tuple[float, float] = (0.0, 1.0),
    units: str = "intensity",
    mean: float | Sequence[float] | torch.Tensor | None = None,
    std: float | Sequence[float] | torch.Tensor | None = None,
    preprocess: nn.Module | Mapping[str, Any] | None = None,
    input_size: Sequence[int] | None = None,
    in_channels: int | None = None,
    class_names: Sequence[str] | None = None,
    num_classes: int | None = None,
    task: str | None = None,
    data: Mapping[str, Any] | None = None,
    training: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    defense: Any = None,
) -> Path:
    """Save ``module`` as a model directory, atomically; returns the directory.

    Args:
        directory: the model directory to create (an existing non-empty one needs ``overwrite``).
        module: the network. One built with :func:`medrobust.nets.build_network` records its
            architecture itself; otherwise give ``architecture`` (a registered name) and
            ``arch_args``, or ``factory="package.module:function"`` (called with ``arch_args``).
        bounds, units: the range and units of the inputs the wrapper accepts.
        mean, std: per-channel normalization applied after ``preprocess``.
        preprocess: a :mod:`medrobust.preprocessing` module (or its config dict).
        input_size: the spatial size the network expects (taken from a ``Resize`` step if any).
        in_channels: input channels (default: ``arch_args["in_channels"]``).
        class_names, num_classes, task: the output's meaning.
        data: the training data: ``{"dataset", "source", "sha256", "split", ...}``.
        training: training settings and results (epochs, metrics, seed, ...).
        extra: anything else (JSON-serialisable).
        defense: registered input defenses (:mod:`medrobust.defenses`; a defense, a list, or a
            defended Classifier, whose ``votes`` are kept) rebuilt in front of the model on load.

    Raises:
        ModelError: unknown architecture, unserialisable metadata, an existing directory (with
            ``overwrite``, one holding files medrobust did not write).
    """
    with atomic_directory(directory, overwrite=overwrite) as tmp:
        write_model_files(
            tmp,
            module,
            architecture=architecture,
            arch_args=arch_args,
            factory=factory,
            bounds=bounds,
            units=units,
            mean=mean,
            std=std,
            preprocess=preprocess,
            input_size=input_size,
            in_channels=in_channels,
            class_names=class_names,
            num_classes=num_classes,
            task=task,
            data=data,
            training=training,
            extra=extra,
            defense=defense,
        )
    return Path(directory)


# --------------------------------------------------------------------------- loading
@dataclass
class LoadedModel:
    """A model loaded from a directory (or from a factory and weights).

    Attributes:
        module: the network, in eval mode, weights loaded.
        classifier: a :class:`medrobust.Classifier` with bounds, mean/std, preprocessing and
            ``num_classes`` set; ``None`` for a segmentation model.
        metadata: the ``model.json`` content.
        path: the directory (``None`` for :func:`load_from_factory`).
        segmenter: a :class:`medrobust.Segmenter` (bounds, mean/std, preprocessing,
            ``num_classes``) for a segmentation model; ``None`` otherwise.
    """

    module: nn.Module
    classifier: Classifier | None
    metadata: dict[str, Any]
    path: Path | None = None
    preprocess: nn.Module | None = field(default=None, repr=False)
    segmenter: Segmenter | None = None

    @property
    def model(self) -> Classifier | Segmenter:
        """The wrapped model, whatever its kind (classifier or segmenter)."""
        wrapped = self.classifier if self.classifier is not None else self.segmenter
        if wrapped is None:  # pragma: no cover - load_model always wraps one
            raise ModelError("this model has no wrapper")
        return wrapped

    @property
    def task(self) -> str:
        return str(self.metadata.get("task"))

    @property
    def class_names(self) -> list[str]:
        return list(self.metadata.get("class_names") or [])

    @property
    def bounds(self) -> tuple[float, float]:
        lo, hi = self.metadata["input"]["bounds"]
        return float(lo), float(hi)

    @property
    def units(self) -> str:
        return str(self.metadata["input"].get("units", "intensity"))


def _device(device: torch.device | str | None) -> torch.device:
    """``None``: CPU; ``"auto"``: CUDA when available; otherwise the device given."""
    if device is None:
        return torch.device("cpu")
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device {str(device)!r} requested but CUDA is not available")
    return dev


def _split_factory(spec: str) -> tuple[str, str]:
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise ModelError(f"factory must be 'package.module:function'; got {spec!r}")
    mod, fn = spec.split(":")
    if not mod or not fn or not all(p.isidentifier() for p in mod.split(".") + fn.split(".")):
        raise ModelError(f"factory must be 'package.module:function'; got {spec!r}")
    return mod, fn


def resolve_factory(spec: str) -> Callable[..., nn.Module]:
    """Import ``"package.module:function"`` and return the callable.

    This imports (runs) the named module, which must be installed or on ``sys.path``; it never
    unpickles anything.
    """
    mod_name, fn_name = _split_factory(spec)
    try:
        mod = importlib.import_module(mod_name)
    except Exception as err:
        raise ModelError(f"factory {spec!r}: cannot import {mod_name!r} ({err})") from err
    obj: Any = mod
    for part in fn_name.split("."):
        if not hasattr(obj, part):
            raise ModelError(f"factory {spec!r}: {mod_name!r} has no attribute {fn_name!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelError(f"factory {spec!r}: {fn_name!r} is not callable")
    return obj  # type: ignore[no-any-return]


def read_weights(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or, without unpickling code, from ``.pt``/``.pth``.

    A ``.pt`` file is read with ``torch.load(..., weights_only=True)``; a checkpoint dict holding a
    ``"state_dict"`` (or ``"model_state_dict"``) entry is unwrapped.
    """
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"{p}: weights file not found")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(p), device="cpu")
        except Exception as err:
            raise ModelError(f"{p}: not a readable safetensors file ({err})") from err
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as err:
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(
            f"{p}: cannot read the weights as a tensor-only state dict "
            f"(torch.load weights_only=True: {msg})"
        ) from err
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model_state_dict", "model"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise ModelError(f"{p}: expected a state dict (names -> tensors); got {type(obj).__name__}")
    return dict(obj)


def _dtype_kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    if dtype.is_complex:
        return "complex"
    return "float" if dtype.is_floating_point else "integer"


def load_weights_into(module: nn.Module, state: Mapping[str, torch.Tensor], source: Any) -> None:
    """Load ``state`` strictly into ``module``; a clear :class:`ModelError` on any mismatch.

    Refused: missing or unexpected names, other shapes, another kind of dtype (integer weights
    over float parameters, which ``load_state_dict`` would silently cast), NaN or Inf values.
    """
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]

    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {few(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {few(unexpected)}")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es): {few(shapes)}")
    kinds = [
        f"{k}: file {state[k].dtype} vs model {own[k].dtype}"
        for k in own
        if k in state and _dtype_kind(state[k].dtype) != _dtype_kind(own[k].dtype)
    ]
    if kinds:
        problems.append(f"{len(kinds)} dtype mismatch(es): {few(kinds)}")
    if problems:
        raise ModelError(
            f"{source}: the weights do not match the architecture; " + "; ".join(problems)
        )
    bad = [
        k for k, v in state.items()
        if v.is_floating_point() or v.is_complex()
        if not bool(torch.isfinite(v).all())
    ]
    if bad:
        raise ModelError(
            f"{source}: the weights hold NaN or infinite values in {len(bad)} tensor(s): "
            f"{few(bad)}; a model with such weights gives no meaningful predictions"
        )
    try:
        module.load_state_dict(dict(state), strict=True)
    except Exception as err:  # dtype or other problems
        raise ModelError(f"{source}: cannot load the weights ({err})") from err


def _read_json(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ModelError(f"{path}: not UTF-8 text ({err})") from err
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as err:
        raise ModelError(
            f"{path}: malformed JSON at line {err.lineno}, column {err.colno}: {err.msg}"
        ) from err
    if not isinstance(meta, dict):
        raise ModelError(f"{path}: expected a JSON object; got {type(meta).__name__}")
    return meta


TRUST_HINT = "--trust-code on the command line, trust_code=True in Python"


def _build_from_metadata(meta: dict[str, Any], where: Path | str,
                         trust_code: bool = False) -> nn.Module:
    arch = meta.get("architecture")
    if not isinstance(arch, dict):
        raise ModelError(f"{where}: 'architecture' must be an object with 'name' or 'factory'")
    args = arch.get("args", {}) or {}
    if not isinstance(args, dict):
        raise ModelError(f"{where}: 'architecture.args' must be an object")
    if "factory" in arch:
        if not trust_code:
            raise ModelError(
                f"{where}: the architecture is the factory {str(arch['factory'])!r}, which is "
                "code: loading it would import and run it. medrobust builds only its registered "
                "networks from a model folder; if you trust this folder's author, allow code "
                f"explicitly ({TRUST_HINT})"
            )
        builder = resolve_factory(str(arch["factory"]))
        label = str(arch["factory"])
        try:
            module = builder(**args)
        except Exception as err:
            raise ModelError(f"{where}: factory {label!r} failed with args {args} ({err})") from err
        if not isinstance(module, nn.Module):
            raise ModelError(f"{where}: factory {label!r} returned {type(module).__name__}")
        return module
    name = arch.get("name")
    from medrobust.nets import NETWORKS, build_network

    if not isinstance(name, str) or name.lower() not in NETWORKS:
        raise ModelError(
            f"{where}: unknown architecture {name!r}; known: {', '.join(sorted(NETWORKS))} "
            f"(a user network needs \"factory\": \"package.module:function\" and {TRUST_HINT})"
        )
    try:
        return build_network(name, **args)
    except (TypeError, ValueError, KeyError) as err:
        raise ModelError(f"{where}: cannot build {name!r} with args {args}: {err}") from err


def _wrap(
    module: nn.Module, meta: dict[str, Any], where: Path | str
) -> tuple[Classifier | None, nn.Module | None]:
    inp = meta.get("input") or {}
    pre = meta.get("preprocessing") or {}
    if not isinstance(inp, dict) or not isinstance(pre, dict):
        raise ModelError(f"{where}: 'input' and 'preprocessing' must be objects")
    try:
        preprocess = from_config(pre.get("steps"))
    except PreprocessingError as err:
        raise ModelError(f"{where}: preprocessing: {err}") from err
    if meta.get("task") == "segmentation":
        return None, preprocess
    bounds = inp.get("bounds", [0.0, 1.0])
    num_classes = meta.get("num_classes")
    names = meta.get("class_names")
    k = len(names) if isinstance(names, list) and names else num_classes
    if meta.get("task") == "multi-label" or (isinstance(k, int) and k < 2):
        k = None
    defended = _load_defense(meta.get("defense"), where)
    try:
        clf = Classifier(
            module,
            bounds=tuple(bounds),  # type: ignore[arg-type]
            mean=pre.get("mean"),
            std=pre.get("std"),
            num_classes=k,
            preprocess=preprocess,
            **defended,
        )
    except (TypeError, ValueError) as err:
        raise ModelError(f"{where}: {err}") from err
    return clf, preprocess


def _load_defense(entry: Any, where: Path | str) -> dict[str, Any]:
    """``{"defense": chain, "votes": N}`` from ``model.json``'s ``"defense"`` (registered names
    only), or ``{}``."""
    if entry is None:
        return {}
    from medrobust.defenses import DefenseError, defense_from_config

    if not isinstance(entry, dict) or not isinstance(entry.get("steps", []), list):
        raise ModelError(f"{where}: 'defense' must be an object with a list of 'steps'")
    votes = entry.get("votes", 10)
    if isinstance(votes, bool) or not isinstance(votes, int) or votes < 1:
        raise ModelError(f"{where}: 'defense.votes' must be a positive integer; got {votes!r}")
    try:
        chain = defense_from_config(entry.get("steps", []))
    except DefenseError as err:
        raise ModelError(f"{where}: defense: {err}") from err
    wname = entry.get("weights")
    if chain is not None and wname is not None:
        if not isinstance(wname, str) or Path(wname).name != wname or not isinstance(
            where, Path
        ):
            raise ModelError(f"{where}: 'defense.weights' must be a file name beside model.json")
        wpath = where.parent / wname
        recorded = entry.get("weights_sha256")
        if recorded is not None and (not wpath.is_file() or sha256_of(wpath) != str(recorded)):
            raise ModelError(f"{wpath}: missing, or its sha256 differs from the one recorded in "
                             f"{where.name}; the defense's weights were changed after saving")
        load_weights_into(chain, read_weights(wpath), wpath)
        chain.eval()
    return {} if chain is None else {"defense": chain, "votes": votes}


def _wrap_segmenter(
    module: nn.Module, meta: dict[str, Any], preprocess: nn.Module | None, where: Path | str
) -> Segmenter | None:
    """The :class:`Segmenter` of a segmentation model (``None`` for other tasks)."""
    if meta.get("task") != "segmentation":
        return None
    inp = meta.get("input") or {}
    pre = meta.get("preprocessing") or {}
    k = meta.get("num_classes")
    try:
        return Segmenter(
            module,
            bounds=tuple(inp.get("bounds", [0.0, 1.0])),  # type: ignore[arg-type]
            mean=pre.get("mean"),
            std=pre.get("std"),
            preprocess=preprocess,
            num_classes=k if isinstance(k, int) and k >= 2 else None,
        )
    except (TypeError, ValueError) as err:
        raise ModelError(f"{where}: {err}") from err


def load_model(
    directory: str | os.PathLike[str],
    device: torch.device | str | None = None,
    *,
    trust_code: bool = False,
) -> LoadedModel:
    """Load a model directory written by :func:`save_model` (or by hand, following the schema).

    Returns the module (eval mode, on ``device``: default CPU, ``"auto"`` picks CUDA when
    available), a ready :class:`Classifier` (a :class:`Segmenter` in ``segmenter`` for a
    segmentation model, such as the UNet ``medrobust train`` writes), and the metadata.

    Args:
        directory: the model folder.
        device: where to put the module.
        trust_code: allow an ``architecture`` that names a ``"package.module:function"``
            factory, i.e. import and run code named by the folder. Off by default: a folder
            someone sent you must not run code on your machine; only registered networks are
            built.

    Raises:
        ModelError: missing directory / ``model.json`` / weights, malformed JSON, unknown
            architecture, a factory without ``trust_code``, weights that do not match it (names,
            shapes, dtypes, the recorded sha256) or hold NaN/Inf; the message names the file.
    """
    d = Path(directory).expanduser()
    if not d.exists():
        raise ModelError(f"{d}: model directory not found")
    if not d.is_dir():
        raise ModelError(f"{d}: not a directory (a saved model is a directory with {MODEL_JSON})")
    jpath = d / MODEL_JSON
    if not jpath.is_file():
        raise ModelError(f"{jpath}: missing; {d} is not a saved medrobust model")
    meta = _read_json(jpath)
    fmt = meta.get("format", FORMAT)
    if fmt != FORMAT:
        raise ModelError(f"{jpath}: 'format' is {fmt!r}, not {FORMAT!r}")
    version = meta.get("format_version", FORMAT_VERSION)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ModelError(
            f"{jpath}: format_version {version!r} is newer than this medrobust reads "
            f"({FORMAT_VERSION}); upgrade medrobust"
        )
    kind = meta.get("kind")
    if kind not in (None, "classifier", "segmenter"):
        where = {"detector": "medrobust.models.load_detector(folder)",
                 "inpainting-generator": "medrobust tamper --generator FOLDER"}.get(str(kind))
        raise ModelError(
            f"{jpath}: this folder holds a {kind}, not a classifier or segmenter"
            + (f"; load it with {where}" if where else "")
        )
    if "architecture" not in meta:
        raise ModelError(f"{jpath}: no 'architecture' entry")
    wname = meta.get("weights", WEIGHTS_FILE)
    if not isinstance(wname, str) or not wname or Path(wname).is_absolute() or ".." in Path(
        wname
    ).parts:
        raise ModelError(f"{jpath}: 'weights' must be a file name inside {d}; got {wname!r}")
    wpath = d / wname
    module = _build_from_metadata(meta, jpath, trust_code)
    if not wpath.is_file():
        raise ModelError(f"{wpath}: weights file missing")
    recorded = meta.get("weights_sha256")
    if recorded is not None:
        if not isinstance(recorded, str):
            raise ModelError(f"{jpath}: 'weights_sha256' must be a hex string; got {recorded!r}")
        actual = sha256_of(wpath)
        if actual != recorded.lower():
            raise ModelError(
                f"{wpath}: sha256 {actual} differs from the {recorded} recorded in {jpath.name}; "
                "the weights were changed or replaced after the model was saved"
            )
    load_weights_into(module, read_weights(wpath), wpath)
    module.eval()
    module.to(_device(device))
    clf, pre = _wrap(module, meta, jpath)
    seg = _wrap_segmenter(module, meta, pre, jpath)
    return LoadedModel(module=module, classifier=clf, metadata=meta, path=d, preprocess=pre,
                       segmenter=seg)


def load_from_factory(
    factory: str,
    weights: str | os.PathLike[str],
    *,
    args: Mapping[str, Any] | None = None,
    bounds: tuple[float, float] = (0.0, 1.0),
    units: str = "intensity",
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
    preprocess: nn.Module | Mapping[str, Any] | None = None,
    class_names: Sequence[str] | None = None,
    num_classes: int | None = None,
    task: str | None = None,
    device: torch.device | str | None = None,
) -> LoadedModel:
    """Load a user's own network: ``factory(**args)`` plus a weights file (safetensors or ``.pt``).

    ``factory`` is ``"package.module:function"`` (the module must be importable). The weights are
    read without unpickling code (see :func:`read_weights`) and must match the network exactly.
    Save the result with :func:`save_model` (``factory=...``) to get a self-describing folder.
    """
    builder = resolve_factory(factory)
    try:
        module = builder(**dict(args or {}))
    except Exception as err:
        raise ModelError(f"factory {factory!r} failed ({err})") from err
    if not isinstance(module, nn.Module):
        raise ModelError(f"factory {factory!r} returned {type(module).__name__}, not a Module")
    load_weights_into(module, read_weights(weights), Path(weights))
    module.eval()
    module.to(_device(device))
    meta = build_metadata(
        module,
        factory=factory,
        arch_args=dict(args or {}),
        bounds=bounds,
        units=units,
        mean=mean,
        std=std,
        preprocess=preprocess,
        class_names=class_names,
        num_classes=num_classes,
        task=task,
    )
    clf, pre = _wrap(module, meta, factory)
    seg = _wrap_segmenter(module, meta, pre, factory)
    return LoadedModel(module=module, classifier=clf, metadata=meta, path=None, preprocess=pre,
                       segmenter=seg)


__all__ = [
    "FORMAT_VERSION",
    "LoadedModel",
    "MODEL_JSON",
    "ModelError",
    "WEIGHTS_FILE",
    "atomic_directory",
    "build_metadata",
    "check_replaceable",
    "load_from_factory",
    "load_model",
    "load_weights_into",
    "read_weights",
    "resolve_factory",
    "save_model",
    "write_model_files",
]
