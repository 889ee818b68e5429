"""Reading a checkpoint's small text and JSON files with a size limit and errors that name the file."""

from __future__ import annotations

import json
import os

MAX_CONFIG_BYTES = 16 << 20  # tokenizer_config.json may list many added tokens; the others are far smaller


def read_text(path: str, limit: int) -> str | None:
    """The UTF-8 text of `path` (None when absent); refuses files over `limit` bytes or not UTF-8."""
    if not os.path.isfile(path):
        return None
    size = os.path.getsize(path)
    if size > limit:
        raise ValueError(f"{path} is {size} bytes, more than the {limit} qvl reads for it")
    try:
        with open(path, "rb") as f:
            return f.read(limit + 1).decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e}") from None


def read_json_object(path: str, limit: int = MAX_CONFIG_BYTES) -> dict | None:
    """The JSON object in `path` (None when absent); refuses other JSON values and malformed text."""
    text = read_text(path, limit)
    if text is None:
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


__all__ = ["read_text", "read_json_object", "MAX_CONFIG_BYTES"]
