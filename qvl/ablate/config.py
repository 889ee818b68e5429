"""Ablation configs (``ablations/*.toml``): the schema, parsing and validation.

A config is parsed with ``tomllib`` and checked key by key against the schema below; nothing in it is
ever evaluated. Every mistake is a `ConfigError` naming the file, the key and what is allowed, e.g.
``ablations/x.toml: [workload] images[1]: size must be [height, width] of positive ints, got [224]``.

    name = "backend_mix"              # optional: the results folder name (default: the file name)
    description = "..."               # optional
    reference = "eager"               # required: the variant every other one is compared against

    [model]
    preset = "tiny"                   # tiny, 3b, 7b, 32b, 72b (random weights) ... or
    # checkpoint = "path/to/dir"      # an HF-format directory (relative paths: from this file's folder)
    dtype = "float32"                 # float32, float16, bfloat16
    device = "auto"                   # auto (cuda if present, else cpu), cpu, cuda, cuda:N
    seed = 0                          # weight seed for presets
    overrides = { "vision.window_size" = 112 }   # architecture overrides for every variant

    [workload]
    images = [{ size = [224, 336] }, { file = "cat.png" }]   # by size (pixels) or by file (needs Pillow)
    videos = [{ size = [224, 224], frames = 8, fps = 2.0 }]
    prompt_tokens = 32                # text tokens around the vision placeholders
    decode_tokens = 16                # new tokens, greedy (the first comes from the prefill)
    batch_size = 1
    seed = 0                          # prompt text and synthesized pixels
    min_pixels = 3136                 # the processor's resize bounds
    max_pixels = 12845056

    [run]
    warmup = 1
    repeats = 3                       # default: 3 on a CPU, 10 on a GPU
    fallback = "none"                 # strict ("none") or a backend for calls a variant cannot run

    [[variants]]
    name = "eager"
    backends = "eager"                # a backend for every operator, "attention=triton,norm=eager", or a table
    # fallback, dtype, overrides, description: optional, per variant
    # cuda_graph = true               # decode steps replayed from a CUDA graph (CUDA only; qvl.model.graphs)
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch

from ..backends import OPERATORS, backend_names, parse_spec
from ..config import Qwen25VLConfig, TextConfig, VisionConfig, get_preset, load_hf_config, PRESETS

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# qvl's documented backends that configs may name before they are registered on this machine: a variant
# naming one that is missing then fails at run time with the registry's error, the other variants run.
KNOWN_BACKENDS = ("eager", "triton", "triton-gemm", "xformers")
STRICT = "none"
# Qwen2.5-VL's preprocessor_config.json bounds on resized image area (pixels).
MIN_PIXELS = 56 * 56
MAX_PIXELS = 12845056
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class ConfigError(ValueError):
    """A config file that does not follow the schema; the message names the file, the key and the rule."""


# --- the parsed config --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageSpec:
    size: tuple[int, int] | None = None  # (height, width) in pixels, before the processor's resize
    file: str | None = None  # absolute path

    def describe(self) -> str:
        return f"{self.size[0]}x{self.size[1]}" if self.size else os.path.basename(self.file or "")


@dataclass(frozen=True)
class VideoSpec:
    size: tuple[int, int]
    frames: int
    fps: float = 2.0

    def describe(self) -> str:
        return f"{self.frames} frames {self.size[0]}x{self.size[1]} @ {self.fps:g} fps"


@dataclass(frozen=True)
class WorkloadSpec:
    images: tuple[ImageSpec, ...] = ()
    videos: tuple[VideoSpec, ...] = ()
    prompt_tokens: int = 16
    decode_tokens: int = 8
    batch_size: int = 1
    seed: int = 0
    min_pixels: int = MIN_PIXELS
    max_pixels: int = MAX_PIXELS


@dataclass(frozen=True)
class ModelSpec:
    preset: str | None = "tiny"
    checkpoint: str | None = None
    dtype: str = "float32"
    device: str = "auto"
    seed: int = 0
    overrides: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        return f"preset {self.preset}" if self.preset else f"checkpoint {self.checkpoint}"


@dataclass(frozen=True)
class RunSpec:
    warmup: int = 1
    repeats: int | None = None  # None: 3 on a CPU, 10 on a GPU
    fallback: str | None = None  # None: strict


@dataclass(frozen=True)
class Variant:
    name: str
    backends: dict[str, str]  # a full plan: operator -> backend
    spec: str  # as written, for tables
    fallback: str | None = None
    dtype: str | None = None  # None: the model's dtype
    overrides: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    cuda_graph: bool = False  # decode steps replayed from a CUDA graph


@dataclass(frozen=True)
class AblationConfig:
    name: str
    reference: str
    model: ModelSpec
    workload: WorkloadSpec
    run: RunSpec
    variants: tuple[Variant, ...]
    description: str = ""
    path: str | None = None  # None for configs built in code
    source: str = ""  # the TOML text, stored with the results

    def variant(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name:
                return v
        raise KeyError(name)

    def model_config(self, variant: Variant | None = None) -> Qwen25VLConfig:
        """The architecture a variant runs: preset or checkpoint config, then [model] and variant overrides."""
        base = get_preset(self.model.preset) if self.model.preset else load_hf_config(self.model.checkpoint)
        overrides = {**self.model.overrides, **(variant.overrides if variant else {})}
        return base.with_overrides(overrides) if overrides else base

    def dtype_of(self, variant: Variant) -> str:
        return variant.dtype or self.model.dtype

    def to_dict(self) -> dict[str, Any]:
        def plain(obj):
            if hasattr(obj, "__dataclass_fields__"):
                return {f.name: plain(getattr(obj, f.name)) for f in fields(obj)}
            if isinstance(obj, (list, tuple)):
                return [plain(x) for x in obj]
            if isinstance(obj, dict):
                return {k: plain(v) for k, v in obj.items()}
            return obj

        out = plain(self)
        out.pop("source")
        return out


# --- checking values -----------------------------------------------------------------------------------------------


class _Where:
    """Where a value sits, for messages: ``path: [workload] images[1]: size``."""

    def __init__(self, path: str, section: str = ""):
        self.path, self.section = path, section

    def error(self, key: str, message: str) -> ConfigError:
        place = " ".join(p for p in (self.section, key) if p)
        return ConfigError(f"{self.path}: {place}: {message}" if place else f"{self.path}: {message}")

    def keys(self, table: Any, allowed: dict[str, str], what: str, required: tuple[str, ...] = ()) -> dict:
        if not isinstance(table, dict):
            raise self.error(what, f"must be a table, got {_show(table)}")
        for key in table:
            if key not in allowed:
                listing = "; ".join(f"{k} ({d})" for k, d in allowed.items())
                raise self.error(_join(what, key), f"unknown key; allowed keys: {listing}")
        for key in required:
            if key not in table:
                raise self.error(_join(what, key), f"is required ({allowed[key]})")
        return table


def _join(what: str, key: str) -> str:
    return f"{what}: {key}" if what else key


def _show(value: Any) -> str:
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, str):
        return repr(value)
    return str(value).replace("True", "true").replace("False", "false")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int(where: _Where, key: str, v: Any, minimum: int | None = None) -> int:
    if not _is_int(v) or (minimum is not None and v < minimum):
        rule = "an integer" + (f" >= {minimum}" if minimum is not None else "")
        raise where.error(key, f"must be {rule}, got {_show(v)}")
    return v


def _positive_float(where: _Where, key: str, v: Any) -> float:
    if not (isinstance(v, (int, float)) and not isinstance(v, bool)) or not v > 0:
        raise where.error(key, f"must be a positive number, got {_show(v)}")
    return float(v)


def _str(where: _Where, key: str, v: Any) -> str:
    if not isinstance(v, str):
        raise where.error(key, f"must be a string, got {_show(v)}")
    return v


def _choice(where: _Where, key: str, v: Any, choices) -> str:
    if not isinstance(v, str) or v not in choices:
        raise where.error(key, f"must be one of {', '.join(choices)}; got {_show(v)}")
    return v


def _size(where: _Where, key: str, v: Any) -> tuple[int, int]:
    if not (isinstance(v, list) and len(v) == 2 and all(_is_int(x) and x > 0 for x in v)):
        raise where.error(key, f"size must be [height, width] of positive ints, got {_show(v)}")
    return int(v[0]), int(v[1])


def _resolve_path(base_dir: str, p: str) -> str:
    p = os.path.expanduser(p)
    return os.path.normpath(p if os.path.isabs(p) else os.path.join(base_dir, p))


def _device(where: _Where, key: str, v: Any) -> str:
    if not isinstance(v, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", v):
        raise where.error(key, f"must be auto, cpu, cuda or cuda:N; got {_show(v)}")
    return v


def _fallback(where: _Where, key: str, v: Any) -> str | None:
    allowed = [STRICT] + _backend_choices(include_auto=False)
    name = _choice(where, key, v, allowed)
    return None if name == STRICT else name


def _backend_choices(include_auto: bool = True) -> list[str]:
    names = list(dict.fromkeys(list(KNOWN_BACKENDS) + backend_names()))
    return names + (["auto"] if include_auto else [])


def _backends(where: _Where, key: str, v: Any) -> tuple[dict[str, str], str]:
    """A backend spec -> (a full plan: every operator named, unnamed ones on eager, the spec as written)."""
    if isinstance(v, str) and not v.strip():
        raise where.error(key, "must name a backend, e.g. \"eager\" or \"attention=triton,norm=eager\"")
    if not isinstance(v, (str, dict)) or (isinstance(v, dict) and not all(isinstance(x, str) for x in v.values())):
        raise where.error(key, f"must be a backend name, an \"operator=backend,...\" string or a table; got {_show(v)}")
    try:  # the registry's own parser: the same spellings and names as everywhere else
        mapping = parse_spec(v, source="backends")
    except ValueError as e:
        raise where.error(key, str(e).removeprefix("backends: ")) from None
    spec = v if isinstance(v, str) else ",".join(f"{op}={name}" for op, name in v.items())
    full = {op: "eager" for op in OPERATORS}
    full.update(mapping)
    return full, spec


# --- architecture overrides ---------------------------------------------------------------------------------------

_OVERRIDE_CLASSES = {"text": TextConfig, "vision": VisionConfig, "": Qwen25VLConfig}


def _flatten(table: dict, prefix: str = "") -> dict[str, Any]:
    """{"vision": {"window_size": 56}} and {"vision.window_size": 56} both -> {"vision.window_size": 56}."""
    out = {}
    for k, v in table.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _overrides(where: _Where, key: str, v: Any) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise where.error(key, f"must be a table of dotted config fields, e.g. "
                               f"{{ \"vision.window_size\" = 112 }}; got {_show(v)}")
    out = {}
    for name, value in _flatten(v).items():
        part, _, leaf = name.rpartition(".")
        cls = _OVERRIDE_CLASSES.get(part)
        here = f"{key}: {name}"
        if cls is None:
            raise where.error(here, "unknown config section; use text.<field>, vision.<field> or a top-level field")
        types = {f.name: f.type for f in fields(cls) if f.name not in ("text", "vision")}
        if leaf not in types:
            raise where.error(here, f"unknown field; {part or 'top-level'} fields: {', '.join(sorted(types))}")
        out[name] = _coerce_field(where, here, types[leaf], value)
    return out


def _coerce_field(where: _Where, key: str, type_text: Any, value: Any) -> Any:
    if not isinstance(type_text, str):  # a real annotation rather than a postponed one
        type_text = getattr(type_text, "__name__", str(type_text))
    if type_text.startswith("tuple"):
        if not (isinstance(value, list) and all(_is_int(x) for x in value)):
            raise where.error(key, f"must be a list of integers, got {_show(value)}")
        return tuple(value)
    if type_text == "bool":
        if not isinstance(value, bool):
            raise where.error(key, f"must be true or false, got {_show(value)}")
        return value
    if type_text == "float":
        if not (isinstance(value, (int, float)) and not isinstance(value, bool)):
            raise where.error(key, f"must be a number, got {_show(value)}")
        return float(value)
    if not _is_int(value):  # int and int | None (TOML has no null)
        raise where.error(key, f"must be an integer, got {_show(value)}")
    return value


# --- the schema ---------------------------------------------------------------------------------------------------

TOP_KEYS = {"name": "results folder name", "description": "free text", "reference": "a variant name",
            "model": "table", "workload": "table", "run": "table", "variants": "array of tables"}
MODEL_KEYS = {"preset": f"one of {', '.join(PRESETS)}", "checkpoint": "an HF-format checkpoint directory",
              "dtype": ", ".join(DTYPES), "device": "auto, cpu, cuda or cuda:N", "seed": "integer",
              "overrides": "table of dotted config fields"}
WORKLOAD_KEYS = {"images": "array of {size = [h, w]} or {file = path}",
                 "videos": "array of {size = [h, w], frames = n, fps = x}", "prompt_tokens": "integer >= 0",
                 "decode_tokens": "integer >= 1", "batch_size": "integer >= 1", "seed": "integer",
                 "min_pixels": "integer >= 1", "max_pixels": "integer >= 1"}
IMAGE_KEYS = {"size": "[height, width] in pixels", "file": "an image file (needs Pillow)"}
VIDEO_KEYS = {"size": "[height, width] in pixels", "frames": "integer >= 1", "fps": "positive number"}
RUN_KEYS = {"warmup": "integer >= 0", "repeats": "integer >= 1", "fallback": "none or a backend name"}
VARIANT_KEYS = {"name": "unique string", "backends": "backend spec", "fallback": "none or a backend name",
                "dtype": ", ".join(DTYPES), "overrides": "table of dotted config fields", "description": "free text",
                "cuda_graph": "true or false: decode steps replayed from a CUDA graph (CUDA devices only)"}


def load_config(path: str | os.PathLike) -> AblationConfig:
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror or e}") from None
    text = raw.decode("utf-8", errors="replace")
    stem = os.path.splitext(os.path.basename(path))[0]
    return parse_config(text, path=path, default_name=stem)


def parse_config(text: str, *, path: str = "<config>", default_name: str = "ablation") -> AblationConfig:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    base_dir = os.path.dirname(os.path.abspath(path)) if path != "<config>" else os.getcwd()
    top = _Where(path)
    top.keys(doc, TOP_KEYS, "", required=("reference", "variants"))

    name = _str(top, "name", doc.get("name", default_name))
    if not _NAME_RE.match(name):
        raise top.error("name", f"must be letters, digits, '_', '-' or '.' (it names the results folder); got {name!r}")
    description = _str(top, "description", doc.get("description", ""))

    model = _parse_model(_Where(path, "[model]"), doc.get("model", {}), base_dir)
    workload = _parse_workload(_Where(path, "[workload]"), doc.get("workload", {}), base_dir)
    run = _parse_run(_Where(path, "[run]"), doc.get("run", {}))

    variants_raw = doc["variants"]
    if not isinstance(variants_raw, list) or not variants_raw:
        raise top.error("variants", "must be a non-empty array of tables ([[variants]] blocks)")
    variants, seen = [], set()
    for i, raw_v in enumerate(variants_raw):
        label = raw_v.get("name") if isinstance(raw_v, dict) else None
        w = _Where(path, f"variants[{i}]" + (f" ({label})" if isinstance(label, str) else ""))
        v = _parse_variant(w, raw_v, run)
        if v.name in seen:
            raise w.error("name", f"duplicate variant name {v.name!r}; names must be unique")
        seen.add(v.name)
        variants.append(v)

    reference = doc["reference"]
    if not isinstance(reference, str) or reference not in seen:
        raise top.error("reference", f"must name one of the variants: {', '.join(v.name for v in variants)}; "
                                     f"got {_show(reference)}")
    cfg = AblationConfig(name=name, reference=reference, model=model, workload=workload, run=run,
                         variants=tuple(variants), description=description, path=path, source=text)
    _check_architectures(cfg, path)
    return cfg


def _parse_model(w: _Where, t: Any, base_dir: str) -> ModelSpec:
    w.keys(t, MODEL_KEYS, "")
    if "preset" in t and "checkpoint" in t:
        raise w.error("checkpoint", "give either preset or checkpoint, not both")
    preset, checkpoint = "tiny", None
    if "checkpoint" in t:
        preset = None
        checkpoint = _resolve_path(base_dir, _str(w, "checkpoint", t["checkpoint"]))
        if not os.path.isfile(os.path.join(checkpoint, "config.json")):
            raise w.error("checkpoint", f"no config.json in {checkpoint!r} (relative paths start at the config "
                                        "file's folder)")
    elif "preset" in t:
        preset = _choice(w, "preset", t["preset"], list(PRESETS))
    return ModelSpec(preset=preset, checkpoint=checkpoint,
                     dtype=_choice(w, "dtype", t.get("dtype", "float32"), list(DTYPES)),
                     device=_device(w, "device", t.get("device", "auto")),
                     seed=_int(w, "seed", t.get("seed", 0)),
                     overrides=_overrides(w, "overrides", t.get("overrides", {})))


def _parse_workload(w: _Where, t: Any, base_dir: str) -> WorkloadSpec:
    w.keys(t, WORKLOAD_KEYS, "")
    images = []
    raw_images = t.get("images", [])
    if not isinstance(raw_images, list):
        raise w.error("images", "must be an array of tables, e.g. [{ size = [224, 224] }]")
    for i, item in enumerate(raw_images):
        key = f"images[{i}]"
        w.keys(item, IMAGE_KEYS, key)
        if ("size" in item) == ("file" in item):
            raise w.error(key, "give exactly one of size = [height, width] or file = \"path\"")
        if "size" in item:
            images.append(ImageSpec(size=_size(w, key, item["size"])))
        else:
            file = _resolve_path(base_dir, _str(w, f"{key}: file", item["file"]))
            if not os.path.isfile(file):
                raise w.error(f"{key}: file", f"no such file {file!r} (relative paths start at the config file's folder)")
            images.append(ImageSpec(file=file))
    videos = []
    raw_videos = t.get("videos", [])
    if not isinstance(raw_videos, list):
        raise w.error("videos", "must be an array of tables, e.g. [{ size = [224, 224], frames = 8 }]")
    for i, item in enumerate(raw_videos):
        key = f"videos[{i}]"
        w.keys(item, VIDEO_KEYS, key, required=("size", "frames"))
        videos.append(VideoSpec(size=_size(w, key, item["size"]), frames=_int(w, f"{key}: frames", item["frames"], 1),
                                fps=_positive_float(w, f"{key}: fps", item.get("fps", 2.0))))
    spec = WorkloadSpec(
        images=tuple(images), videos=tuple(videos),
        prompt_tokens=_int(w, "prompt_tokens", t.get("prompt_tokens", WorkloadSpec.prompt_tokens), 0),
        decode_tokens=_int(w, "decode_tokens", t.get("decode_tokens", WorkloadSpec.decode_tokens), 1),
        batch_size=_int(w, "batch_size", t.get("batch_size", 1), 1),
        seed=_int(w, "seed", t.get("seed", 0)),
        min_pixels=_int(w, "min_pixels", t.get("min_pixels", MIN_PIXELS), 1),
        max_pixels=_int(w, "max_pixels", t.get("max_pixels", MAX_PIXELS), 1),
    )
    if spec.min_pixels > spec.max_pixels:
        raise w.error("min_pixels", f"must be <= max_pixels ({spec.max_pixels}), got {spec.min_pixels}")
    if spec.prompt_tokens == 0 and not images and not videos:
        raise w.error("prompt_tokens", "must be >= 1 when the workload has no images or videos")
    return spec


def _parse_run(w: _Where, t: Any) -> RunSpec:
    w.keys(t, RUN_KEYS, "")
    repeats = t.get("repeats")
    return RunSpec(warmup=_int(w, "warmup", t.get("warmup", 1), 0),
                   repeats=None if repeats is None else _int(w, "repeats", repeats, 1),
                   fallback=_fallback(w, "fallback", t.get("fallback", STRICT)))


def _parse_variant(w: _Where, t: Any, run: RunSpec) -> Variant:
    w.keys(t, VARIANT_KEYS, "", required=("name",))
    name = _str(w, "name", t["name"]).strip()
    if not name:
        raise w.error("name", "must not be empty")
    backends, spec = _backends(w, "backends", t.get("backends", "eager"))
    fallback = _fallback(w, "fallback", t["fallback"]) if "fallback" in t else run.fallback
    dtype = _choice(w, "dtype", t["dtype"], list(DTYPES)) if "dtype" in t else None
    cuda_graph = t.get("cuda_graph", False)
    if not isinstance(cuda_graph, bool):
        raise w.error("cuda_graph", f"must be true or false, got {_show(cuda_graph)}")
    return Variant(name=name, backends=backends, spec=spec, fallback=fallback, dtype=dtype,
                   overrides=_overrides(w, "overrides", t.get("overrides", {})),
                   description=_str(w, "description", t.get("description", "")), cuda_graph=cuda_graph)


def with_preset(config: AblationConfig, preset: str) -> AblationConfig:
    """The same ablation on another preset (e.g. a CPU-sized config run at 3b on a GPU)."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
    new = replace(config, model=replace(config.model, preset=preset, checkpoint=None))
    _check_architectures(new, config.path or "<config>")
    return new


def with_dtype(config: AblationConfig, dtype: str) -> AblationConfig:
    """The same ablation with another model dtype (variants that set their own dtype keep it)."""
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; dtypes: {', '.join(DTYPES)}")
    return replace(config, model=replace(config.model, dtype=dtype))


def _check_architectures(cfg: AblationConfig, path: str) -> None:
    """Apply every override to the model's config now, so contradictions fail before anything runs."""
    try:
        base = cfg.model_config()
    except ValueError as e:
        raise _Where(path, "[model]").error("overrides", str(e)) from None
    for i, v in enumerate(cfg.variants):
        if v.overrides:
            try:
                base.with_overrides(v.overrides)
            except ValueError as e:
                raise _Where(path, f"variants[{i}] ({v.name})").error("overrides", str(e)) from None


__all__ = ["AblationConfig", "ConfigError", "ImageSpec", "ModelSpec", "RunSpec", "Variant", "VideoSpec",
           "WorkloadSpec", "DTYPES", "load_config", "parse_config", "with_dtype", "with_preset",
           "tomllib"]
