"""Small helpers of the evaluation pipeline: content hashes, plain-JSON values, signatures."""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
from typing import Any

import numpy as np
import torch
from torch import nn

from medrobust.data.streamed import ImageSource

__all__ = [
    "accepts",
    "file_sha256",
    "jsonable",
    "sha256_json",
    "state_dict_sha256",
    "tensor_sha256",
    "unit_seed",
]


def sha256_json(obj: Any) -> str:
    """sha256 of ``obj`` as canonical JSON (sorted keys, no spaces)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def unit_seed(seed: int, unit: str, eps_key: str, batch: int) -> int:
    """The attack seed of one unit of work: a hash of the run's seed, the attack, the budget and
    the batch index (so a resumed run draws exactly what an uninterrupted one drew)."""
    h = hashlib.sha256(f"{int(seed)}|{unit}|{eps_key}|{int(batch)}".encode()).digest()
    return int.from_bytes(h[:7], "little")


def state_dict_sha256(module: nn.Module) -> str:
    """sha256 over a module's state dict (names, dtypes, shapes and bytes, sorted by name)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        tt = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{tt.dtype}|{tuple(tt.shape)}|".encode())
        h.update(tt.reshape(-1).view(torch.uint8).numpy().tobytes() if tt.numel() else b"")
    return h.hexdigest()


def tensor_sha256(*tensors: torch.Tensor | ImageSource) -> str:
    """sha256 over tensors' dtypes, shapes and bytes (the content fingerprint of a data set),
    hashed chunk by chunk (no copy of the whole tensor). A streamed
    :class:`~medrobust.data.streamed.ImageSource` enters with its shape and
    :meth:`~medrobust.data.streamed.ImageSource.fingerprint` (its rows are not read)."""
    h = hashlib.sha256()
    for t in tensors:
        if isinstance(t, ImageSource):
            h.update(f"source|{t.dtype}|{tuple(t.shape)}|{t.fingerprint()}|".encode())
            continue
        tt = t.detach().to("cpu").contiguous()
        h.update(f"{tt.dtype}|{tuple(tt.shape)}|".encode())
        flat = tt.reshape(-1)
        step = max(1, (16 << 20) // max(1, tt.element_size()))
        for start in range(0, flat.numel(), step):
            h.update(flat[start:start + step].view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def file_sha256(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def jsonable(value: Any) -> Any:
    """Plain JSON values (tuples to lists, tensors and numpy to Python, nan/inf to None)."""
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return str(value)


def accepts(cls: type, name: str) -> bool:
    """Whether ``cls(...)`` takes a keyword argument ``name``."""
    try:
        params = inspect.signature(cls.__init__).parameters  # type: ignore[misc]
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
