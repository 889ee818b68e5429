"""Checks on a safetensors checkpoint's files before anything is read from them.

A safetensors file is an 8-byte little-endian header length N, N bytes of UTF-8 JSON mapping each tensor name to
``{"dtype", "shape", "data_offsets": [start, end]}`` (offsets into the data after the header; an optional
``__metadata__`` maps strings to strings), then the data, which the tensors cover exactly, without gaps or overlaps.
`read_header` checks all of that from the header alone (nothing sized from it is allocated first), so a truncated,
empty, hostile or mistaken file (a Git LFS pointer) is refused with one line naming the file and the problem, in
`CheckpointError`. `checkpoint_file` keeps every file a checkpoint names inside its folder; `read_index` checks a
sharded checkpoint's ``model.safetensors.index.json``; `open_safetensors` turns safetensors' own errors into
`CheckpointError` too.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from .errors import CheckpointError
from .files import lfs_pointer_problem, read_json, regular_file_size

# safetensors' own limit on the JSON header (MAX_HEADER_SIZE in its Rust source).
MAX_HEADER_BYTES = 100_000_000
# Bits per element of every dtype safetensors knows.
DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8,
              "F8_E5M2FNUZ": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
              "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64, "C64": 64}
# The dtypes a weight may have: qvl converts each into the model's float dtype as it copies it.
FLOAT_WEIGHT_DTYPES = ("F16", "BF16", "F32", "F64")


@dataclass(frozen=True)
class TensorHeader:
    """One tensor's entry in a safetensors header: dtype name, shape, byte range within the data section."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of a float's range")
    return value


def _count(n: int) -> str:
    return f"{n} byte" + ("" if n == 1 else "s")


def _show(value: object, limit: int = 200) -> str:
    """repr() cut to `limit` characters: a header's names and values can be any size, and messages stay one line."""
    text = repr(value) if not isinstance(value, int) or value.bit_length() < 256 else f"a {value.bit_length()}-bit int"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def printable(name: str) -> str:
    """A tensor or file name as messages show it: as it is when printable, else its repr() (a newline in a name
    must not break a one-line message)."""
    return name if name.isprintable() and len(name) <= 200 else _show(name)


def read_header(path: str) -> dict[str, TensorHeader]:
    """The tensors of the safetensors file `path`, from its header, after checking the header against the file;
    `CheckpointError` naming the file and the problem otherwise. Reads only the header."""
    size = regular_file_size(path, CheckpointError)
    if size == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes), not safetensors weights: a download or copy that "
                              "did not finish?")
    try:
        with open(path, "rb") as f:
            head = f.read(min(size, 512))
            if (lfs := lfs_pointer_problem(head)) is not None:
                raise CheckpointError(f"{path}: {lfs}")
            if size < 8:
                raise CheckpointError(f"{path}: truncated: {_count(size)}, fewer than the 8-byte header length "
                                      "that starts a safetensors file")
            (n,) = struct.unpack("<Q", head[:8])
            if n > size - 8:
                raise CheckpointError(f"{path}: header says {_count(n)} but the file has {size - 8} after its "
                                      "8-byte length (truncated, or not a safetensors file)")
            if n > MAX_HEADER_BYTES:
                raise CheckpointError(f"{path}: header of {_count(n)} is over safetensors' limit of "
                                      f"{MAX_HEADER_BYTES}")
            f.seek(8)
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it: {e.strerror or e}") from None
    if len(raw) != n:
        raise CheckpointError(f"{path}: header says {_count(n)} but only {len(raw)} could be read")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: header is not UTF-8 (byte 0x{raw[e.start]:02x} at offset "
                              f"{8 + e.start})") from None
    try:
        header = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant,
                            parse_float=_finite_float)
        # JSON escapes can spell lone UTF-16 surrogates, which are no Unicode text (and safetensors refuses them).
        json.dumps(header, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise CheckpointError(f"{path}: header holds a string that is not Unicode text (a lone surrogate escape)"
                              ) from None
    except _DuplicateKey as e:
        raise CheckpointError(f"{path}: header has the key {_show(str(e))} twice") from None
    except RecursionError:
        raise CheckpointError(f"{path}: header is not usable JSON: nested too deeply") from None
    except ValueError as e:
        raise CheckpointError(f"{path}: header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object but {type(header).__name__}")
    return _tensors(path, header, size - 8 - n)


def _tensors(path: str, header: dict, data_bytes: int) -> dict[str, TensorHeader]:
    """Check every entry of a parsed header against the `data_bytes` of data after it."""
    meta = header.get("__metadata__")
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise CheckpointError(f"{path}: header's __metadata__ must map strings to strings")
    tensors = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        where = f"{path}: tensor {_show(key)}"
        if not isinstance(entry, dict):
            raise CheckpointError(f"{where}: its header entry is {type(entry).__name__}, not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not (isinstance(dtype, str) and dtype in DTYPE_BITS):
            raise CheckpointError(f"{where}: unknown dtype {_show(dtype)} (safetensors has {', '.join(DTYPE_BITS)})")
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise CheckpointError(f"{where}: shape {_show(shape)} is not a list of non-negative integers")
        if any(d >= 2**63 for d in shape) or math.prod(d for d in shape if d) >= 2**63:
            raise CheckpointError(f"{where}: shape {_show(shape)} is larger than any tensor can be (2**63 elements)")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int and o >= 0 for o in offsets)
                and offsets[0] <= offsets[1]):
            raise CheckpointError(f"{where}: data_offsets {_show(offsets)} are not [start, end] with 0 <= start <= end")
        start, end = offsets
        if end > data_bytes:
            raise CheckpointError(f"{where}: data_offsets [{start}, {end}] reach past the {_count(data_bytes)} "
                                  "of data in the file (truncated?)")
        bits = math.prod(shape) * DTYPE_BITS[dtype]
        if bits % 8 or bits // 8 != end - start:
            need = f"{_show(bits // 8)} bytes" if bits % 8 == 0 else f"{_show(bits)} bits, not whole bytes,"
            raise CheckpointError(f"{where}: {dtype} {_show(shape)} needs {need} but its data_offsets "
                                  f"[{start}, {end}] hold {end - start}")
        tensors[key] = TensorHeader(dtype, tuple(shape), start, end)
    # The data is covered exactly, in order: each tensor starts where the one before it ends.
    covered, last = 0, None
    for key, t in sorted(tensors.items(), key=lambda kv: (kv[1].start, kv[1].end)):
        if t.start < covered:
            raise CheckpointError(f"{path}: tensor {_show(key)} at bytes [{t.start}, {t.end}] overlaps tensor "
                                  f"{_show(last)}")
        if t.start > covered:
            raise CheckpointError(f"{path}: {_count(t.start - covered)} of data before tensor {_show(key)} belong "
                                  "to no tensor")
        covered, last = t.end, key
    if covered != data_bytes:
        raise CheckpointError(f"{path}: the last {_count(data_bytes - covered)} of data belong to no tensor")
    return tensors


def weight_dtype_problem(t: TensorHeader) -> str | None:
    """Why a tensor cannot fill a float parameter (its dtype is not a float one), or None."""
    if t.dtype in FLOAT_WEIGHT_DTYPES:
        return None
    return f"{t.dtype}, not a float dtype ({', '.join(FLOAT_WEIGHT_DTYPES)})"


@contextlib.contextmanager
def open_safetensors(path: str, device: str = "cpu") -> Iterator:
    """safetensors' `safe_open` on `path` (torch tensors on `device`), with its errors and read errors turned into
    `CheckpointError` naming the file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt", device=device) as f:
            yield f
    except SafetensorError as e:
        raise CheckpointError(f"{path}: safetensors cannot read it: {e}") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it: {e.strerror or e}") from None


# --- the checkpoint folder ---------------------------------------------------------------------------------------


def _allowed_roots(directory: str) -> list[str]:
    """Where a checkpoint's files may really lie: its folder, and for a huggingface_hub cache snapshot
    (``<repo>/snapshots/<revision>/``, whose files are symlinks to ``<repo>/blobs/<hash>``) that repo's blobs."""
    real = os.path.realpath(directory)
    roots = [real]
    parent = os.path.dirname(real)
    if os.path.basename(parent) == "snapshots":
        roots.append(os.path.join(os.path.dirname(parent), "blobs"))
    return roots


def checkpoint_file(directory: str, name: str, source: str) -> str:
    """The path of file `name` in the checkpoint folder `directory`, as named by `source` (for messages);
    `CheckpointError` for a name that leaves the folder (an absolute path, ``..``, a symlink out) or holds a control
    character (a NUL ends the path early; a newline would break the one-line message). Nothing is opened."""
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise CheckpointError(f"{source}: file name {_show(name)} contains a control character")
    if name == "" or os.path.isabs(name):
        raise CheckpointError(f"{source}: {_show(name)} is not a file name inside the checkpoint folder")
    parts = os.path.normpath(name).split(os.sep)
    if parts[0] == os.pardir:
        raise CheckpointError(f"{source}: {_show(name)} leaves the checkpoint folder")
    path = os.path.join(directory, name)
    real = os.path.realpath(path)
    if not any(os.path.commonpath([real, root]) == root for root in _allowed_roots(directory)):
        raise CheckpointError(f"{source}: {_show(name)} leads outside the checkpoint folder (to {_show(real)})")
    return path


def read_index(directory: str, index_name: str) -> dict[str, str]:
    """Tensor name -> file name from the folder's shard index (``weight_map``), checked: a JSON object whose
    weight_map maps names to file names inside the folder."""
    path = checkpoint_file(directory, index_name, source=os.path.join(directory, index_name))
    index = read_json(path, error=CheckpointError)
    if not isinstance(index, dict):
        raise CheckpointError(f"{path}: not a JSON object but {type(index).__name__}")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        found = "empty" if weight_map == {} else "missing" if weight_map is None else type(weight_map).__name__
        raise CheckpointError(f"{path}: has no weight_map (an object of tensor name -> shard file): {found}")
    first_key: dict[str, str] = {}  # file name -> the first tensor mapped to it, to name in messages
    for key, fn in weight_map.items():
        if not isinstance(fn, str):
            raise CheckpointError(f"{path}: weight_map[{_show(key)}] is {_show(fn)}, not a file name")
        first_key.setdefault(fn, key)
    for fn, key in first_key.items():
        checkpoint_file(directory, fn, source=f"{path}: weight_map[{_show(key)}]")
    return weight_map


__all__ = ["TensorHeader", "read_header", "printable", "weight_dtype_problem", "open_safetensors", "checkpoint_file",
           "read_index", "DTYPE_BITS", "FLOAT_WEIGHT_DTYPES", "MAX_HEADER_BYTES"]
