"""Build models: random weights from a config, or an HF-format checkpoint directory (safetensors only) of
Qwen2.5-VL or Qwen2-VL (config.json's model_type).

Checkpoints come in two key layouts, both accepted:
    flat (published):  model.layers.N...,               visual.blocks.N...,        lm_head.weight
    nested (tf >= 4.52): model.language_model.layers.N..., model.visual.blocks.N..., lm_head.weight
qvl fuses q/k/v and gate/up projections into single matrices; each fused parameter lists the checkpoint
tensors that fill its rows. Qwen2-VL's vision blocks keep transformers' names (norm1/norm2 with a bias,
mlp.fc1/mlp.fc2); both towers' merger MLP is merger.mlp.0 / merger.mlp.2 there, merger.fc1 / merger.fc2 here.
Weights are read tensor by tensor straight into parameters already allocated in the target dtype on the target
device, so loading never holds a float32 copy of the model.
With `tp=N` (tensor parallelism, under torchrun or `qvl.parallel.launch`) every rank builds and fills only its own
piece of each parameter (`qvl.parallel.shard`), reading just those rows or columns of the checkpoint tensors
(safetensors' `get_slice`): no rank holds the whole model, on the host or the device.
Pickle-based files (``*.bin``, ``*.pt``) are refused. A folder or file that cannot be used (truncated, a Git LFS
pointer, a malformed header or index, a name leading out of the folder, a tensor of the wrong name, shape or dtype) is
a `CheckpointError` naming it, raised before the model is allocated; weights holding NaN or inf are refused too.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator

import torch

from .config import Qwen25VLConfig, as_config, config_to_hf_dict, load_hf_config
from .devices import parse_device
from .dtypes import DTYPES, dtype_name
from .errors import CheckpointError, ConfigError
from .files import read_json, write_json
from .model.inputs import SEED_MAX, SEED_MIN, check_int
from .model.qwen2_5_vl import Qwen25VL
from .parallel.group import TensorParallel, join, local_device
from .parallel.shard import (
    RankSlice,
    check_degree,
    checkpoint_slices,
    parameter_shapes,
    rank_bytes,
    rank_slice,
)
from .safetensors_check import (
    TensorHeader,
    checkpoint_file,
    open_safetensors,
    printable,
    read_header,
    read_index,
    weight_dtype_problem,
)

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"


# --- key mapping -------------------------------------------------------------------------------------------------


def canonical_key(key: str) -> str:
    """Map either checkpoint layout onto the flat one."""
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model."):]
    if key.startswith("model.visual."):
        return key[len("model."):]
    return key


def checkpoint_sources(model: Qwen25VL) -> dict[str, list[tuple[str, int]]]:
    """qvl parameter name -> [(flat checkpoint key, first row)] of the tensors that fill it."""
    t, v = model.cfg.text, model.cfg.vision
    q_rows, kv_rows = t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    sources = {}
    for name, _ in model.named_parameters():
        prefix, _, leaf = name.rpartition(".")
        if prefix.endswith("self_attn.qkv_proj"):
            base = prefix[: -len("qkv_proj")]
            sources[name] = [(f"{base}q_proj.{leaf}", 0), (f"{base}k_proj.{leaf}", q_rows),
                             (f"{base}v_proj.{leaf}", q_rows + kv_rows)]
        elif prefix.endswith("mlp.gate_up_proj"):
            base = prefix[: -len("gate_up_proj")]
            inner = v.intermediate_size if name.startswith("visual.") else t.intermediate_size
            sources[name] = [(f"{base}gate_proj.{leaf}", 0), (f"{base}up_proj.{leaf}", inner)]
        elif prefix in ("visual.merger.fc1", "visual.merger.fc2"):
            sources[name] = [(f"visual.merger.mlp.{0 if prefix.endswith('fc1') else 2}.{leaf}", 0)]
        else:
            sources[name] = [(name, 0)]
    return sources


# --- building ----------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _check_fits(cfg: Qwen25VLConfig, dtype: torch.dtype, device, tp: int = 1, vision_parallel: str = "data") -> None:
    """Refuse, with the estimate and before any model exists (even on the meta device), weights that would
    not fit `device`: the whole model's, or at degree `tp` one rank's."""
    from .config import PRESETS
    from .dtypes import FLOAT_DTYPES
    from .errors import ConfigError
    from .memory import ensure_fits

    if not isinstance(dtype, torch.dtype) or dtype not in FLOAT_DTYPES:
        raise ConfigError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    cfg.validate()  # every size checked before the estimate is computed from them
    check_degree(cfg, tp, vision_parallel)
    preset = next((name for name, p in PRESETS.items() if p == cfg), None)
    what = (f"{f'the {preset} preset' if preset else 'this config'}'s weights ({cfg.num_parameters():,} parameters) "
            f"in {dtype_name(dtype)}")
    # a rank holds at least 1/tp of the weights: absurd sizes are refused before the exact count builds a meta model
    ensure_fits(what if tp == 1 else f"1/{tp} of {what}", cfg.weight_bytes(dtype) // tp, device)
    if tp > 1:
        ensure_fits(f"one rank's share of {what} at tp {tp}", rank_bytes(cfg, dtype, tp, vision=vision_parallel),
                    device)


def _allocate(cfg: Qwen25VLConfig, dtype: torch.dtype, device, backends, fallback,
              parallel: TensorParallel | None = None, vision_parallel: str = "data") -> Qwen25VL:
    """An uninitialized model (this rank's piece of it under `parallel`) in `dtype` on `device`, with no
    intermediate copy anywhere (callers `_check_fits` first)."""
    with _default_dtype(dtype), torch.device("meta"):
        model = Qwen25VL(cfg, backends=backends, fallback=fallback, parallel=parallel, vision_parallel=vision_parallel)
    model = model.to_empty(device=device)
    model.reset_rotary()
    return model.eval()


def from_config(preset_or_config="tiny", *, dtype: torch.dtype = torch.float32, device="cpu", seed: int = 0,
                backends=None, fallback: str | None = None, tp: int = 1, vision_parallel: str = "data") -> Qwen25VL:
    """A model with random weights: N(0, 0.02) matrices and embeddings, zero biases, unit norm weights.

    `tp=N`: this rank's piece of the same model (the same weights as tp 1, for the same seed), in a group of N
    processes (see `qvl.parallel.group.join`); each parameter is drawn whole, one at a time, and cut.
    `vision_parallel`: the vision tower whole and data-parallel ("data") or split like the decoder ("tensor")."""
    cfg = as_config(preset_or_config)
    device = local_device(parse_device(device))  # under torchrun, a CUDA device is the rank's own
    check_int(seed, "seed", SEED_MIN, SEED_MAX)  # torch.Generator.manual_seed's range
    _check_fits(cfg, dtype, device, tp, vision_parallel)
    parallel = join(tp, device)
    model = _allocate(cfg, dtype, device, backends, fallback, parallel, vision_parallel)
    gen = torch.Generator(device=model.device)
    gen.manual_seed(seed)
    shapes = None if parallel is None else parameter_shapes(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("norm1.weight") or name.endswith("norm2.weight") \
                    or name.endswith("ln_q.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            elif parallel is None:
                p.normal_(0.0, 0.02, generator=gen)
            else:  # the whole parameter drawn as at tp 1 (the same generator stream), then this rank's piece
                whole = torch.empty(shapes[name], dtype=p.dtype, device=p.device).normal_(0.0, 0.02, generator=gen)
                p.copy_(rank_slice(name, whole, cfg, parallel.size, parallel.rank, vision_parallel))
                del whole
    return model


# --- reading a checkpoint ----------------------------------------------------------------------------------------
# Everything a checkpoint's files say is checked before memory is sized from it: the folder, the index, every
# file's safetensors header (qvl.safetensors_check), then the tensor names, shapes and dtypes against the model's
# parameters on the meta device. Only then is the model allocated and filled, each tensor checked for NaN and inf.


def _checkpoint_folder(directory: str) -> None:
    if os.path.isdir(directory):
        return
    if os.path.lexists(directory):
        raise CheckpointError(f"{directory!r} is a file, not a checkpoint folder: pass the folder that holds "
                              "config.json and the weights")
    raise CheckpointError(f"checkpoint folder {directory!r} does not exist: no config.json or weights to read")


def _weight_layout(directory: str) -> dict[str, set[str] | None]:
    """Weight file path -> the tensor names the index places in it (None for a single model.safetensors)."""
    _checkpoint_folder(directory)
    index = os.path.join(directory, INDEX)
    if os.path.lexists(index):
        weight_map = read_index(directory, INDEX)
        placed: dict[str, set[str]] = {}
        for key, fn in weight_map.items():
            placed.setdefault(fn, set()).add(key)
        missing = [fn for fn in sorted(placed) if not os.path.exists(os.path.join(directory, fn))]
        if missing:
            raise CheckpointError(f"{index} names shard files that are missing: {', '.join(missing)}")
        return {os.path.join(directory, fn): placed[fn] for fn in sorted(placed)}
    single = os.path.join(directory, WEIGHTS)
    if os.path.lexists(single):
        return {checkpoint_file(directory, WEIGHTS, source=single): None}
    pickled = [fn for fn in os.listdir(directory) if fn.endswith((".bin", ".pt", ".pth", ".ckpt"))]
    hint = (f" It holds pickle files ({', '.join(sorted(pickled))}), which qvl never loads: convert them "
            "to safetensors first.") if pickled else ""
    raise CheckpointError(f"no weights in {directory!r}: expected {WEIGHTS} or {INDEX}.{hint}")


def _read_headers(directory: str) -> dict[str, dict[str, TensorHeader]]:
    """Weight file path -> its tensors, every header checked, and a sharded checkpoint's index agreeing with its
    shards (each tensor in the shard the index names, and nowhere else)."""
    headers = {}
    for path, listed in _weight_layout(directory).items():
        tensors = headers[path] = read_header(path)
        if listed is None:
            continue
        where = f"{os.path.join(directory, INDEX)}: weight_map"
        if absent := sorted(map(printable, listed - tensors.keys())):
            raise CheckpointError(f"{where} places {len(absent)} tensors in {os.path.basename(path)}, which does not "
                                  f"hold them: {_shorten(absent)}")
        if unlisted := sorted(map(printable, tensors.keys() - listed)):
            raise CheckpointError(f"{where} does not place these tensors of {os.path.basename(path)} there "
                                  f"({len(unlisted)}): {_shorten(unlisted)}")
    return headers


def _weight_files(directory: str) -> list[str]:
    """The checkpoint's safetensors files, checked (folder, index, headers) without reading any weights."""
    return list(_read_headers(directory))


def _shorten(items: list[str], n: int = 12) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def _plan(model: Qwen25VL, headers: dict[str, dict[str, TensorHeader]], directory: str
          ) -> list[tuple[str, str, str, int]]:
    """(file, checkpoint key, parameter, first row) for every tensor to copy, after checking that the checkpoint
    fills every parameter once, with the right shape and a float dtype. `model` may live on the meta device."""
    sources = checkpoint_sources(model)
    params = dict(model.named_parameters())
    wanted = {key: (name, row) for name, srcs in sources.items() for key, row in srcs}
    # lm_head.weight in a tied checkpoint is the embedding again; accept and skip it.
    optional = {"lm_head.weight"} if model.cfg.text.tie_word_embeddings else set()
    plan: list[tuple[str, str, str, int]] = []
    found: dict[str, tuple[str, str]] = {}  # flat key -> (file, key as written)
    unexpected, mismatched, duplicated, not_float = [], [], [], []
    for path, tensors in headers.items():
        for key, t in tensors.items():
            canon, shown = canonical_key(key), printable(key)
            if canon in optional:
                continue
            if canon not in wanted:
                unexpected.append(shown)
                continue
            if canon in found:
                first_path, first_key = found[canon]
                duplicated.append(f"{first_key} in {os.path.basename(first_path)} and {shown} in "
                                  f"{os.path.basename(path)}")
                continue
            found[canon] = (path, key)
            name, row = wanted[canon]
            target = params[name]
            rows = _rows_of(sources[name], row, target.shape[0]) if target.dim() else None
            expect = (rows, *target.shape[1:]) if target.dim() else ()
            if t.shape != expect:
                mismatched.append(f"{shown}: checkpoint {list(t.shape)} vs model {list(expect)}")
            elif problem := weight_dtype_problem(t):
                not_float.append(f"{shown} in {os.path.basename(path)} is {problem}")
            else:
                plan.append((path, key, name, row))
    missing = sorted(set(wanted) - set(found))
    parts = []
    if missing:
        parts.append(f"missing keys ({len(missing)}): {_shorten(missing)}")
    if unexpected:
        parts.append(f"unexpected keys ({len(unexpected)}): {_shorten(sorted(unexpected))}")
    if duplicated:
        parts.append(f"keys present twice ({len(duplicated)}): {_shorten(sorted(duplicated))}")
    if mismatched:
        parts.append(f"shape mismatches ({len(mismatched)}): {_shorten(mismatched)}")
    if not_float:
        parts.append(f"tensors that are not float weights ({len(not_float)}): {_shorten(not_float)}")
    if parts:
        raise CheckpointError(f"checkpoint {directory!r} does not match the model built from its config.json: "
                              + "; ".join(parts))
    return plan


def _finite(t: torch.Tensor) -> bool:
    """Whether every value of `t` is finite: one pass without a temporary the size of `t` (min and max are NaN
    when any value is NaN, and +-inf when any is infinite); a single sync on an accelerator."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def _nonfinite_note(path: str, key: str, stored: torch.Tensor, loaded: torch.Tensor) -> str:
    """What is wrong with a tensor that loaded as non-finite: NaN or inf in the file, or values its conversion to
    the model's dtype overflowed."""
    nan, inf = int(torch.isnan(stored).sum()), int(torch.isinf(stored).sum())
    where = f"{os.path.basename(path)}: {key}"
    if nan or inf:
        counts = " and ".join(f"{n} {what}" for n, what in ((nan, "NaN"), (inf, "infinite")) if n)
        return f"{where} has {counts} values (of {stored.numel()})"
    over = int(torch.isinf(loaded).sum())
    return (f"{where} has {over} values beyond {dtype_name(loaded.dtype)}'s range (infinite once converted from "
            f"{dtype_name(stored.dtype)})")


def _rank_pieces(model: Qwen25VL) -> dict[str, tuple[RankSlice, int]]:
    """Under tensor parallelism, flat checkpoint key -> (the rows or columns of that tensor this rank reads, where
    they start in its piece of the parameter along the slice's dim). Keys the rank reads nothing of are absent."""
    tp, rank = model.parallel.size, model.parallel.rank
    pieces = {}
    for name, sources in checkpoint_sources(model).items():
        offset = 0
        for key, piece in checkpoint_slices(name, sources, model.cfg, tp, rank, model.vision_parallel):
            pieces[key] = (piece, offset)
            offset += piece.length if piece.dim == 0 else 0
    return pieces


def _read_piece(f, key: str, piece: RankSlice) -> torch.Tensor:
    """The rows (dim 0) or columns (dim 1) of checkpoint tensor `key` in `piece`, read without the rest."""
    whole = f.get_slice(key)
    parts = [whole[start:stop] if piece.dim == 0 else whole[:, start:stop] for start, stop in piece.ranges]
    return parts[0] if len(parts) == 1 else torch.cat(parts, piece.dim)


def _copy(model: Qwen25VL, plan: list[tuple[str, str, str, int]], directory: str) -> None:
    """Copy the planned tensors (under tensor parallelism, this rank's pieces of them) into the model's
    parameters, file by file, checking each for NaN and inf where it lands; `CheckpointError` listing every
    non-finite tensor after the last."""
    params = dict(model.named_parameters())
    device = str(model.device)
    pieces = None if model.parallel is None else _rank_pieces(model)
    by_file: dict[str, list[tuple[str, str, int]]] = {}
    for path, key, name, row in plan:
        by_file.setdefault(path, []).append((key, name, row))
    nonfinite = []
    with torch.no_grad():
        for path, items in by_file.items():
            # Tensors land directly on the target device; copy_ converts the dtype in place.
            with open_safetensors(path, device) as f:
                for key, name, row in items:
                    target = params[name]
                    if pieces is None:
                        tensor = f.get_tensor(key)
                        loaded = target[row: row + tensor.shape[0]] if target.dim() else target
                    elif (flat := canonical_key(key)) in pieces:
                        piece, offset = pieces[flat]
                        tensor = _read_piece(f, key, piece)
                        loaded = target.narrow(piece.dim, offset, piece.length)
                    else:
                        continue
                    loaded.copy_(tensor)
                    if not _finite(loaded):
                        nonfinite.append(_nonfinite_note(path, key, tensor, loaded))
                    del tensor
    if nonfinite:
        raise CheckpointError(f"checkpoint {directory!r} has non-finite weights ({len(nonfinite)} tensors): "
                              + _shorten(nonfinite, 6))


def load_weights(model: Qwen25VL, directory: str) -> None:
    """Fill every parameter from the checkpoint, after checking its files and the names, shapes and dtypes of all
    its tensors; refuses NaN or inf weights."""
    directory = os.fspath(directory)
    _copy(model, _full_plan(model.cfg, _read_headers(directory), directory), directory)


def _full_plan(cfg: Qwen25VLConfig, headers: dict[str, dict[str, TensorHeader]], directory: str
               ) -> list[tuple[str, str, str, int]]:
    """`_plan` against the whole model's names and shapes (on the meta device, no memory): a rank's pieces are
    read from the same checked plan."""
    with torch.device("meta"):
        return _plan(Qwen25VL(cfg, backends="eager"), headers, directory)


def _rows_of(srcs: list[tuple[str, int]], row: int, total: int) -> int:
    """Row count of the piece starting at `row` of a parameter filled from `srcs` (all rows if unfused)."""
    starts = sorted(r for _, r in srcs) + [total]
    return starts[starts.index(row) + 1] - row


def _config_dtype(directory: str) -> torch.dtype:
    """The dtype config.json names (torch_dtype, or dtype at the top or under text_config); float32 where it
    names none qvl computes in."""
    path = os.path.join(directory, "config.json")
    raw = read_json(path, error=ConfigError)
    text = raw.get("text_config") if isinstance(raw, dict) else None
    fields = [("torch_dtype", raw), ("dtype", raw), ("text_config.dtype", text)]
    for field, holder in fields:
        name = holder.get(field.rpartition(".")[2]) if isinstance(holder, dict) else None
        if name is not None and not isinstance(name, str):
            raise ConfigError(f"{path}: {field} is {name!r}, not a dtype name")
        if name in DTYPES:
            return DTYPES[name]
        if name:
            # a float type qvl does not compute in (float64, "float") loads as float32; anything else is a mistake
            if isinstance(getattr(torch, name, None), torch.dtype) and getattr(torch, name).is_floating_point:
                return torch.float32
            raise ConfigError(f"{path}: {field} is {name!r}, not a float dtype name (float32, float16, bfloat16)")
    return torch.float32


def from_pretrained(directory: str | os.PathLike, *, dtype: torch.dtype | None = None, device="cpu",
                    backends=None, fallback: str | None = None, overrides: dict | None = None,
                    tp: int = 1, vision_parallel: str = "data") -> Qwen25VL:
    """Load an HF-format Qwen2.5-VL or Qwen2-VL directory. `dtype=None` uses the checkpoint's own dtype.

    `tp=N`: this rank's piece of the model, in a group of N processes (see `qvl.parallel.group.join`), read from
    the rows and columns of the checkpoint's tensors it holds; `vision_parallel` as in `from_config`.

    `CheckpointError` for a folder or file that cannot be used (named, with the problem), found before the model is
    allocated; weights holding NaN or inf are refused after loading, each tensor named.
    """
    if not isinstance(directory, (str, bytes, os.PathLike)):
        raise CheckpointError(f"the checkpoint folder must be a path, got {type(directory).__name__} "
                              f"{directory!r:.60}")
    directory = os.fsdecode(directory)
    _checkpoint_folder(directory)
    cfg = load_hf_config(directory)
    if overrides:
        cfg = cfg.with_overrides(overrides)
    dtype = dtype or _config_dtype(directory)
    device = local_device(parse_device(device))  # under torchrun, a CUDA device is the rank's own
    # before the meta model: absurd sizes take long even there
    _check_fits(cfg, dtype, device, tp, vision_parallel)
    plan = _full_plan(cfg, _read_headers(directory), directory)  # checked before memory is allocated
    model = _allocate(cfg, dtype, device, backends, fallback, join(tp, device), vision_parallel)
    _copy(model, plan, directory)
    return model


def _stale_weights(directory: str) -> set[str]:
    """The weight files of an earlier save: single file, index and every shard the index names."""
    index = os.path.join(directory, INDEX)
    stale = {WEIGHTS, INDEX}
    if os.path.isfile(index):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            with open(index, encoding="utf-8") as f:
                stale |= {os.path.basename(fn) for fn in json.load(f).get("weight_map", {}).values()}
    return stale


def _shards(tensors: dict[str, torch.Tensor], max_shard_bytes: int | None) -> dict[str, dict[str, torch.Tensor]]:
    """File name -> tensors: one model.safetensors, or shards of at most max_shard_bytes (a larger tensor
    gets a shard of its own) named as transformers names them."""
    if max_shard_bytes is None:
        return {WEIGHTS: tensors}
    shards, current, size = [], {}, 0
    for key in sorted(tensors):
        nbytes = tensors[key].numel() * tensors[key].element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key], size = tensors[key], size + nbytes
    shards.append(current)
    return {f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors": shard for i, shard in enumerate(shards)}


def save_pretrained(model: Qwen25VL, directory: str | os.PathLike, *, max_shard_bytes: int | None = None) -> None:
    """Write config.json and safetensors weights in the flat HF layout (fused weights split again).

    Every file is written under a temporary name first; only when all are written do the earlier save's
    weights go and the new files move into place (renames). A save that fails halfway (a full disk, an
    interrupt) leaves the directory's earlier checkpoint as it was.
    """
    from safetensors.torch import save_file

    if model.parallel is not None:
        raise ConfigError(f"save_pretrained writes a whole model; this one is rank {model.parallel.rank}'s piece at tp "
                          f"{model.parallel.size}: save from a model loaded with tp=1")
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    params = dict(model.named_parameters())
    tensors = {}
    for name, srcs in checkpoint_sources(model).items():
        total = params[name].shape[0]
        for key, row in srcs:
            rows = _rows_of(srcs, row, total)
            tensors[key] = params[name].detach()[row: row + rows].contiguous().cpu()
    hf = config_to_hf_dict(model.cfg)
    hf["torch_dtype"] = dtype_name(model.dtype)
    shards = _shards(tensors, max_shard_bytes)

    def temporary(fn: str) -> str:
        return os.path.join(directory, f".{fn}.partial")

    written = []
    try:
        for fn, shard in shards.items():
            written.append(fn)
            save_file(shard, temporary(fn), metadata={"format": "pt"})
        if max_shard_bytes is not None:
            written.append(INDEX)
            weight_map = {k: fn for fn, shard in shards.items() for k in shard}
            write_json(temporary(INDEX), {"metadata": {}, "weight_map": weight_map})
        written.append("config.json")
        write_json(temporary("config.json"), hf)
    except BaseException:
        for fn in written:
            with contextlib.suppress(FileNotFoundError):
                os.remove(temporary(fn))
        raise
    for fn in _stale_weights(directory) - set(written):
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(directory, fn))
    for fn in written:
        os.replace(temporary(fn), os.path.join(directory, fn))


__all__ = ["from_config", "from_pretrained", "save_pretrained", "load_weights", "checkpoint_sources", "canonical_key"]
