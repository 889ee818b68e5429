"""Hostile checkpoint folders: every bad file is refused with `CheckpointError`, one line naming the file and the
problem, before the model is allocated; NaN or inf weights are refused with the tensor, file and count.

Each test writes the bad files for real into tmp_path, from a `tiny` checkpoint saved by qvl.
"""

from __future__ import annotations

import builtins
import json
import math
import os
import shutil
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import qvl
import qvl.checkpoint as ckpt
from qvl.errors import CheckpointError, ConfigError
from qvl.safetensors_check import DTYPE_BITS, MAX_HEADER_BYTES, open_safetensors, read_header

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
LFS_POINTER = (b"version https://git-lfs.github.com/spec/v1\n"
               b"oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\nsize 986400\n")


# --- helpers -----------------------------------------------------------------------------------------------------


def _st(header, data: bytes = b"", length: int | None = None) -> bytes:
    """A safetensors file: 8-byte length (the header's own unless given), header (a dict or raw bytes), data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def _split(blob: bytes) -> tuple[dict, bytes]:
    """A safetensors file's header (parsed) and data."""
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def _edited(blob: bytes, edit) -> bytes:
    """The file with its header passed through `edit(header) -> header` (the data kept as it is)."""
    header, data = _split(blob)
    return _st(edit(header), data)


def _set(key: str, **fields):
    """An edit setting fields of one tensor's header entry."""
    def edit(header):
        header[key] = {**header[key], **fields}
        return header
    return edit


def _rewrite(path, fn):
    """Apply fn(dict[str, Tensor]) -> dict to the tensors of a safetensors file, in place."""
    save_file(fn(load_file(path)), path, metadata={"format": "pt"})


def _refused(directory, *patterns, **kwargs) -> str:
    """from_pretrained's CheckpointError message for `directory`: one line holding every pattern."""
    with pytest.raises(CheckpointError) as info:
        qvl.from_pretrained(directory, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg, msg
    for pattern in patterns:
        assert pattern in msg, (pattern, msg)
    return msg


def _copy_folder(src, dst):
    shutil.copytree(src, dst, symlinks=True)
    return dst


def _params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in model.named_parameters()}


def _assert_same_params(a, b):
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys()
    for name in pa:
        assert torch.equal(pa[name], pb[name].to(pa[name].dtype)), name


# --- fixtures ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    return qvl.from_config("tiny", seed=3)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, model):
    """A float32 single-file tiny checkpoint. Tests must not modify it."""
    d = tmp_path_factory.mktemp("saved")
    qvl.save_pretrained(model, d)
    return d


@pytest.fixture(scope="module")
def saved_sharded(tmp_path_factory, model):
    d = tmp_path_factory.mktemp("sharded")
    qvl.save_pretrained(model, d, max_shard_bytes=256 * 1024)
    return d


@pytest.fixture
def folder(tmp_path, saved):
    """A private copy of `saved` that a test may damage."""
    return _copy_folder(saved, tmp_path / "ckpt")


@pytest.fixture
def sharded(tmp_path, saved_sharded):
    """A private copy of the sharded checkpoint: (folder, its index as a dict, the shard file names)."""
    d = _copy_folder(saved_sharded, tmp_path / "ckpt")
    index = json.loads((d / INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3
    return d, index, shards


@pytest.fixture(scope="module")
def valid_blob(saved) -> bytes:
    return (saved / WEIGHTS).read_bytes()


@pytest.fixture
def no_allocation(monkeypatch):
    """Fails the test if from_pretrained allocates the model: the refusal must come first."""
    def allocate(*args, **kwargs):
        raise AssertionError("the model was allocated before the checkpoint was refused")

    monkeypatch.setattr(ckpt, "_allocate", allocate)


@pytest.fixture
def opened(monkeypatch) -> list[str]:
    """The real paths of every file Python opens during the test."""
    paths, real_open = [], builtins.open

    def recording_open(file, *args, **kwargs):
        if isinstance(file, (str, bytes, os.PathLike)):
            paths.append(os.path.realpath(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", recording_open)
    return paths


# --- one bad model.safetensors: refused from its header, before allocating ---------------------------------------

N_VALID = 7832  # the tiny checkpoint's header length (checked in test_header_cases_start_from_the_real_file)
DATA_VALID = 986400 - 8 - N_VALID
NORM = "model.norm.weight"  # F32 [64] at data bytes [559104, 559360] of the tiny checkpoint


def _two_f32(a=(0, 8), b=(8, 16), data=16, **extra) -> bytes:
    return _st({"a": {"dtype": "F32", "shape": [2], "data_offsets": list(a)},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": list(b)}, **extra}, b"\0" * data)


# (id, the bad file built from the valid one, words its message must hold)
HEADER_CASES = [
    ("zero bytes", lambda v: b"", ["empty file (0 bytes)"]),
    ("five bytes", lambda v: v[:5], ["truncated: 5 bytes, fewer than the 8-byte header length"]),
    ("cut inside the header", lambda v: v[:8 + 1000],
     [f"header says {N_VALID} bytes but the file has 1000 after its 8-byte length"]),
    ("cut inside the data", lambda v: v[:-1000], ["of data in the file (truncated?)", f"{DATA_VALID - 1000} bytes"]),
    ("one byte short", lambda v: v[:-1], ["reach past the", "(truncated?)"]),
    ("trailing bytes", lambda v: v + b"\0" * 16, ["the last 16 bytes of data belong to no tensor"]),
    ("git lfs pointer", lambda v: LFS_POINTER,
     ["a Git LFS pointer file for 986400 bytes, not the file itself", "`git lfs pull`"]),
    ("length larger than the file", lambda v: _st(b"{}", b"\0" * 90, length=4096),
     ["header says 4096 bytes but the file has 92 after its 8-byte length"]),
    ("length 2**63", lambda v: _st(b"{}", length=2**63),
     ["header says 9223372036854775808 bytes but the file has 2 after its 8-byte length"]),
    ("length 2**64-1", lambda v: struct.pack("<Q", 2**64 - 1) + v[8:],
     [f"header says {2**64 - 1} bytes but the file has {986400 - 8}"]),
    ("length 0", lambda v: struct.pack("<Q", 0) + v[8:], ["header is not JSON"]),
    ("header not JSON", lambda v: _st(b"{not json"), ["header is not JSON"]),
    ("header not UTF-8", lambda v: _st(b'{"\xff\xfe": {}}'), ["header is not UTF-8 (byte 0xff at offset 10)"]),
    ("lone surrogate", lambda v: _st(b'{"\\ud800": {}}'), ["not Unicode text (a lone surrogate escape)"]),
    ("header a list", lambda v: _st(b"[1, 2]"), ["header is not a JSON object but list"]),
    ("header a string", lambda v: _st(b'"weights"'), ["header is not a JSON object but str"]),
    ("header null", lambda v: _st(b"null"), ["header is not a JSON object but NoneType"]),
    ("nested too deeply", lambda v: _st(b"[" * 100_000), ["nested too deeply"]),
    ("NaN in header", lambda v: _st(b'{"a": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 0]}}'),
     ["header is not JSON: NaN is not JSON"]),
    ("float overflow", lambda v: _st(b'{"__metadata__": {}, "a": {"x": 1e999}}'), ["out of a float's range"]),
    ("tensor twice", lambda v: _st(b'{"a": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}, '
                                   b'"a": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}'),
     ["header has the key 'a' twice"]),
    ("metadata not strings", lambda v: _edited(v, lambda h: {**h, "__metadata__": {"format": 1}}),
     ["__metadata__ must map strings to strings"]),
    ("entry a list", lambda v: _edited(v, lambda h: {**h, NORM: [0, 256]}),
     [f"tensor '{NORM}': its header entry is list, not an object"]),
    ("unknown dtype", lambda v: _edited(v, _set(NORM, dtype="Q4_K")), [f"tensor '{NORM}': unknown dtype 'Q4_K'"]),
    ("lower-case dtype", lambda v: _edited(v, _set(NORM, dtype="f32")), ["unknown dtype 'f32'"]),
    ("dtype missing", lambda v: _edited(v, lambda h: {**h, NORM: {"shape": [64], "data_offsets": [0, 256]}}),
     ["unknown dtype None"]),
    ("negative dim", lambda v: _edited(v, _set(NORM, shape=[-64])), ["shape [-64] is not a list of non-negative"]),
    ("float dim", lambda v: _edited(v, _set(NORM, shape=[64.0])), ["shape [64.0] is not a list"]),
    ("boolean dim", lambda v: _edited(v, _set(NORM, shape=[True, 64])), ["shape [True, 64] is not a list"]),
    ("shape a number", lambda v: _edited(v, _set(NORM, shape=64)), ["shape 64 is not a list"]),
    ("huge dim, no elements", lambda v: _st({"a": {"dtype": "F32", "shape": [2**70, 0], "data_offsets": [0, 0]}}),
     ["is larger than any tensor can be"]),
    ("offsets reversed", lambda v: _edited(v, _set(NORM, data_offsets=[559360, 559104])),
     ["data_offsets [559360, 559104] are not [start, end] with 0 <= start <= end"]),
    ("one offset", lambda v: _edited(v, _set(NORM, data_offsets=[559104])), ["data_offsets [559104] are not"]),
    ("offsets as text", lambda v: _edited(v, _set(NORM, data_offsets=["0", "256"])), ["data_offsets ['0', '256']"]),
    ("negative offset", lambda v: _edited(v, _set(NORM, data_offsets=[-256, 0])), ["data_offsets [-256, 0]"]),
    ("offsets outside the file", lambda v: _edited(v, _set(NORM, data_offsets=[DATA_VALID, DATA_VALID + 256])),
     [f"tensor '{NORM}': data_offsets [{DATA_VALID}, {DATA_VALID + 256}] reach past the {DATA_VALID} bytes"]),
    ("offsets far outside", lambda v: _edited(v, _set(NORM, data_offsets=[0, 2**64 + 5])), ["reach past the"]),
    ("size not shape x dtype", lambda v: _edited(v, _set(NORM, shape=[32])),
     [f"tensor '{NORM}': F32 [32] needs 128 bytes but its data_offsets [559104, 559360] hold 256"]),
    ("dtype size not the data", lambda v: _edited(v, _set(NORM, dtype="F64")), ["F64 [64] needs 512 bytes"]),
    ("overlapping tensors", lambda v: _two_f32(b=(4, 12)), ["tensor 'b' at bytes [4, 12] overlaps tensor 'a'"]),
    ("same bytes twice", lambda v: _two_f32(b=(0, 8), data=8), ["overlaps tensor"]),
    ("gap between tensors", lambda v: _two_f32(b=(12, 20), data=20),
     ["4 bytes of data before tensor 'b' belong to no tensor"]),
    ("sub-byte dtype, odd count", lambda v: _st({"a": {"dtype": "F4", "shape": [3], "data_offsets": [0, 1]}}, b"\0"),
     ["F4 [3] needs 12 bits, not whole bytes, but its data_offsets [0, 1] hold 1"]),
]


def test_header_cases_start_from_the_real_file(valid_blob):
    header, data = _split(valid_blob)
    assert len(valid_blob) - 8 - len(data) == N_VALID and len(data) == DATA_VALID
    assert header[NORM] == {"dtype": "F32", "shape": [64], "data_offsets": [559104, 559360]}


@pytest.mark.parametrize("build, words", [c[1:] for c in HEADER_CASES], ids=[c[0] for c in HEADER_CASES])
def test_bad_weights_file_is_refused_before_allocating(folder, valid_blob, no_allocation, build, words):
    (folder / WEIGHTS).write_bytes(build(valid_blob))
    _refused(folder, f"{folder / WEIGHTS}: ", *words)


@pytest.mark.parametrize("build, words", [c[1:] for c in HEADER_CASES], ids=[c[0] for c in HEADER_CASES])
def test_header_check_agrees_with_safetensors(tmp_path, valid_blob, build, words):
    """safetensors refuses each of these files too (qvl's check refuses nothing safetensors reads, except where it is
    stricter on purpose), and its own error, met through open_safetensors, is a CheckpointError naming the file."""
    path = tmp_path / "bad.safetensors"
    path.write_bytes(build(valid_blob))
    with pytest.raises(CheckpointError):
        read_header(str(path))
    # safetensors keeps the last of two equal keys, and reads an empty tensor with a 2**70 dimension
    stricter = {"header has the key 'a' twice", "is larger than any tensor can be"}
    if stricter & set(words):
        return
    with pytest.raises(CheckpointError, match=r"bad\.safetensors: safetensors cannot read it: "):
        with open_safetensors(str(path)) as f:
            for key in f.keys():
                f.get_slice(key)


def test_header_over_safetensors_limit_is_refused(folder, no_allocation):
    """A header just over safetensors' 100 MB cap in a file that really is that large (sparse on disk)."""
    path = folder / WEIGHTS
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", MAX_HEADER_BYTES + 1))
        f.truncate(8 + MAX_HEADER_BYTES + 64)
    _refused(folder, f"{path}: header of {MAX_HEADER_BYTES + 1} bytes is over safetensors' limit of "
                     f"{MAX_HEADER_BYTES}")


def test_safetensors_own_errors_become_checkpoint_errors(tmp_path):
    """safetensors' error type (its public SafetensorError), met past qvl's own check, names the file."""
    path = tmp_path / "huge.safetensors"
    path.write_bytes(_st(b"{}", length=2**63))
    with pytest.raises(CheckpointError, match=r"huge\.safetensors: safetensors cannot read it: .*header too large"):
        with open_safetensors(str(path)):
            pass


def test_file_changed_after_its_check_is_still_a_checkpoint_error(folder, monkeypatch):
    """A weights file truncated between the header check and the copy (another process writing the folder):
    safetensors' error while loading comes out as CheckpointError naming the file."""
    real_allocate = ckpt._allocate

    def allocate_then_truncate(*args):
        model = real_allocate(*args)
        blob = (folder / WEIGHTS).read_bytes()
        (folder / WEIGHTS).write_bytes(blob[: len(blob) // 2])
        return model

    monkeypatch.setattr(ckpt, "_allocate", allocate_then_truncate)
    _refused(folder, f"{folder / WEIGHTS}: safetensors cannot read it: ")


def test_empty_header_means_every_key_missing(folder, no_allocation):
    (folder / WEIGHTS).write_bytes(_st({"__metadata__": {"format": "pt"}}))
    _refused(folder, "does not match the model built from its config.json: missing keys (80): ")


def test_tensor_names_that_would_break_the_line(folder, no_allocation):
    """Names are any JSON string: one holding a newline is shown escaped, and the message stays one line."""
    _rewrite(folder / WEIGHTS, lambda t: {**t, "evil\nname": torch.zeros(1), "zero\x00width": torch.zeros(1)})
    _refused(folder, "unexpected keys (2): 'evil\\nname', 'zero\\x00width'")


def test_index_tensor_names_that_would_break_the_line(sharded, no_allocation):
    d, index, shards = sharded
    index["weight_map"]["ghost\r\nweight"] = shards[0]
    (d / INDEX).write_text(json.dumps(index))
    _refused(d, f"places 1 tensors in {shards[0]}, which does not hold them: 'ghost\\r\\nweight'")


# --- tensor dtypes: integer and other non-float weights ----------------------------------------------------------


@pytest.mark.parametrize("dtype, name", [(torch.int64, "I64"), (torch.int32, "I32"), (torch.uint8, "U8"),
                                         (torch.bool, "BOOL"), (torch.int8, "I8"), (torch.float8_e4m3fn, "F8_E4M3"),
                                         (torch.complex64, "C64")])
def test_non_float_weight_is_refused_with_its_dtype(folder, no_allocation, dtype, name):
    key = "model.layers.1.self_attn.k_proj.weight"
    _rewrite(folder / WEIGHTS, lambda t: {**t, key: torch.ones(t[key].shape).to(dtype)})
    _refused(folder, "tensors that are not float weights (1): ",
             f"{key} in model.safetensors is {name}, not a float dtype (F16, BF16, F32, F64)")


def test_float64_weights_load_converted(folder, model):
    _rewrite(folder / WEIGHTS, lambda t: {k: v.double() for k, v in t.items()})
    loaded = qvl.from_pretrained(folder, dtype=torch.float32)
    _assert_same_params(model, loaded)


# --- NaN and inf in weights --------------------------------------------------------------------------------------


def _poison(key, *values):
    def edit(tensors):
        flat = tensors[key].view(-1)
        for i, v in enumerate(values):
            flat[7 * i + 3] = v
        return tensors
    return edit


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_and_inf_weights_are_refused_by_name(tmp_path, dtype):
    qvl.save_pretrained(qvl.from_config("tiny", dtype=dtype), tmp_path)
    key = "model.layers.0.mlp.down_proj.weight"
    _rewrite(tmp_path / WEIGHTS, _poison(key, float("nan"), float("inf"), float("-inf")))
    numel = load_file(tmp_path / WEIGHTS)[key].numel()
    _refused(tmp_path, f"checkpoint {str(tmp_path)!r} has non-finite weights (1 tensors): ",
             f"model.safetensors: {key} has 1 NaN and 2 infinite values (of {numel})")


def test_every_non_finite_tensor_is_listed_across_shards(sharded):
    d, index, _ = sharded
    bad = ["model.embed_tokens.weight", "visual.blocks.3.mlp.up_proj.bias", "model.norm.weight"]
    for key in bad:
        _rewrite(d / index["weight_map"][key], _poison(key, float("nan")))
    msg = _refused(d, "has non-finite weights (3 tensors): ")
    for key in bad:
        assert f"{index['weight_map'][key]}: {key} has 1 NaN values" in msg


def test_weights_beyond_the_target_dtype_are_refused(folder):
    """Finite float32 weights that overflow float16 on conversion would be inf in the model."""
    key = "visual.merger.mlp.0.weight"
    _rewrite(folder / WEIGHTS, _poison(key, 1e6, -7e4))
    _refused(folder, f"model.safetensors: {key} has 2 values beyond float16's range (infinite once converted "
                     "from float32)", dtype=torch.float16)
    assert qvl.from_pretrained(folder, dtype=torch.bfloat16).dtype == torch.bfloat16  # bfloat16 holds them


def test_finite_check_is_exact():
    """_finite on every dtype the model loads in, with one bad value anywhere (vectorized tails included)."""
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for n in (1, 15, 16, 17, 1023, 4099):
            for value in (float("nan"), float("inf"), float("-inf")):
                t = torch.randn(n).to(dtype)
                assert ckpt._finite(t)
                for i in {0, n // 2, n - 1}:
                    u = t.clone()
                    u[i] = value
                    assert not ckpt._finite(u), (dtype, n, i, value)
    assert ckpt._finite(torch.empty(0)) and ckpt._finite(torch.tensor(1.0))
    assert not ckpt._finite(torch.tensor(float("nan")))


# --- the folder and its index ------------------------------------------------------------------------------------


def test_missing_folder(tmp_path):
    _refused(tmp_path / "nope", "does not exist: no config.json or weights to read")


def test_checkpoint_path_that_is_a_file(folder, no_allocation):
    _refused(folder / WEIGHTS, f"{str(folder / WEIGHTS)!r} is a file, not a checkpoint folder")
    _refused(folder / "config.json", "is a file, not a checkpoint folder")


def test_weights_file_that_is_a_directory(folder, no_allocation):
    (folder / WEIGHTS).unlink()
    (folder / WEIGHTS).mkdir()
    _refused(folder, f"{folder / WEIGHTS}: is a directory, not a file")


def test_weights_file_that_is_a_fifo(folder, no_allocation):
    """A FIFO would block the reader forever: refused from its type, never opened."""
    (folder / WEIGHTS).unlink()
    os.mkfifo(folder / WEIGHTS)
    _refused(folder, f"{folder / WEIGHTS}: is not a regular file")


def test_index_that_is_a_directory(sharded, no_allocation):
    d, _, _ = sharded
    (d / INDEX).unlink()
    (d / INDEX).mkdir()
    _refused(d, f"{d / INDEX}: is a directory, not a file")


def test_shard_that_is_a_directory(sharded, no_allocation):
    d, _, shards = sharded
    (d / shards[1]).unlink()
    (d / shards[1]).mkdir()
    _refused(d, f"{d / shards[1]}: is a directory, not a file")


@pytest.mark.parametrize("content, words", [
    (b'{"weight_map": {"a": "\xff.safetensors"}}', ["not UTF-8 (byte 0xff at offset 22)"]),
    (b'{"weight_map": ', ["not JSON: Expecting value"]),
    (b"[" * 100_000, ["not usable JSON: nested too deeply"]),
    (b'["model-00001-of-00002.safetensors"]', ["not a JSON object but list"]),
    (b"null", ["not a JSON object but NoneType"]),
    (b'{"metadata": {}}', ["has no weight_map", ": missing"]),
    (b'{"weight_map": {}}', ["has no weight_map", ": empty"]),
    (b'{"weight_map": ["model-00001-of-00002.safetensors"]}', ["has no weight_map", ": list"]),
    (b'{"weight_map": {"model.norm.weight": 3}}', ["weight_map['model.norm.weight'] is 3, not a file name"]),
    (b'{"weight_map": {"model.norm.weight": null}}', ["weight_map['model.norm.weight'] is None, not a file name"]),
    (b'{"weight_map": {"model.norm.weight": ["a", "b"]}}', ["is ['a', 'b'], not a file name"]),
    (LFS_POINTER, ["a Git LFS pointer file for 986400 bytes", "`git lfs pull`"]),
], ids=["not utf-8", "not json", "too deep", "list", "null", "no weight_map", "empty weight_map",
        "weight_map list", "file name a number", "file name null", "file name a list", "lfs pointer"])
def test_bad_index_is_refused(sharded, no_allocation, content, words):
    d, _, _ = sharded
    (d / INDEX).write_bytes(content)
    _refused(d, f"{d / INDEX}: ", *words)


def _index_entry(d, index, name):
    """Point every tensor of the first shard at `name` instead."""
    first = sorted(set(index["weight_map"].values()))[0]
    index["weight_map"] = {k: (name if v == first else v) for k, v in index["weight_map"].items()}
    (d / INDEX).write_text(json.dumps(index))


@pytest.mark.parametrize("where", ["parent", "absolute", "up through a subfolder", "nul", "newline", "empty",
                                   "the folder"])
def test_index_entries_outside_the_folder_are_refused_unopened(sharded, tmp_path, no_allocation, opened, where):
    d, index, shards = sharded
    outside = tmp_path / "outside.safetensors"
    shutil.copy(d / shards[0], outside)  # a valid shard: only the name is wrong
    name = {"parent": "../outside.safetensors", "absolute": str(outside),
            "up through a subfolder": "sub/../../outside.safetensors", "nul": "model\0.safetensors",
            "newline": "model\n.safetensors", "empty": "", "the folder": "."}[where]
    _index_entry(d, index, name)
    opened.clear()
    words = {"parent": ["'../outside.safetensors' leaves the checkpoint folder"],
             "absolute": [f"{str(outside)!r} is not a file name inside the checkpoint folder"],
             "up through a subfolder": ["leaves the checkpoint folder"],
             "nul": ["file name 'model\\x00.safetensors' contains a control character"],
             "newline": ["file name 'model\\n.safetensors' contains a control character"],
             "empty": ["'' is not a file name inside the checkpoint folder"],
             "the folder": [f"{d}/.: is a directory, not a file"]}[where]
    _refused(d, *words)
    assert str(outside) not in opened


def test_symlink_out_of_the_folder_is_refused_unopened(sharded, tmp_path, no_allocation, opened):
    d, index, shards = sharded
    outside = tmp_path / "elsewhere" / shards[0]
    outside.parent.mkdir()
    shutil.move(d / shards[0], outside)
    (d / shards[0]).symlink_to(outside)
    opened.clear()
    _refused(d, "weight_map[", f"{shards[0]!r} leads outside the checkpoint folder (to {str(outside)!r})")
    assert str(outside) not in opened


def test_single_weights_file_symlinked_out_is_refused(folder, tmp_path, no_allocation, opened):
    outside = tmp_path / "stolen.safetensors"
    shutil.move(folder / WEIGHTS, outside)
    (folder / WEIGHTS).symlink_to(outside)
    opened.clear()
    _refused(folder, f"'{WEIGHTS}' leads outside the checkpoint folder (to {str(outside)!r})")
    assert str(outside) not in opened


def test_symlinks_inside_the_folder_load(sharded, model):
    d, index, shards = sharded
    (d / "real").mkdir()
    for fn in shards:
        shutil.move(d / fn, d / "real" / fn)
        (d / fn).symlink_to(os.path.join("real", fn))
    _assert_same_params(model, qvl.from_pretrained(d))


def test_huggingface_cache_snapshot_loads(saved_sharded, tmp_path, model):
    """huggingface_hub's cache keeps each file once in <repo>/blobs and links it from <repo>/snapshots/<rev>/:
    those links leave the snapshot folder but stay in the repo's blobs, and load."""
    repo = tmp_path / "models--Qwen--tiny"
    snapshot = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, fn in enumerate(sorted(os.listdir(saved_sharded))):
        shutil.copy(saved_sharded / fn, repo / "blobs" / f"blob{i}")
        (snapshot / fn).symlink_to(f"../../blobs/blob{i}")
    _assert_same_params(model, qvl.from_pretrained(snapshot))
    # ...but not from another repo's blobs
    other = tmp_path / "models--Other--x" / "blobs"
    other.mkdir(parents=True)
    index = json.loads((snapshot / INDEX).read_text())
    victim = index["weight_map"]["model.norm.weight"]
    shutil.copy(snapshot / victim, other / "stolen")
    (snapshot / victim).unlink()
    (snapshot / victim).symlink_to(other / "stolen")
    _refused(snapshot, "leads outside the checkpoint folder")


def test_shard_subfolder_inside_the_folder_loads(sharded, model):
    d, index, shards = sharded
    (d / "shards").mkdir()
    for fn in shards:
        shutil.move(d / fn, d / "shards" / fn)
    index["weight_map"] = {k: f"shards/{v}" for k, v in index["weight_map"].items()}
    (d / INDEX).write_text(json.dumps(index))
    _assert_same_params(model, qvl.from_pretrained(d))


# --- the index against the shards --------------------------------------------------------------------------------


def test_index_naming_a_shard_that_lacks_the_tensor(sharded, no_allocation):
    d, index, shards = sharded
    key = "model.norm.weight"
    wrong = next(fn for fn in shards if fn != index["weight_map"][key])
    index["weight_map"][key] = wrong
    (d / INDEX).write_text(json.dumps(index))
    _refused(d, f"weight_map places 1 tensors in {wrong}, which does not hold them: {key}")


def test_shard_holding_a_tensor_the_index_does_not_place_there(sharded, no_allocation):
    d, index, _ = sharded
    key = "visual.merger.mlp.2.bias"
    home = index["weight_map"].pop(key)
    (d / INDEX).write_text(json.dumps(index))
    _refused(d, f"weight_map does not place these tensors of {home} there (1): {key}")


def test_tensor_in_two_shards_with_different_shapes(sharded, no_allocation):
    """The same tensor in a second shard (with another shape), the index placing it in one of them."""
    d, index, shards = sharded
    key = "model.norm.weight"
    other = next(fn for fn in shards if fn != index["weight_map"][key])
    _rewrite(d / other, lambda t: {**t, key: torch.zeros(65)})
    _refused(d, f"does not place these tensors of {other} there (1): {key}")


def test_flat_and_nested_copies_in_two_shards(sharded, no_allocation):
    """Both layouts' names for one tensor, each in its own shard and so placed by the index: named with both."""
    d, index, shards = sharded
    home = index["weight_map"]["model.norm.weight"]
    other = next(fn for fn in shards if fn != home)
    _rewrite(d / other, lambda t: {**t, "model.language_model.norm.weight": torch.zeros(65)})
    index["weight_map"]["model.language_model.norm.weight"] = other
    (d / INDEX).write_text(json.dumps(index))
    first, second = sorted([("model.norm.weight", home), ("model.language_model.norm.weight", other)],
                           key=lambda kv: kv[1])
    _refused(d, f"keys present twice (1): {first[0]} in {first[1]} and {second[0]} in {second[1]}")


def test_shard_that_is_an_lfs_pointer(sharded, no_allocation):
    d, _, shards = sharded
    (d / shards[2]).write_bytes(LFS_POINTER)
    _refused(d, f"{d / shards[2]}: a Git LFS pointer file for 986400 bytes", "`git lfs pull`")


def test_truncated_shard(sharded, no_allocation):
    d, _, shards = sharded
    blob = (d / shards[1]).read_bytes()
    (d / shards[1]).write_bytes(blob[: len(blob) * 2 // 3])
    _refused(d, f"{d / shards[1]}: tensor ", "(truncated?)")


# --- config.json (parsed by qvl.config.load_hf_config; its errors are ConfigError) -------------------------------


@pytest.mark.parametrize("content", [b'{"model_type": "qwen2_5_vl\xff"}', b'{"model_type": ', b"[1, 2]",
                                     b"[" * 100_000, LFS_POINTER], ids=["not utf-8", "not json", "not an object",
                                                                        "too deep", "lfs pointer"])
def test_bad_config_json_is_refused_naming_it(folder, no_allocation, content):
    (folder / "config.json").write_bytes(content)
    with pytest.raises(ConfigError, match=r"config\.json") as info:
        qvl.from_pretrained(folder)
    assert "\n" not in str(info.value)


def test_config_json_that_is_a_directory(folder, no_allocation):
    (folder / "config.json").unlink()
    (folder / "config.json").mkdir()
    with pytest.raises(ConfigError, match=r"config\.json: is a directory, not a file"):
        qvl.from_pretrained(folder)


@pytest.mark.parametrize("value", [["bfloat16"], 16, {"name": "bfloat16"}])
def test_config_dtype_of_the_wrong_type(folder, no_allocation, value):
    config = json.loads((folder / "config.json").read_text())
    config["torch_dtype"] = value
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"config\.json: .*torch_dtype"):
        qvl.from_pretrained(folder)


def test_config_dtype_read_safely(folder):
    """_config_dtype (which from_pretrained calls after load_hf_config) on values load_hf_config may let through."""
    config = json.loads((folder / "config.json").read_text())
    for value, expected in [("bfloat16", torch.bfloat16), ("float64", torch.float32), (None, torch.float32)]:
        (folder / "config.json").write_text(json.dumps({**config, "torch_dtype": value}))
        assert ckpt._config_dtype(str(folder)) == expected
    (folder / "config.json").write_text(json.dumps({**config, "torch_dtype": None, "text_config": [1]}))
    assert ckpt._config_dtype(str(folder)) == torch.float32
    (folder / "config.json").write_text(json.dumps({**config, "torch_dtype": None, "text_config": {"dtype": [1]}}))
    with pytest.raises(ConfigError, match=r"config\.json: text_config\.dtype is \[1\], not a dtype name"):
        ckpt._config_dtype(str(folder))


# --- fuzz: no exception escapes but CheckpointError --------------------------------------------------------------

_names = st.sampled_from(["a", "b", "model.norm.weight", "__metadata__", "", "\0"])
_ints = st.one_of(st.integers(0, 40), st.integers(-3, 2**65), st.sampled_from([2**63, 2**64 - 1, 2**64]))
_json_scalars = st.one_of(st.none(), st.booleans(), _ints, st.floats(allow_nan=False), st.text(max_size=4))
_entries = st.one_of(
    st.fixed_dictionaries({"dtype": st.sampled_from([*DTYPE_BITS, "F128", "f32"]),
                           "shape": st.lists(st.one_of(st.integers(0, 5), _json_scalars), max_size=3),
                           "data_offsets": st.lists(_ints, min_size=0, max_size=3)}),
    st.fixed_dictionaries({"dtype": st.sampled_from(["F32", "F16", "BF16", "U8", "F4"]),
                           "shape": st.lists(st.integers(0, 4), max_size=3),
                           "data_offsets": st.tuples(st.integers(0, 40), st.integers(0, 40)).map(sorted)}),
    st.dictionaries(st.text(max_size=3), _json_scalars, max_size=2),
    _json_scalars,
)
_headers = st.one_of(
    st.dictionaries(_names, _entries, max_size=4).map(lambda h: json.dumps(h).encode()),
    st.recursive(_json_scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=3), c,
                                                                                    max_size=3)
                 ).map(lambda h: json.dumps(h).encode()),
    st.binary(max_size=40),
)


@st.composite
def _layouts(draw) -> tuple[bytes, bytes, int | None, int | None]:
    """A well-formed file (tensors of any dtype laid end to end, metadata), then maybe one thing changed."""
    header, offset = {}, 0
    for name in draw(st.lists(st.text(max_size=5).filter(lambda n: n != "__metadata__"), max_size=4, unique=True)):
        dtype, shape = draw(st.sampled_from(sorted(DTYPE_BITS))), draw(st.lists(st.integers(0, 4), max_size=3))
        nbytes = math.prod(shape) * DTYPE_BITS[dtype] // 8
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2))
    data, length, cut = draw(st.binary(min_size=offset, max_size=offset)), None, None
    change = draw(st.sampled_from(["none", "none", "field", "extra data", "length", "cut"]))
    if change == "field" and header:
        name = draw(st.sampled_from(sorted(header)))
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        header[name] = {**header[name], field: draw(st.one_of(_json_scalars, st.lists(_ints, max_size=3),
                                                              st.sampled_from(sorted(DTYPE_BITS))))}
    elif change == "extra data":
        data += draw(st.binary(min_size=1, max_size=8))
    elif change == "length":
        length = draw(st.integers(0, 200))
    elif change == "cut":
        cut = draw(st.integers(0, 200))
    return json.dumps(header).encode(), data, length, cut


_files = st.one_of(
    _layouts(),
    st.tuples(_headers, st.binary(max_size=48),
              st.one_of(st.none(), st.sampled_from([0, 1, 7, 2**63, 2**64 - 1]), st.integers(0, 200)),
              st.one_of(st.none(), st.integers(0, 120))),
)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(_files)
def test_fuzz_safetensors_headers(tmp_path, case):
    """Any bytes as a safetensors file: read_header refuses with CheckpointError, or accepts a file that safetensors
    reads as the header says (same names, dtypes, shapes; tensors of the size given)."""
    header, data, length, cut = case
    blob = _st(header, data, length)
    if cut is not None:
        blob = blob[:cut]
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(blob)
    try:
        tensors = read_header(str(path))
    except CheckpointError as e:
        assert "\n" not in str(e) and str(path) in str(e)
        return
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == set(tensors)
        for key, t in tensors.items():
            piece = f.get_slice(key)
            assert (piece.get_dtype(), tuple(piece.get_shape())) == (t.dtype, t.shape)
            if t.dtype in ("F32", "F16", "BF16", "U8", "I64", "F64"):
                assert tuple(f.get_tensor(key).shape) == t.shape


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(["model.norm.weight", "model.embed_tokens.weight", "visual.merger.mlp.2.bias",
                            "__metadata__"]),
       field=st.sampled_from(["dtype", "shape", "data_offsets", None]),
       value=st.one_of(_json_scalars, st.lists(_ints, max_size=3), st.sampled_from([*DTYPE_BITS, "F128"])),
       length_delta=st.sampled_from([0, 0, 0, -1, 1, 2**40]))
def test_fuzz_checkpoint_headers_through_from_pretrained(saved, tmp_path_factory, key, field, value, length_delta):
    """One field of one entry of the real checkpoint's header replaced by anything (or the length field moved):
    from_pretrained loads it or raises CheckpointError; nothing else escapes."""
    d = _copy_folder(saved, tmp_path_factory.mktemp("fuzz") / "ckpt")
    header, data = _split((d / WEIGHTS).read_bytes())
    if field is None:
        header[key] = value
    elif isinstance(header[key], dict):
        header[key] = {**header[key], field: value}
    raw = json.dumps(header).encode()
    (d / WEIGHTS).write_bytes(_st(raw, data, length=max(len(raw) + length_delta, 0)))
    try:
        qvl.from_pretrained(d)
    except CheckpointError as e:
        assert "\n" not in str(e)


@pytest.mark.parametrize("value", ["int8", "banana"])
def test_config_dtype_that_names_no_float_type(folder, no_allocation, value):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "torch_dtype": value}))
    with pytest.raises(ConfigError, match=rf"torch_dtype is '{value}', not a float dtype name"):
        qvl.from_pretrained(folder)


def test_valid_but_absurd_sizes_are_refused_before_even_the_meta_model(folder, monkeypatch):
    """2**31 - 1 layers pass every config check; the memory estimate refuses them before a model exists."""
    config = json.loads((folder / "config.json").read_text())
    text = config.get("text_config", config)
    text["num_hidden_layers"] = 2**31 - 1
    (folder / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr(ckpt, "Qwen25VL", None)  # building any model here would fail the test
    with pytest.raises(qvl.ResourceError, match=r"this config's weights \([\d,]+ parameters\) in float32 need"):
        qvl.from_pretrained(folder)
