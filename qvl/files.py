"""Reading and writing the files qvl is handed or writes.

Writing: a reader, or a run stopped halfway, sees the old file or the new one, never half of one.
Reading: a file that is not what it should be (a directory, a FIFO, a Git LFS pointer, not UTF-8, not JSON) is
refused with one line naming the file and the problem, in the error class the caller names.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from typing import Any

import torch

from .errors import QvlError

# A Git LFS pointer file, left where the real file should be by a clone without `git lfs`, starts with this line.
LFS_POINTER = b"version https://git-lfs.github.com/spec/"
# The largest JSON file read: the same cap safetensors puts on its JSON header; the JSON files of a checkpoint
# (config, index, tokenizer) and qvl's results are far smaller.
MAX_JSON_BYTES = 100_000_000


@contextlib.contextmanager
def replacing(path: str | os.PathLike, binary: bool = False):
    """A file to write `path`'s new content to: written beside it, flushed to disk and renamed over it once
    complete, so a reader (or a run killed midway) sees the old file or the new one. If writing fails (a full
    disk) the partial file is removed and the old one stays; the OSError then says which file."""
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise reworded(e, f"cannot write {path}: {e.strerror or e}") from e
        raise


def reworded(e: OSError, message: str) -> OSError:
    """`e` again, same class and errno (so callers and the CLI's exit status see the same failure), with a
    message that says which file and why."""
    return type(e)(e.errno, message)


def write_json(path: str | os.PathLike, data: Any, *, indent: int = 2, sort_keys: bool = False) -> None:
    """Write `data` as JSON atomically (`replacing`). Values JSON cannot hold are written as text: non-finite
    floats as "nan"/"inf", dtypes and devices by name; tuples become lists. The parent folder is created if
    missing."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with replacing(path) as f:
        json.dump(json_safe(data), f, indent=indent, sort_keys=sort_keys, allow_nan=False)
        f.write("\n")


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


def lfs_pointer_problem(head: bytes) -> str | None:
    """If `head` (a file's first bytes) is a Git LFS pointer: what to tell the user, with the size it stands for."""
    if not head.startswith(LFS_POINTER):
        return None
    size = next((line[5:].strip() for line in head.decode("ascii", "replace").splitlines()
                 if line.startswith("size ")), None)
    stands_for = f" for {size} bytes" if size and size.isdigit() else ""
    return (f"a Git LFS pointer file{stands_for}, not the file itself: run `git lfs pull` in the repository it "
            "came from (or download it again with LFS)")


def regular_file_size(path: str, error: type[QvlError] = QvlError) -> int:
    """The size of `path` (symlinks followed); `error` when it is missing, a directory, or not a regular file
    (a FIFO or device would block or never end)."""
    if not path:
        raise error("'': an empty path names no file")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise error(f"{path}: no such file") from None
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the path
        raise error(f"{path}: cannot read it: {getattr(e, 'strerror', None) or e}") from None
    if stat.S_ISDIR(st.st_mode):
        raise error(f"{path}: is a directory, not a file")
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{path}: is not a regular file (a FIFO, socket or device)")
    return st.st_size


def read_text(path: str | os.PathLike, *, error: type[QvlError] = QvlError, max_bytes: int = MAX_JSON_BYTES) -> str:
    """A UTF-8 text file; `error` with the file and the problem (missing, a directory or FIFO, a Git LFS pointer,
    over `max_bytes`, not UTF-8)."""
    path = os.fspath(path)
    size = regular_file_size(path, error)
    if size > max_bytes:
        raise error(f"{path}: {size} bytes, over the {max_bytes} qvl reads for it")
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise error(f"{path}: cannot read it: {e.strerror or e}") from None
    if (lfs := lfs_pointer_problem(data)) is not None:
        raise error(f"{path}: {lfs}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start})") from None


def read_json(path: str | os.PathLike, *, error: type[QvlError] = QvlError, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """Parse a UTF-8 JSON file; `error` with the file and the problem (as `read_text`, or not JSON, or nested
    too deeply)."""
    text = read_text(path, error=error, max_bytes=max_bytes)
    if not text.strip():
        raise error(f"{os.fspath(path)}: empty, not JSON")
    try:
        return json.loads(text)
    except RecursionError:
        raise error(f"{os.fspath(path)}: not usable JSON: nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, and integers too long to convert
        raise error(f"{os.fspath(path)}: not JSON: {e}") from None
