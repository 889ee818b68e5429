"""Ablation configs (``ablations/*.toml``): the schema, parsing and validation.

The schema is the dataclasses below, written once: every TOML key is a field with its type, default, help
and rules (`qvl.ablate.schema.key`). The top level is `AblationConfig`, ``[model]`` `ModelSpec`,
``[workload]`` `WorkloadSpec` (its ``images`` and ``videos`` entries `ImageSpec` and `VideoSpec`), ``[run]``
`RunSpec`, each ``[[variants]]`` block a `Variant`. Parsing (`qvl.ablate.schema.parse_table`), the reference
tables in ablations/README.md (`schema_markdown`) and the effective config ``qvl ablate --check`` prints
(`config_toml`) all derive from them; ablations/README.md also has a worked example.

A config is read with ``tomllib``; nothing in it is ever evaluated. Every mistake is a `ConfigError` naming the
file, the key and what is allowed, e.g.
``ablations/x.toml: [workload] images[1]: size must be [height, width] of positive ints, got [224]``.
"""

from __future__ import annotations

import os
import re
import unicodedata
from dataclasses import dataclass, fields, replace
from typing import Any, ClassVar

from ..backends import OPERATORS, backend_names, parse_spec
from ..config import PRESETS, Qwen25VLConfig, TextConfig, VisionConfig, get_preset, load_hf_config
from ..dtypes import DTYPES
from ..errors import QvlError
from ..files import read_text
from ..model.inputs import SEED_RANGE, is_seed
from ..parallel.shard import check_degree
from .schema import (
    At,
    ConfigError,
    OneOf,
    check_value,
    internal,
    is_int,
    key,
    markdown,
    parse_table,
    show_value,
    to_toml,
    toml_fields,
)

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib

STRICT = "none"  # the fallback that means: a call the chosen backend cannot run fails
GENERATE, TRAIN = "generate", "train"  # [run] mode: what is measured
MODES = (GENERATE, TRAIN)
# Qwen2.5-VL's preprocessor_config.json bounds on resized image area (pixels).
MIN_PIXELS = 56 * 56
MAX_PIXELS = 12845056
SIZE_TEXT = "[height, width] of positive ints"
# The longest file name Linux, macOS and Windows filesystems take, in bytes (NAME_MAX): the config's name names its
# results folder, and a variant's name is held to the same length.
NAME_BYTES = 255
FOLDER_NAME, FOLDER_NAME_TEXT = r"[A-Za-z0-9][A-Za-z0-9_.-]*", "letters, digits, '_', '-' or '.'"
# characters a name must not hold: control characters (a newline, an escape sequence), line and paragraph
# separators (each breaks a table row or a one-line message) and lone surrogates (not writable as UTF-8)
NOT_IN_NAMES = ("Cc", "Cs", "Zl", "Zp")


# --- values no plain type describes: each parses (value, where, key) to the stored value ---------------------------


def _size(value: Any, at: At, key: str) -> tuple[int, int]:
    # placed at the entry, not the key: "images[1]: size must be [height, width] ..." reads as one phrase
    if not (isinstance(value, list) and len(value) == 2 and all(is_int(x) and x > 0 for x in value)):
        raise at.error("", f"{key} must be {SIZE_TEXT}, got {show_value(value)}")
    return value[0], value[1]


def _seed(value: Any, at: At, key: str) -> int:
    """A seed torch.Generator.manual_seed takes (`is_seed`), checked here rather than when inputs are built."""
    if not is_seed(value):
        rule = f" in {SEED_RANGE}" if is_int(value) else ""
        raise at.error(key, f"must be an integer{rule}, got {show_value(value)}")
    return value


def _check_length(name: str, at: At, key: str) -> None:
    size = len(name.encode("utf-8"))
    if size > NAME_BYTES:
        raise at.error(key, f"must be at most {NAME_BYTES} bytes in UTF-8 (the longest file name), got {size}: "
                            f"{show_value(name)}")


def _folder_name(value: Any, at: At, key: str) -> str:
    """The config's name, which names its results folder: `FOLDER_NAME`'s characters, at most NAME_BYTES."""
    if not isinstance(value, str) or not re.fullmatch(FOLDER_NAME, value):
        raise at.error(key, f"must be {FOLDER_NAME_TEXT} (it names the results folder); got {show_value(value)}")
    _check_length(value, at, key)
    return value


def _name(value: Any, at: At, key: str) -> str:
    """A variant's name, shown in tables and one-line messages: a non-empty string (spaces around it dropped) of
    at most NAME_BYTES in UTF-8, without control characters or line breaks (`NOT_IN_NAMES`)."""
    if not isinstance(value, str):
        raise at.error(key, f"must be a string, got {show_value(value)}")
    value = value.strip()
    if not value:
        raise at.error(key, "must not be empty")
    bad = next((c for c in value if unicodedata.category(c) in NOT_IN_NAMES), None)
    if bad is not None:
        raise at.error(key, f"must not hold control characters or line breaks, got {ascii(bad)} in "
                            f"{show_value(value)}")
    _check_length(value, at, key)
    return value


def _path(value: Any, at: At, key: str) -> str:
    """A path as written (``~`` expanded), made absolute from the config file's folder."""
    if not isinstance(value, str):
        raise at.error(key, f"must be a string, got {show_value(value)}")
    p = os.path.expanduser(value)
    return os.path.normpath(p if os.path.isabs(p) else os.path.join(at.base_dir, p))


def _image_file(value: Any, at: At, key: str) -> str:
    file = _path(value, at, key)
    if not os.path.isfile(file):
        raise at.error(key, f"no such file {file!r} (relative paths start at the config file's folder)")
    return file


def _checkpoint_dir(value: Any, at: At, key: str) -> str:
    checkpoint = _path(value, at, key)
    if not os.path.isfile(os.path.join(checkpoint, "config.json")):
        raise at.error(key, f"no config.json in {checkpoint!r} (relative paths start at the config file's folder)")
    return checkpoint


def _backends(value: Any, at: At, key: str) -> dict[str, str]:
    """A backend spec -> a full plan: every operator named, the unnamed ones on eager."""
    if isinstance(value, str) and not value.strip():
        raise at.error(key, "must name a backend, e.g. \"eager\" or \"attention=triton,norm=eager\"")
    if not isinstance(value, (str, dict)) or (isinstance(value, dict)
                                              and not all(isinstance(x, str) for x in value.values())):
        raise at.error(key, f"must be a backend name, an \"operator=backend,...\" string or a table; "
                            f"got {show_value(value)}")
    try:  # the registry's own parser: the same spellings and names as everywhere else
        mapping = parse_spec(value, source="backends")
    except ValueError as e:
        raise at.error(key, str(e).removeprefix("backends: ")) from None
    return {op: "eager" for op in OPERATORS} | mapping


def _spec_text(value: str | dict[str, str]) -> str:
    """A backend spec as written, for tables: the string itself, or a table as ``op=backend,...``."""
    return value if isinstance(value, str) else ",".join(f"{op}={name}" for op, name in value.items())


_OVERRIDE_CLASSES = {"text": TextConfig, "vision": VisionConfig, "": Qwen25VLConfig}


def _flatten(table: dict, prefix: str = "") -> dict[str, Any]:
    """{"vision": {"window_size": 56}} and {"vision.window_size": 56} both -> {"vision.window_size": 56}."""
    out = {}
    for k, v in table.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _overrides(value: Any, at: At, key: str) -> dict[str, Any]:
    """Dotted Qwen25VLConfig fields, each checked against that field's own type."""
    if not isinstance(value, dict):
        raise at.error(key, f"must be a table of dotted config fields, e.g. {{ \"vision.window_size\" = 112 }}; "
                            f"got {show_value(value)}")
    out = {}
    for name, v in _flatten(value).items():
        part, _, leaf = name.rpartition(".")
        cls = _OVERRIDE_CLASSES.get(part)
        here = f"{key}: {name}"
        if cls is None:
            raise at.error(here, "unknown config section; use text.<field>, vision.<field> or a top-level field")
        types = {n: tp for n, (_, tp) in toml_fields(cls).items() if n not in ("text", "vision")}
        if leaf not in types:
            raise at.error(here, f"unknown field; {part or 'top-level'} fields: {', '.join(sorted(types))}")
        out[name] = check_value(types[leaf], {}, v, at, here)
    return out


OVERRIDES_TEXT = "table of dotted config fields"
SEED_TYPE = f"integer in `{SEED_RANGE}`"  # torch.Generator.manual_seed's range
NAME_TEXT = f"non-empty string of at most {NAME_BYTES} bytes, no control characters"
# a fallback key: "none" (strict) or a backend for the calls a variant's own backends cannot run
FALLBACK = {"choices": lambda: [STRICT, *backend_names()], "store": lambda name: None if name == STRICT else name,
            "show": lambda spec: spec.fallback or STRICT}


# --- the schema ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageSpec:
    """One entry of `images`: an image by size (pixels synthesized from the workload's seed) or by file; either is
    resized like the Qwen processor."""

    exclusive: ClassVar[tuple[OneOf, ...]] = (OneOf(("size", "file"), required=True),)
    size: tuple[int, int] | None = key(None, "height and width in pixels, before the processor's resize",
                                       parse=_size, type_text=SIZE_TEXT)
    file: str | None = key(None, "an image file (needs Pillow); a relative path starts at the config file's folder",
                           parse=_image_file, type_text="path of an image file")  # stored absolute

    def describe(self) -> str:
        return f"{self.size[0]}x{self.size[1]}" if self.size else os.path.basename(self.file or "")


@dataclass(frozen=True)
class VideoSpec:
    """One entry of `videos`: a synthesized video."""

    size: tuple[int, int] = key(help="height and width of every frame in pixels", parse=_size, type_text=SIZE_TEXT)
    frames: int = key(help="number of frames", minimum=1)
    fps: float = key(2.0, "frames per second (sets the temporal positions)", above=0)

    def describe(self) -> str:
        return f"{self.frames} frames {self.size[0]}x{self.size[1]} @ {self.fps:g} fps"


@dataclass(frozen=True)
class WorkloadSpec:
    """The prompt every variant runs: images, videos and text, then greedy decoding (generate mode); in train mode
    the batch of every training step, its labels the prompt's own tokens."""

    images: tuple[ImageSpec, ...] = key(
        (), "images in the prompt, e.g. `[{ size = [224, 336] }, { file = \"cat.png\" }]`")
    videos: tuple[VideoSpec, ...] = key(
        (), "videos in the prompt, e.g. `[{ size = [224, 224], frames = 8, fps = 2.0 }]`")
    prompt_tokens: int = key(
        16, "text tokens around the vision placeholders (>= 1 without images or videos)", minimum=0)
    decode_tokens: int = key(8, "generate mode only: new tokens, greedy (the first comes from the prefill)",
                             minimum=1)
    batch_size: int = key(1, "prompts per batch (the same prompt repeated)", minimum=1)
    seed: int = key(0, "seed of the prompt text and the synthesized pixels", parse=_seed, type_text=SEED_TYPE)
    min_pixels: int = key(MIN_PIXELS, "the processor's lower bound on a resized image's area", minimum=1)
    max_pixels: int = key(MAX_PIXELS, "the processor's upper bound on a resized image's area", minimum=1)

    @classmethod
    def finish_parse(cls, values: dict[str, Any], raw: dict, at: At) -> None:
        if values["min_pixels"] > values["max_pixels"]:
            raise at.error("min_pixels", f"must be <= max_pixels ({values['max_pixels']}), got {values['min_pixels']}")
        if values["prompt_tokens"] == 0 and not values["images"] and not values["videos"]:
            raise at.error("prompt_tokens", "must be >= 1 when the workload has no images or videos")


@dataclass(frozen=True)
class ModelSpec:
    """The model every variant starts from: a preset (random weights) or a checkpoint."""

    exclusive: ClassVar[tuple[OneOf, ...]] = (OneOf(("preset", "checkpoint")),)
    preset: str | None = key("tiny", "a preset architecture, with random weights", choices=PRESETS)
    checkpoint: str | None = key(
        None, "an HF-format checkpoint directory (instead of preset); a relative path starts at the config file's "
              "folder", parse=_checkpoint_dir, type_text="path of a directory")  # stored absolute
    dtype: str = key("float32", "the weights' and activations' dtype (a variant may set its own)", choices=DTYPES)
    device: str = key("auto", "`auto`: cuda if present, else cpu",
                      pattern=(r"auto|cpu|cuda(:\d+)?", "auto, cpu, cuda or cuda:N"))
    seed: int = key(0, "weight seed for presets", parse=_seed, type_text=SEED_TYPE)
    overrides: dict[str, Any] = key(
        {}, "architecture overrides for every variant, e.g. `{ \"vision.window_size\" = 112 }`", parse=_overrides,
        type_text=OVERRIDES_TEXT)
    tp: int = key(1, "tensor-parallel degree: every model split over this many ranks (local worker processes, or "
                     "torchrun's, whose WORLD_SIZE it must equal); in train mode rank 0 gathers the gradients whole "
                     "to compare them", minimum=1)

    @classmethod
    def finish_parse(cls, values: dict[str, Any], raw: dict, at: At) -> None:
        if "checkpoint" in raw:
            values["preset"] = None

    def describe(self) -> str:
        return f"preset {self.preset}" if self.preset else f"checkpoint {self.checkpoint}"


@dataclass(frozen=True)
class RunSpec:
    """How each variant is measured."""

    warmup: int = key(1, "untimed runs per variant before the timed ones", minimum=0)
    repeats: int | None = key(None, "timed runs per variant", minimum=1, default_text="3 on a CPU, 10 on a GPU")
    fallback: str | None = key(
        None, "`none`: strict, a call a variant's backends cannot run fails the variant; a backend: such calls run "
              "there and are listed as fallbacks", toml_default=STRICT, **FALLBACK)  # None: strict
    mode: str = key(GENERATE, "`generate`: prefill and greedy decoding are timed, logits compared; `train`: forward + "
                              "backward with labels is timed, gradients compared, a loss curve drawn", choices=MODES)
    train_steps: int = key(8, "train mode only: AdamW steps of the loss curve, from the same initial weights for "
                              "every variant", minimum=1)
    learning_rate: float = key(1e-4, "train mode only: AdamW's learning rate (torch's other defaults)", above=0)


@dataclass(frozen=True)
class Variant:
    """One variant: backends, dtype and architecture overrides; every figure is compared with the reference's."""

    name: str = key(help="unique; names the variant in tables and plots", parse=_name, type_text=NAME_TEXT)
    backends: dict[str, str] = key(help="a backend for every operator (`\"triton\"`), per operator "
                                        "(`\"attention=triton,norm=eager\"`, unnamed operators on eager), both "
                                        "(`\"triton,mlp=triton-gemm\"`) or a table (`{ attention = \"triton\" }`)",
                                   parse=_backends, toml_default="eager", type_text="backend spec",
                                   show=lambda v: v.spec)  # stored as a full plan: operator -> backend
    spec: str = internal()  # the backends as written, for tables
    fallback: str | None = key(None, "as `[run] fallback`, for this variant", default_text="[run] fallback",
                               **FALLBACK)  # None: strict
    dtype: str | None = key(None, "the variant's dtype (the model's weights cast to it)", choices=DTYPES,
                            default_text="[model] dtype")
    overrides: dict[str, Any] = key({}, "architecture overrides on top of [model] overrides", parse=_overrides,
                                    type_text=OVERRIDES_TEXT)
    description: str = key("", "free text, shown in reports")
    cuda_graph: bool = key(False, "generate mode only: the vision tower, the prefill and decode steps replayed from "
                                  "CUDA graphs (CUDA devices only; `qvl.model.graphs`)")
    gradient_checkpointing: bool = key(False, "train mode only: recompute each decoder layer and vision block in "
                                              "the backward instead of keeping its activations")

    @classmethod
    def finish_parse(cls, values: dict[str, Any], raw: dict, at: At) -> None:
        values["spec"] = _spec_text(raw.get("backends", "eager"))


@dataclass(frozen=True)
class AblationConfig:
    """The top level of a config file."""

    name: str = key(help="the results folder's name", default_text="the file's name", parse=_folder_name,
                    type_text=f"{FOLDER_NAME_TEXT}, at most {NAME_BYTES} of them")
    reference: str = key(help="the variant every other one is compared with", type_text="a variant's name")
    model: ModelSpec = key(help="see [model]")
    workload: WorkloadSpec = key(help="see [workload]")
    run: RunSpec = key(help="see [run]")
    variants: tuple[Variant, ...] = key(help="see [[variants]]; measured in order, the reference first",
                                        minimum=1)
    description: str = key("", "free text, shown in reports")
    path: str | None = internal(None)  # None for configs built in code
    source: str = internal("")  # the TOML text, stored with the results

    @classmethod
    def finish_parse(cls, values: dict[str, Any], raw: dict, at: At) -> None:
        names: list[str] = []
        for i, (variant, written) in enumerate(zip(values["variants"], raw["variants"], strict=True)):
            if variant.name in names:
                raise at.item("variants", i, written).error(
                    "name", f"duplicate variant name {variant.name!r}; names must be unique")
            names.append(variant.name)
        if values["reference"] not in names:
            raise at.error("reference", f"must name one of the variants: {', '.join(names)}; "
                                        f"got {show_value(values['reference'])}")
        run = values["run"]  # a variant without its own fallback takes [run]'s
        values["variants"] = tuple(v if "fallback" in written else replace(v, fallback=run.fallback)
                                   for v, written in zip(values["variants"], raw["variants"], strict=True))
        _check_mode_keys(values, raw, at)

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


# the keys that mean something in one [run] mode only, as (section, key): help texts say so too
MODE_ONLY = {TRAIN: (("run", "train_steps"), ("run", "learning_rate"), ("variants", "gradient_checkpointing")),
             GENERATE: (("workload", "decode_tokens"), ("variants", "cuda_graph"))}
SECTION_SPECS = {"run": RunSpec, "workload": WorkloadSpec, "variants": Variant}


def _check_mode_keys(values: dict[str, Any], raw: dict, at: At) -> None:
    """A key of the other mode set to anything but its default would be silently ignored: an error. Its default
    is accepted, so `config_toml`'s output (every default written out) parses back."""
    mode = values["run"].mode
    for other, keys in MODE_ONLY.items():
        if other == mode:
            continue
        for section, name in keys:
            spec = SECTION_SPECS[section]
            default = toml_fields(spec)[name][0].default
            why = (f"only used when [run] mode = {show_value(other)}; this config's mode is {show_value(mode)} "
                   f"(leave it out, or at its default {show_value(default)})")
            if section == "variants":
                for i, (v, written) in enumerate(zip(values["variants"], raw["variants"], strict=True)):
                    if getattr(v, name) != default:
                        raise at.item("variants", i, written).error(name, why)
            elif getattr(values[section], name) != default:
                raise at.table(section).error(name, why)


# --- loading ------------------------------------------------------------------------------------------------------


MAX_CONFIG_BYTES = 1 << 20  # a config is a page of TOML; anything far larger is not one


def load_config(path: str | os.PathLike) -> AblationConfig:
    path = os.fspath(path)
    text = read_text(path, error=ConfigError, max_bytes=MAX_CONFIG_BYTES)  # TOML is UTF-8
    text = text.removeprefix("\ufeff")  # a byte-order mark, as Windows editors write one: tomllib refuses it
    stem = os.path.splitext(os.path.basename(path))[0]
    return parse_config(text, path=path, default_name=stem)


def parse_config(text: str, *, path: str = "<config>", default_name: str = "ablation") -> AblationConfig:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    except RecursionError:  # tomllib recurses per nested array or inline table
        raise ConfigError(f"{path}: not valid TOML: arrays or tables nested too deeply") from None
    base_dir = os.path.dirname(os.path.abspath(path)) if path != "<config>" else os.getcwd()
    cfg = parse_table(AblationConfig, doc, At(path, base_dir), defaults={"name": default_name})
    cfg = replace(cfg, path=path, source=text)
    _check_architectures(cfg, path)
    return cfg


def check_key(spec: type, name: str, value: Any, where: str) -> Any:
    """A value given outside a config (an argument such as ``--repeats``) checked by the rule of `spec`'s key
    `name`, so an argument and the TOML key it overrides accept the same values; `where` names it in the
    ConfigError: ``--repeats: must be an integer >= 1, got 0``."""
    f, tp = toml_fields(spec)[name]
    return check_value(tp, f.metadata, value, At(where), "")


def with_preset(config: AblationConfig, preset: str) -> AblationConfig:
    """The same ablation on another preset (e.g. a CPU-sized config run at 3b on a GPU)."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
    new = replace(config, model=replace(config.model, preset=preset, checkpoint=None))
    _check_architectures(new, config.path or "<config>")
    return new


def with_tp(config: AblationConfig, tp: int) -> AblationConfig:
    """The same ablation at another tensor-parallel degree (``--tp``), checked as `[model] tp` is."""
    tp = check_key(ModelSpec, "tp", tp, "--tp")
    new = replace(config, model=replace(config.model, tp=tp))
    _check_tp(new, "--tp")
    return new


def with_dtype(config: AblationConfig, dtype: str) -> AblationConfig:
    """The same ablation with another model dtype (variants that set their own dtype keep it)."""
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; dtypes: {', '.join(DTYPES)}")
    return replace(config, model=replace(config.model, dtype=dtype))


def _check_architectures(cfg: AblationConfig, path: str) -> None:
    """Apply every override to the model's config now, so contradictions fail before anything runs."""
    top = At(path)
    try:
        base = cfg.model_config()
    except ValueError as e:
        raise top.table("model").error("overrides", str(e)) from None
    for i, v in enumerate(cfg.variants):
        if v.overrides:
            try:
                base.with_overrides(v.overrides)
            except ValueError as e:
                raise replace(top, section=f"variants[{i}] ({v.name})").error("overrides", str(e)) from None
    _check_tp(cfg, f"{path}: [model] tp")
    _check_workload(cfg, path)


def _check_workload(cfg: AblationConfig, path: str) -> None:
    """The workload against every architecture the variants run (`check_workload`: its seed, the prompt plus
    decode_tokens against max_position_embeddings, the inputs' memory), before anything starts: a run would
    record every variant as failed. A variant is named when its own overrides make the difference."""
    from .workload import check_workload  # workload.py imports this module

    checked = []
    for v in sorted(cfg.variants, key=lambda v: bool(v.overrides)):  # the shared architecture first
        arch = cfg.model_config(v)
        if arch in checked:
            continue
        checked.append(arch)
        try:
            check_workload(cfg.workload, arch)
        except (ValueError, OSError) as e:  # also an image file Pillow cannot read (or no Pillow)
            message = str(e) if str(e).startswith("[workload]") else f"[workload]: {e}"
            whose = f"variant {v.name!r} (its overrides): " if v.overrides else ""
            error = type(e) if isinstance(e, QvlError) else ConfigError
            raise error(f"{path}: {whose}{message}") from None


def _check_tp(cfg: AblationConfig, where: str) -> None:
    """The tensor-parallel degree against every architecture the variants run (`check_degree`:
    heads, KV heads, intermediate size, vocabulary), before anything starts; `where` names the key or flag."""
    tp = cfg.model.tp
    if tp == 1:
        return
    for v in (None, *(v for v in cfg.variants if v.overrides)):
        try:
            check_degree(cfg.model_config(v), tp)
        except ConfigError as e:
            raise ConfigError(f"{where}: " + (f"variant {v.name!r} (its overrides): " if v else "") + str(e)) from None


# --- the schema out: docs and the effective config ----------------------------------------------------------------


def config_toml(config: AblationConfig) -> str:
    """The config as TOML with every default filled in (what `qvl ablate --check` shows); it parses back to
    the same config."""
    return to_toml(config)


def schema_markdown() -> str:
    """The reference tables of ablations/README.md's "The format": one per section (key, type, default, help)."""
    return markdown(AblationConfig)


SCHEMA_BEGIN, SCHEMA_END = "<!-- schema:begin -->", "<!-- schema:end -->"
README = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "ablations",
                      "README.md")


def with_schema_docs(readme: str) -> str:
    """`readme` with the text between its schema markers replaced by `schema_markdown()`."""
    head, begin, rest = readme.partition(SCHEMA_BEGIN)
    _, end, tail = rest.partition(SCHEMA_END)
    if not begin or not end:
        raise ValueError(f"no {SCHEMA_BEGIN} ... {SCHEMA_END} block")
    return f"{head}{SCHEMA_BEGIN}\n\n{schema_markdown()}\n{SCHEMA_END}{tail}"


def write_schema_docs(path: str = README) -> None:
    """Regenerate ablations/README.md's schema tables after a change to the schema."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    with open(path, "w", encoding="utf-8") as f:
        f.write(with_schema_docs(text))


__all__ = ["AblationConfig", "ConfigError", "ImageSpec", "ModelSpec", "RunSpec", "Variant", "VideoSpec",
           "WorkloadSpec", "check_key", "config_toml", "load_config", "parse_config", "schema_markdown", "with_dtype",
           "with_preset", "with_tp", "write_schema_docs", "tomllib"]
