"""Model folders of a named kind (detector, in-painting generator): JSON + safetensors, no code.

The folder layout is that of :mod:`medrobust.modelstore` (``model.json`` + ``weights.safetensors``,
written atomically), with a ``"kind"`` entry and an architecture that must be one of the kind's own
registered builders: loading never imports or unpickles anything named by the file.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from medrobust.modelstore import (
    FORMAT,
    FORMAT_VERSION,
    MODEL_JSON,
    WEIGHTS_FILE,
    ModelError,
    atomic_directory,
    load_weights_into,
    read_weights,
)


def write_kind_folder(
    directory: str | os.PathLike[str],
    module: nn.Module,
    *,
    kind: str,
    architecture: str,
    arch_args: Mapping[str, Any],
    meta: Mapping[str, Any],
    overwrite: bool = False,
) -> Path:
    """Write ``module``'s weights and a ``model.json`` with ``kind``, the architecture and
    ``meta``."""
    from safetensors.torch import save_file

    from medrobust.modelstore import _jsonable, _version

    doc: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "medrobust_version": _version(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "architecture": {"name": architecture, "args": dict(arch_args)},
        "weights": WEIGHTS_FILE,
        **dict(meta),
    }
    doc = _jsonable(doc, MODEL_JSON)
    with atomic_directory(directory, overwrite=overwrite) as tmp:
        state = {k: v.detach().cpu().clone().contiguous() for k, v in module.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT, "kind": kind})
        (tmp / MODEL_JSON).write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n", "utf-8")
    return Path(directory)


def read_kind_folder(
    directory: str | os.PathLike[str],
    kind: str,
    builders: Mapping[str, Callable[..., nn.Module]],
) -> tuple[nn.Module, dict[str, Any]]:
    """Build the registered architecture named in ``model.json`` and load its weights.

    Raises:
        ModelError: missing folder or files, malformed JSON, a folder of another kind (a
            classifier, a segmenter, a detector where a generator is expected), an architecture
            that is not one of ``builders``, weights that do not match.
    """
    d = Path(directory).expanduser()
    if not d.is_dir():
        raise ModelError(f"{d}: not a model folder (expected a folder with {MODEL_JSON})")
    jpath = d / MODEL_JSON
    if not jpath.is_file():
        raise ModelError(f"{jpath}: missing; {d} is not a saved medrobust model")
    try:
        doc = json.loads(jpath.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelError(f"{jpath}: not valid JSON ({err})") from err
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ModelError(f"{jpath}: not a medrobust model file")
    found = doc.get("kind") or ("segmenter" if doc.get("task") == "segmentation" else "classifier")
    if found != kind:
        raise ModelError(
            f"{d}: this folder holds a model of kind {found!r}; expected kind {kind!r}"
        )
    version = doc.get("format_version", FORMAT_VERSION)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ModelError(f"{jpath}: format_version {version!r} is newer than this medrobust reads")
    arch = doc.get("architecture")
    if not isinstance(arch, dict) or not isinstance(arch.get("args", {}), dict):
        raise ModelError(f"{jpath}: 'architecture' must be an object with 'name' and 'args'")
    name = arch.get("name")
    if not isinstance(name, str) or name not in builders:
        raise ModelError(
            f"{jpath}: unknown {kind} architecture {name!r}; known: {', '.join(sorted(builders))}"
        )
    try:
        module = builders[name](**arch.get("args", {}))
    except (TypeError, ValueError) as err:
        raise ModelError(f"{jpath}: cannot build {name!r} with {arch.get('args')}: {err}") from err
    wname = doc.get("weights", WEIGHTS_FILE)
    if not isinstance(wname, str) or Path(wname).name != wname:
        raise ModelError(f"{jpath}: 'weights' must be a file name inside {d}; got {wname!r}")
    wpath = d / wname
    if not wpath.is_file():
        raise ModelError(f"{wpath}: weights file missing")
    load_weights_into(module, read_weights(wpath), wpath)
    module.eval()
    return module, doc
