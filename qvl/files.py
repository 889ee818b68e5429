"""Writing files so that a reader, or a run stopped halfway, sees the old file or the new one, never half of one."""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

import torch


def write_json(path: str | os.PathLike, data: Any, *, indent: int = 2, sort_keys: bool = False) -> None:
    """Write `data` as JSON atomically: into a temporary file beside `path`, flushed to disk, then renamed over it.

    Values JSON cannot hold are written as text: non-finite floats as "nan"/"inf", dtypes and devices by name;
    tuples become lists. The parent folder is created if missing.
    """
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(json_safe(data), f, indent=indent, sort_keys=sort_keys, allow_nan=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def json_safe(x: Any) -> Any:
    """JSON-safe: non-finite floats as strings ("nan", "inf"), tuples as lists, dtypes and devices as text."""
    if isinstance(x, float):
        return x if x == x and x not in (float("inf"), float("-inf")) else str(x)
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, (torch.dtype, torch.device)):
        return str(x)
    return x
