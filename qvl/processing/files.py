"""A checkpoint's optional small text and JSON files (templates, processor and generation configs): None when
absent, else read with qvl.files' checks, as CheckpointError naming the file."""

from __future__ import annotations

import os

from ..errors import CheckpointError
from ..files import read_json
from ..files import read_text as read_checked_text

MAX_CONFIG_BYTES = 16 << 20  # tokenizer_config.json may list many added tokens; the others are far smaller


def read_text(path: str, limit: int) -> str | None:
    """The UTF-8 text of `path`, None when absent; refuses a directory, a FIFO, an LFS pointer, files over
    `limit` bytes and text that is not UTF-8."""
    if not os.path.lexists(path):
        return None
    return read_checked_text(path, error=CheckpointError, max_bytes=limit)


def read_json_object(path: str, limit: int = MAX_CONFIG_BYTES) -> dict | None:
    """The JSON object in `path`, None when absent; refuses other JSON values as well as what `read_text` does."""
    if not os.path.lexists(path):
        return None
    data = read_json(path, error=CheckpointError, max_bytes=limit)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: must hold a JSON object, got {type(data).__name__}")
    return data


__all__ = ["read_text", "read_json_object", "MAX_CONFIG_BYTES"]
