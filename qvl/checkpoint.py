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
Pickle-based files (``*.bin``, ``*.pt``) are refused.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator

import torch

from .config import Qwen25VLConfig, as_config, config_to_hf_dict, load_hf_config
from .dtypes import DTYPES, dtype_name
from .files import write_json
from .model.qwen2_5_vl import Qwen25VL

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


def _allocate(cfg: Qwen25VLConfig, dtype: torch.dtype, device, backends, fallback) -> Qwen25VL:
    """An uninitialized model in `dtype` on `device`, with no intermediate copy anywhere."""
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    with _default_dtype(dtype), torch.device("meta"):
        model = Qwen25VL(cfg, backends=backends, fallback=fallback)
    model = model.to_empty(device=device)
    model.reset_rotary()
    return model.eval()


def from_config(preset_or_config="tiny", *, dtype: torch.dtype = torch.float32, device="cpu", seed: int = 0,
                backends=None, fallback: str | None = None) -> Qwen25VL:
    """A model with random weights: N(0, 0.02) matrices and embeddings, zero biases, unit norm weights."""
    cfg = as_config(preset_or_config)
    model = _allocate(cfg, dtype, torch.device(device), backends, fallback)
    gen = torch.Generator(device=model.device)
    gen.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("norm1.weight") or name.endswith("norm2.weight") \
                    or name.endswith("ln_q.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return model


def _weight_files(directory: str) -> list[str]:
    if not os.path.isdir(directory):
        raise ValueError(f"checkpoint directory {directory!r} does not exist")
    index = os.path.join(directory, INDEX)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index} has no weight_map")
        files = sorted(set(weight_map.values()))
        missing = [fn for fn in files if not os.path.isfile(os.path.join(directory, fn))]
        if missing:
            raise ValueError(f"{index} names shard files that are missing: {', '.join(missing)}")
        return [os.path.join(directory, fn) for fn in files]
    single = os.path.join(directory, WEIGHTS)
    if os.path.isfile(single):
        return [single]
    pickled = [fn for fn in os.listdir(directory) if fn.endswith((".bin", ".pt", ".pth", ".ckpt"))]
    hint = (f" It holds pickle files ({', '.join(sorted(pickled))}), which qvl never loads: convert them "
            "to safetensors first.") if pickled else ""
    raise ValueError(f"no weights in {directory!r}: expected {WEIGHTS} or {INDEX}.{hint}")


def _shorten(items: list[str], n: int = 12) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def load_weights(model: Qwen25VL, directory: str) -> None:
    """Fill every parameter from the checkpoint, after checking names and shapes of all tensors."""
    from safetensors import safe_open

    files = _weight_files(directory)
    sources = checkpoint_sources(model)
    params = dict(model.named_parameters())
    wanted = {key: (name, row) for name, srcs in sources.items() for key, row in srcs}
    # lm_head.weight in a tied checkpoint is the embedding again; accept and skip it.
    optional = {"lm_head.weight"} if model.cfg.text.tie_word_embeddings else set()
    plan: list[tuple[str, str, str, int]] = []  # (file, checkpoint key, param, row)
    unexpected, mismatched, duplicated, seen = [], [], [], set()
    for path in files:
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                canon = canonical_key(key)
                if canon in optional:
                    continue
                if canon not in wanted:
                    unexpected.append(key)
                    continue
                if canon in seen:
                    duplicated.append(key)
                    continue
                seen.add(canon)
                name, row = wanted[canon]
                target = params[name]
                rows = _rows_of(sources[name], row, target.shape[0]) if target.dim() else None
                expect = (rows, *target.shape[1:]) if target.dim() else ()
                shape = tuple(f.get_slice(key).get_shape())
                if shape != expect:
                    mismatched.append(f"{key}: checkpoint {list(shape)} vs model {list(expect)}")
                else:
                    plan.append((path, key, name, row))
    missing = sorted(set(wanted) - seen)
    if missing or unexpected or mismatched or duplicated:
        parts = [f"checkpoint {directory!r} does not match the model built from its config.json:"]
        if missing:
            parts.append(f"  missing keys ({len(missing)}): {_shorten(missing)}")
        if unexpected:
            parts.append(f"  unexpected keys ({len(unexpected)}): {_shorten(sorted(unexpected))}")
        if duplicated:
            parts.append(f"  keys present twice (flat and nested layout) ({len(duplicated)}): "
                         f"{_shorten(sorted(duplicated))}")
        if mismatched:
            parts.append(f"  shape mismatches ({len(mismatched)}): {_shorten(mismatched)}")
        raise ValueError("\n".join(parts))
    device = model.device
    with torch.no_grad():
        for path in files:
            # Tensors land directly on the target device; copy_ converts the dtype in place.
            with safe_open(path, framework="pt", device=str(device)) as f:
                for p, key, name, row in plan:
                    if p != path:
                        continue
                    tensor = f.get_tensor(key)
                    target = params[name]
                    (target[row: row + tensor.shape[0]] if target.dim() else target).copy_(tensor)
                    del tensor


def _rows_of(srcs: list[tuple[str, int]], row: int, total: int) -> int:
    """Row count of the piece starting at `row` of a parameter filled from `srcs` (all rows if unfused)."""
    starts = sorted(r for _, r in srcs) + [total]
    return starts[starts.index(row) + 1] - row


def _config_dtype(directory: str) -> torch.dtype:
    try:
        with open(os.path.join(directory, "config.json"), encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError):
        return torch.float32
    name = raw.get("torch_dtype") or raw.get("dtype") or (raw.get("text_config") or {}).get("dtype")
    return DTYPES.get(name, torch.float32)


def from_pretrained(directory: str | os.PathLike, *, dtype: torch.dtype | None = None, device="cpu",
                    backends=None, fallback: str | None = None, overrides: dict | None = None) -> Qwen25VL:
    """Load an HF-format Qwen2.5-VL or Qwen2-VL directory. `dtype=None` uses the checkpoint's own dtype."""
    directory = os.fspath(directory)
    cfg = load_hf_config(directory)
    if overrides:
        cfg = cfg.with_overrides(overrides)
    _weight_files(directory)  # fail on a directory without weights before allocating anything
    model = _allocate(cfg, dtype or _config_dtype(directory), torch.device(device), backends, fallback)
    load_weights(model, directory)
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
