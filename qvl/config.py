"""Model configuration: dataclasses for the two towers, named presets, HF config.json I/O.

The field names follow the published Hugging Face Qwen2.5-VL ``config.json`` so that a
checkpoint's config maps onto these dataclasses one to one. Qwen2-VL checkpoints, whose vision
sizes are named differently (embed_dim, mlp_ratio, hidden_size = the output width), map onto the
same dataclasses with ``vision.model_type = "qwen2_vl"``. Parsing is plain JSON: nothing in a config
is ever evaluated.

Every config is checked before anything is sized from it, and every mistake is a one-line `ConfigError` naming
the file (where there is one), the field and its value. A field's type is its annotation: integer fields take
integers only (not 2.0, as transformers 5's strict configs refuse it, nor true/false), number fields any finite
positive number, booleans only true or false. Sizes are at least 1 and at most MAX_INT; ids and block indexes at
least 0. `validate` then checks what the model code relies on between fields.
"""

from __future__ import annotations

import math
import os
import types
import typing
from dataclasses import dataclass, field, fields, replace
from typing import Any

from .errors import ConfigError
from .files import read_json

# The two vision towers qvl builds, by transformers' model_type. The text decoders are the same.
#   qwen2_5_vl  windowed attention (full attention in fullatt_block_indexes), RMSNorm, gated SiLU MLP
#               (gate/up/down), video frames placed in time by second_per_grid_ts * tokens_per_second
#   qwen2_vl    full attention over each frame in every block, LayerNorm (with bias), plain MLP fc1 -> act -> fc2
#               (hidden_act quick_gelu or gelu), video frames placed by their index
MODEL_TYPES: tuple[str, ...] = ("qwen2_5_vl", "qwen2_vl")
# The activations of each tower's vision MLP (transformers' hidden_act; each is an `mlp` operator activation).
VISION_ACTIVATIONS: dict[str, tuple[str, ...]] = {"qwen2_5_vl": ("silu",), "qwen2_vl": ("quick_gelu", "gelu")}
# Qwen2-VL's vision LayerNorms have a fixed epsilon in transformers (not in its config.json).
QWEN2_VL_NORM_EPS = 1e-6
# The largest size, id or index a config may hold: no model that exists comes near it, and products of such sizes
# stay exact in torch's int64 shapes (a larger value would end in an OverflowError or a torch error, not a message).
MAX_INT = 2**31 - 1
# Integer fields (or entries of integer lists) that may be 0: ids and indexes. Every other integer is a size (>= 1).
_FROM_ZERO = frozenset({"fullatt_block_indexes", "mrope_section", "image_token_id", "video_token_id",
                        "vision_start_token_id", "vision_end_token_id", "bos_token_id", "eos_token_id",
                        "pad_token_id"})


@dataclass(frozen=True)
class VisionConfig:
    """The ViT: patch embedding, windowed/full attention blocks, 2x2 patch merger.

    `model_type` says which tower (MODEL_TYPES); window_size, fullatt_block_indexes and tokens_per_second apply
    to qwen2_5_vl only. `rms_norm_eps` is the epsilon of the vision norms of either kind. Indexes in
    fullatt_block_indexes at or past `depth` name no block and are ignored, as transformers ignores them.
    """

    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 3420
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    out_hidden_size: int = 2048
    tokens_per_second: float = 2.0
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    model_type: str = "qwen2_5_vl"
    hidden_act: str = "silu"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def windowed(self) -> bool:
        """Blocks outside fullatt_block_indexes attend inside windows (Qwen2.5-VL); else all see whole frames."""
        return self.model_type == "qwen2_5_vl"

    @property
    def layer_norm(self) -> bool:
        """The blocks' and the merger's norms are LayerNorms with a bias (Qwen2-VL), not RMSNorms."""
        return self.model_type == "qwen2_vl"

    @property
    def gated_mlp(self) -> bool:
        """The blocks' MLP is SwiGLU over [gate; up] (Qwen2.5-VL), not fc1 -> hidden_act -> fc2."""
        return self.model_type == "qwen2_5_vl"

    @property
    def time_scaled_video(self) -> bool:
        """Video frames sit at second_per_grid_t * tokens_per_second steps in time (Qwen2.5-VL), not at their
        index (Qwen2-VL)."""
        return self.model_type == "qwen2_5_vl"

    @property
    def patch_dim(self) -> int:
        """Length of one flattened (C, T, P, P) patch row of ``pixel_values``."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    def num_parameters(self) -> int:
        """The tower's parameter count, from the sizes alone (what `qvl.checkpoint` allocates)."""
        h, i = self.hidden_size, self.intermediate_size
        norm = 2 * h if self.layer_norm else h  # weight, and a bias in a LayerNorm
        attn = 3 * h * h + 3 * h + h * h + h  # qkv and proj, with biases
        mlp = 3 * h * i + 2 * i + h if self.gated_mlp else 2 * h * i + i + h  # [gate; up] + down, or fc1 + fc2
        unit = h * self.spatial_merge_size**2
        merger = norm + unit * unit + unit + unit * self.out_hidden_size + self.out_hidden_size
        return h * self.patch_dim + self.depth * (2 * norm + attn + mlp) + merger

    def validate(self, names: dict[str, str] | None = None) -> None:
        """Raise `ConfigError` unless the tower can be built; `names` maps "vision.<field>" to the field's name
        in the file it came from (config.json's ``vision_config.embed_dim``), for messages."""
        def n(name: str) -> str:
            return _name(names, "vision." + name)

        _check_fields(self, n)
        _require(self.model_type in MODEL_TYPES,
                 f"{n('model_type')} {self.model_type!r} unknown; valid options are {', '.join(MODEL_TYPES)}")
        _require(self.hidden_size % self.num_heads == 0,
                 f"{n('hidden_size')} ({self.hidden_size}) must be divisible by {n('num_heads')} ({self.num_heads})")
        _require(self.head_dim % 4 == 0, f"the vision head size {n('hidden_size')} / {n('num_heads')} = "
                                         f"{self.head_dim} must be divisible by 4 (2-D rotary over h and w)")
        activations = VISION_ACTIVATIONS[self.model_type]
        _require(self.hidden_act in activations, f"{n('hidden_act')} {self.hidden_act!r} not supported for "
                 f"{self.model_type}; valid options are {', '.join(activations)}")
        if self.windowed:
            unit = self.spatial_merge_size * self.patch_size
            _require(self.window_size % unit == 0,
                     f"{n('window_size')} ({self.window_size}) must be a positive multiple of "
                     f"spatial_merge_size * patch_size ({unit})")
        if self.model_type == "qwen2_vl":
            _require(self.intermediate_size % self.hidden_size == 0,
                     f"{n('intermediate_size')} ({self.intermediate_size}) must be a multiple of {n('hidden_size')} "
                     f"({self.hidden_size}) for qwen2_vl: its config.json stores the ratio (mlp_ratio)")
            _require(self.rms_norm_eps == QWEN2_VL_NORM_EPS,
                     f"{n('rms_norm_eps')} ({self.rms_norm_eps}) must be {QWEN2_VL_NORM_EPS} for qwen2_vl: "
                     "transformers fixes its LayerNorms' epsilon")


@dataclass(frozen=True)
class TextConfig:
    """The Qwen2 decoder with multimodal rotary embedding (M-RoPE)."""

    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 11008
    num_hidden_layers: int = 36
    num_attention_heads: int = 16
    num_key_value_heads: int = 2
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    mrope_section: tuple[int, int, int] = (16, 24, 24)
    max_position_embeddings: int = 128000
    tie_word_embeddings: bool = True

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def num_parameters(self) -> int:
        """The decoder's parameter count (embedding, layers, final norm, and lm_head unless tied)."""
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        qkv = (self.num_attention_heads + 2 * self.num_key_value_heads) * d
        layer = 2 * h + h * qkv + qkv + self.num_attention_heads * d * h + 3 * h * i  # norms, qkv (bias), o, MLP
        heads = 1 if self.tie_word_embeddings else 2
        return heads * self.vocab_size * h + self.num_hidden_layers * layer + h

    def validate(self, names: dict[str, str] | None = None) -> None:
        """Raise `ConfigError` unless the decoder can be built; `names` as in `VisionConfig.validate`."""
        def n(name: str) -> str:
            return _name(names, "text." + name)

        _check_fields(self, n)
        _require(self.hidden_size % self.num_attention_heads == 0,
                 f"{n('hidden_size')} ({self.hidden_size}) must be divisible by {n('num_attention_heads')} "
                 f"({self.num_attention_heads})")
        _require(self.num_attention_heads % self.num_key_value_heads == 0,
                 f"{n('num_attention_heads')} ({self.num_attention_heads}) must be a multiple of "
                 f"{n('num_key_value_heads')} ({self.num_key_value_heads})")
        _require(
            sum(self.mrope_section) * 2 == self.head_dim,
            f"{n('mrope_section')} {tuple(self.mrope_section)} sums to {sum(self.mrope_section)}, "
            f"but must sum to head_dim / 2 = {self.head_dim / 2:g}",
        )


@dataclass(frozen=True)
class Qwen25VLConfig:
    """A Qwen2.5-VL model, or a Qwen2-VL one when ``vision.model_type == "qwen2_vl"`` (see `model_type`)."""

    text: TextConfig = field(default_factory=TextConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    bos_token_id: int = 151643
    eos_token_id: tuple[int, ...] = (151645,)
    pad_token_id: int | None = None

    @property
    def model_type(self) -> str:
        """transformers' model_type of the whole model: the vision tower's (the text decoders are the same)."""
        return self.vision.model_type

    def num_parameters(self) -> int:
        """The model's parameter count, from the config alone: exactly what `qvl.from_config` allocates."""
        return self.text.num_parameters() + self.vision.num_parameters()

    def weight_bytes(self, dtype) -> int:
        """Bytes of the model's weights in `dtype` (a torch dtype), from the config alone."""
        return self.num_parameters() * dtype.itemsize

    def validate(self, names: dict[str, str] | None = None) -> Qwen25VLConfig:
        """Self, once every field and what the model code relies on between them is checked (`ConfigError`
        otherwise); `names` maps qvl's dotted field names to those of the file the config came from."""
        def n(name: str) -> str:
            return _name(names, name)

        _check_fields(self, n)
        self.text.validate(names)
        self.vision.validate(names)
        _require(self.vision.out_hidden_size == self.text.hidden_size,
                 f"{n('vision.out_hidden_size')} ({self.vision.out_hidden_size}) must equal {n('text.hidden_size')} "
                 f"({self.text.hidden_size}): merged patches are placed into the text embedding sequence")
        vocab = self.text.vocab_size
        # The model looks these up (placeholders and vision starts locate images and videos; generation feeds the
        # pad id, else the first eos id, for finished rows): each must be a row of the embedding. bos, other eos
        # and vision_end ids are only compared with tokens (transformers' tester leaves vision_end past its vocab).
        pad = ("pad_token_id", self.pad_token_id) if self.pad_token_id is not None else (
            ("eos_token_id", self.eos_token_id[0]) if self.eos_token_id else None)
        looked_up = [("image_token_id", self.image_token_id), ("video_token_id", self.video_token_id),
                     ("vision_start_token_id", self.vision_start_token_id)] + ([pad] if pad else [])
        for name, tok in looked_up:
            _require(tok < vocab, f"{n(name)} ({tok}) outside the vocabulary ({n('text.vocab_size')} {vocab})")
        marks = (self.image_token_id, self.video_token_id, self.vision_start_token_id)
        _require(len(set(marks)) == 3, f"{n('image_token_id')}, {n('video_token_id')} and "
                                       f"{n('vision_start_token_id')} must differ, got {', '.join(map(str, marks))}")
        return self

    def with_overrides(self, overrides: dict[str, Any]) -> Qwen25VLConfig:
        """Return a copy with dotted overrides applied, e.g. ``{"vision.window_size": 56}``."""
        if not isinstance(overrides, dict):
            raise ConfigError(f"config overrides must be a dict of dotted fields, e.g. {{'vision.window_size': 56}}; "
                              f"got {_show(overrides)}")
        parts: dict[str, dict[str, Any]] = {"text": {}, "vision": {}, "": {}}
        for key, value in overrides.items():
            part, _, name = key.rpartition(".") if isinstance(key, str) else (None, "", "")
            if part not in parts:
                raise ConfigError(f"unknown config override {_show(key)}: use text.<field>, vision.<field> or "
                                  "<field>")
            parts[part][name] = value
        cfg = replace(self, **_coerce(Qwen25VLConfig, parts[""], ""))
        cfg = replace(cfg, text=replace(cfg.text, **_coerce(TextConfig, parts["text"], "text.")))
        cfg = replace(cfg, vision=replace(cfg.vision, **_coerce(VisionConfig, parts["vision"], "vision.")))
        return cfg.validate()


# --- checks ------------------------------------------------------------------------------------------------------


def _invalid(message: str) -> ConfigError:
    return ConfigError(f"invalid Qwen2.5-VL config: {message}")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise _invalid(message)


def _name(names: dict[str, str] | None, key: str) -> str:
    """A field's name for messages: as the file it came from spells it, else qvl's dotted name."""
    return names.get(key, key) if names else key


def _show(value: Any) -> str:
    """A value for a one-line message: its repr, cut short; nested or long lists and objects by their size."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"an integer of {value.bit_length()} bits"
    if isinstance(value, dict):
        return f"an object with {len(value)} key{'s' if len(value) != 1 else ''}"
    if isinstance(value, (list, tuple)):
        if len(value) > 8 or any(isinstance(v, (list, tuple, dict)) for v in value):
            return f"a list of {len(value)} items"
        text = "[" + ", ".join(_show(v) for v in value) + "]"
    else:
        text = repr(value)
    return text if len(text) <= 60 else text[:56] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(value: Any, label: str, least: int | None) -> int:
    """An integer within [least, MAX_INT] (least None: within +-MAX_INT, the caller checks the sign)."""
    _require(_is_int(value), f"{label} must be an integer, got {_show(value)}")
    if least is not None:
        _require(value >= least, f"{label} must be {'positive' if least else '>= 0'}, got {_show(value)}")
    _require(abs(value) <= MAX_INT, f"{label} must be at most 2**31 - 1, got {_show(value)}")
    return value


def _check_field(cls: type, name: str, value: Any, label: str) -> Any:
    """`value` checked against field `name` of `cls`: the type its annotation gives, the range _FROM_ZERO and
    MAX_INT give. Returns it as stored: integer lists as tuples, numbers as floats."""
    tp = _HINTS[cls][name]
    if typing.get_origin(tp) in (types.UnionType, typing.Union):  # X | None
        if value is None:
            return None
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    least = 0 if name in _FROM_ZERO else 1
    if tp is int:
        return _check_int(value, label, least)
    if tp is float:
        try:
            number = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
        except OverflowError:  # an integer past float's range
            number = math.inf
        _require(math.isfinite(number) and number > 0, f"{label} must be a positive finite number, got {_show(value)}")
        return number
    if tp is bool:
        _require(isinstance(value, bool), f"{label} must be true or false, got {_show(value)}")
        return value
    if tp is str:
        _require(isinstance(value, str), f"{label} must be a string, got {_show(value)}")
        return value
    # tuple[int, ...] or tuple[int, int, int]
    size = None if typing.get_args(tp)[-1] is Ellipsis else len(typing.get_args(tp))
    _require(isinstance(value, (list, tuple)), f"{label} must be a list of integers, got {_show(value)}")
    _require(size is None or len(value) == size, f"{label} needs {size} entries (t, h, w), got {_show(value)}")
    items = tuple(_check_int(v, f"{label}[{i}]", None) for i, v in enumerate(value))
    negative = [v for v in items if v < least]
    _require(not negative, f"{label} {negative} are negative")
    return items


def _check_fields(obj: Any, name) -> None:
    """Every field of a config dataclass checked against its type and range; `name` gives its name for messages."""
    for f in fields(obj):
        if f.name not in ("text", "vision"):
            _check_field(type(obj), f.name, getattr(obj, f.name), name(f.name))


def _coerce(cls, values: dict[str, Any], prefix: str, names: dict[str, str] | None = None) -> dict[str, Any]:
    """Check names and values against the dataclass; lists become tuples (configs stay hashable) and a single eos
    id a tuple of one, as config.json may write it."""
    known = {f.name for f in fields(cls) if f.name not in ("text", "vision")}
    out = {}
    for name, value in values.items():
        if name not in known:
            raise ConfigError(f"unknown config field {prefix + str(name)!r}; valid fields: {', '.join(sorted(known))}")
        if name == "eos_token_id" and _is_int(value):
            value = [value]
        out[name] = _check_field(cls, name, value, _name(names, prefix + name))
    return out


_HINTS = {cls: typing.get_type_hints(cls) for cls in (VisionConfig, TextConfig, Qwen25VLConfig)}


# --- presets -----------------------------------------------------------------------------------------------------
# The published Qwen2.5-VL numbers; `tiny` is a CPU-sized model with the same structure (windows, full-attention
# layers, GQA, M-RoPE sections) so every code path runs in seconds.

_VISION_3B_7B = VisionConfig(intermediate_size=3420)
_VISION_32B_72B = VisionConfig(intermediate_size=3456)

PRESETS: dict[str, Qwen25VLConfig] = {
    "tiny": Qwen25VLConfig(
        text=TextConfig(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, mrope_section=(2, 3, 3),
                        max_position_embeddings=4096, tie_word_embeddings=True),
        vision=VisionConfig(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, window_size=56,
                            fullatt_block_indexes=(1, 3), out_hidden_size=64),
        image_token_id=1001, video_token_id=1002, vision_start_token_id=1003, vision_end_token_id=1004,
        bos_token_id=1005, eos_token_id=(1006,), pad_token_id=1007,
    ),
    "3b": Qwen25VLConfig(
        text=TextConfig(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                        num_attention_heads=16, num_key_value_heads=2, tie_word_embeddings=True),
        vision=replace(_VISION_3B_7B, out_hidden_size=2048),
    ),
    "7b": Qwen25VLConfig(
        text=TextConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                        num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False),
        vision=replace(_VISION_3B_7B, out_hidden_size=3584),
    ),
    "32b": Qwen25VLConfig(
        text=TextConfig(vocab_size=152064, hidden_size=5120, intermediate_size=27648, num_hidden_layers=64,
                        num_attention_heads=40, num_key_value_heads=8, tie_word_embeddings=False),
        vision=replace(_VISION_32B_72B, out_hidden_size=5120),
    ),
    "72b": Qwen25VLConfig(
        text=TextConfig(vocab_size=152064, hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
                        num_attention_heads=64, num_key_value_heads=8, tie_word_embeddings=False),
        vision=replace(_VISION_32B_72B, out_hidden_size=8192),
    ),
}
# Qwen2-VL's structure at the tiny size: LayerNorm, QuickGELU MLP (intermediate = 4 x hidden), no windows.
PRESETS["tiny_qwen2_vl"] = replace(
    PRESETS["tiny"],
    vision=VisionConfig(depth=3, hidden_size=32, intermediate_size=128, num_heads=2, out_hidden_size=64,
                        model_type="qwen2_vl", hidden_act="quick_gelu", fullatt_block_indexes=()),
)


def get_preset(name: str) -> Qwen25VLConfig:
    if not isinstance(name, str) or name not in PRESETS:
        raise ConfigError(f"unknown preset {_show(name)}; valid options are: {', '.join(PRESETS)}")
    return PRESETS[name]


# --- Hugging Face config.json ------------------------------------------------------------------------------------

_TEXT_KEYS = [f.name for f in fields(TextConfig) if f.name not in ("rope_theta", "mrope_section")]
_VISION_RENAMES = {"in_chans": "in_channels"}  # older Qwen2-VL spelling
_ARCHITECTURES = {"qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration", "qwen2_vl": "Qwen2VLForConditionalGeneration"}
# Qwen2-VL's vision_config: embed_dim is the tower's width, hidden_size the merger's output width, and the MLP's
# width is embed_dim * mlp_ratio. Missing fields take transformers' Qwen2VLVisionConfig defaults.
_QWEN2_VL_VISION_DEFAULTS = {"embed_dim": 1280, "mlp_ratio": 4, "hidden_act": "quick_gelu"}


def config_from_hf_dict(hf: dict[str, Any], source: str = "config.json") -> Qwen25VLConfig:
    """Build a config from a parsed HF ``config.json`` (flat or ``text_config`` layout); `source` (its path)
    starts every `ConfigError`'s message, which names fields as the file spells them (``vision_config.depth``).

    Accepts both rope spellings: ``rope_scaling: {type: mrope, mrope_section}`` with a top-level
    ``rope_theta`` (the published checkpoints), and ``rope_parameters: {rope_theta, mrope_section}``
    (transformers >= 5).
    """
    try:
        return _read_hf_dict(hf)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def _read_hf_dict(hf: Any) -> Qwen25VLConfig:
    if not isinstance(hf, dict):
        raise ConfigError(f"must hold a JSON object, got {type(hf).__name__}")
    model_type = hf.get("model_type", "qwen2_5_vl")
    if model_type not in MODEL_TYPES:
        raise ConfigError(f"model_type {_show(model_type)} unknown; qvl reads only "
                          + " and ".join(repr(m) for m in MODEL_TYPES))
    # transformers >= 5 nests the decoder fields under text_config; the flat layout keeps them at the top.
    nested = hf.get("text_config")
    if nested is not None and not isinstance(nested, dict):
        raise ConfigError(f"text_config must be an object, got {_show(nested)}")
    nested = nested or {}
    text_src = {**hf, **nested}
    where = {k: f"text_config.{k}" if k in nested else str(k) for k in text_src}  # each key's place in the file
    for key in ("torch_dtype", "dtype"):  # read by qvl.checkpoint as the weights' dtype
        _require(text_src.get(key) is None or isinstance(text_src[key], str),
                 f"{where.get(key, key)} must be a dtype name, got {_show(text_src.get(key))}")
    _require(text_src.get("hidden_act", "silu") == "silu",
             f"{where.get('hidden_act')} {_show(text_src.get('hidden_act'))} not supported: qvl's text decoder MLP "
             "is SwiGLU with 'silu', as every Qwen2-VL and Qwen2.5-VL checkpoint")
    _require(text_src.get("use_sliding_window") in (None, False),
             f"{where.get('use_sliding_window')} {_show(text_src.get('use_sliding_window'))} not supported: qvl's "
             "decoder attends over the whole sequence")
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if k not in text_src]
    if missing:
        raise ConfigError(f"missing required text fields: {', '.join(missing)}")
    # qvl's dotted field name -> its name in the file, for messages
    names = {f"text.{k}": where[k] for k in _TEXT_KEYS if k in text_src}
    text_kwargs = {k: text_src[k] for k in _TEXT_KEYS if k in text_src}
    text_kwargs.setdefault("num_key_value_heads", text_src["num_attention_heads"])
    if "tie_word_embeddings" in hf:  # the top-level flag governs lm_head in both layouts
        text_kwargs["tie_word_embeddings"] = hf["tie_word_embeddings"]
        names["text.tie_word_embeddings"] = "tie_word_embeddings"
    text_kwargs.update(_rope_fields(text_src, where, names))
    text = TextConfig(**_coerce(TextConfig, text_kwargs, "text.", names))

    vision_src = hf.get("vision_config")
    if vision_src is None:
        raise ConfigError("has no vision_config object")
    if not isinstance(vision_src, dict):
        raise ConfigError(f"vision_config must be an object, got {_show(vision_src)}")
    vision_kwargs = {"model_type": model_type}
    names["vision.model_type"] = "model_type"
    known_vision = {f.name for f in fields(VisionConfig)} - {"model_type"}
    if model_type == "qwen2_vl":
        vision_src = _qwen2_vl_vision_fields(vision_src, names)
    for key, value in vision_src.items():
        name = _VISION_RENAMES.get(key, key)
        if name not in known_vision:
            continue
        if name in vision_kwargs and vision_kwargs[name] != value:  # in_chans beside in_channels
            raise _invalid(f"{names[f'vision.{name}']} ({_show(vision_kwargs[name])}) and vision_config.{key} "
                           f"({_show(value)}) contradict each other")
        vision_kwargs[name] = value
        names.setdefault(f"vision.{name}", f"vision_config.{key}")
    rp = vision_src.get("rope_parameters")
    if rp is not None and not isinstance(rp, dict):
        raise ConfigError(f"vision_config.rope_parameters must be an object, got {_show(rp)}")
    if rp and "rope_theta" in rp:
        vision_kwargs["rope_theta"] = rp["rope_theta"]
        names["vision.rope_theta"] = "vision_config.rope_parameters.rope_theta"
    vision_kwargs.setdefault("out_hidden_size", text.hidden_size)
    vision = VisionConfig(**_coerce(VisionConfig, vision_kwargs, "vision.", names))

    top = {}
    for key in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id",
                "bos_token_id", "eos_token_id", "pad_token_id"):
        if text_src.get(key) is not None:  # null: transformers' default (none for pad)
            top[key] = text_src[key]
            names[key] = where[key]
    return Qwen25VLConfig(text=text, vision=vision, **_coerce(Qwen25VLConfig, top, "", names)).validate(names)


def _qwen2_vl_vision_fields(src: dict[str, Any], names: dict[str, str]) -> dict[str, Any]:
    """A Qwen2-VL vision_config in VisionConfig's names: its widths renamed, its Qwen2.5-VL-only fields dropped;
    `names` learns where each renamed field came from."""
    src = {**_QWEN2_VL_VISION_DEFAULTS, **src}
    out = {k: v for k, v in src.items() if k not in ("embed_dim", "mlp_ratio", "hidden_size", "intermediate_size",
                                                     "window_size", "fullatt_block_indexes", "tokens_per_second",
                                                     "out_hidden_size", "rms_norm_eps")}
    embed = _check_field(VisionConfig, "hidden_size", src["embed_dim"], "vision_config.embed_dim")
    ratio = _check_int(src["mlp_ratio"], "vision_config.mlp_ratio", 1)  # an int in transformers 5
    out["hidden_size"] = embed
    out["intermediate_size"] = embed * ratio  # as transformers sizes its fc1
    names.update({"vision.hidden_size": "vision_config.embed_dim",
                  "vision.intermediate_size": "vision_config.embed_dim * mlp_ratio"})
    if "hidden_size" in src:  # else the text width (config_from_hf_dict's default)
        out["out_hidden_size"] = src["hidden_size"]
        names["vision.out_hidden_size"] = "vision_config.hidden_size"
    out["rms_norm_eps"] = QWEN2_VL_NORM_EPS
    out["fullatt_block_indexes"] = ()
    return out


def _rope_fields(src: dict[str, Any], where: dict[str, str], names: dict[str, str]) -> dict[str, Any]:
    """rope_theta and mrope_section from either spelling (checked, and agreeing where both are given)."""
    out: dict[str, Any] = {}
    sections = []
    for spelling in ("rope_scaling", "rope_parameters"):
        block = src.get(spelling)
        if block is None:
            continue
        here = where[spelling]
        if not isinstance(block, dict):
            raise ConfigError(f"{here} must be an object, got {_show(block)}")
        kind = block.get("rope_type", block.get("type"))
        if kind not in (None, "default", "mrope"):
            raise ConfigError(f"{here} has rope type {_show(kind)}; Qwen2.5-VL uses M-RoPE "
                              "('mrope' or 'default' with mrope_section)")
        if "mrope_section" in block:
            label = f"{here}.mrope_section"
            sections.append((label, _check_field(TextConfig, "mrope_section", block["mrope_section"], label)))
            names.setdefault("text.mrope_section", label)
        if "rope_theta" in block:
            out["rope_theta"] = _check_field(TextConfig, "rope_theta", block["rope_theta"], f"{here}.rope_theta")
            names["text.rope_theta"] = f"{here}.rope_theta"
    if len({s for _, s in sections}) > 1:
        raise ConfigError("contradictory mrope_section values: "
                          + ", ".join(f"{name.removesuffix('.mrope_section')}={list(s)}" for name, s in sections))
    if sections:
        out["mrope_section"] = sections[0][1]
    if "rope_theta" in src:
        theta = _check_field(TextConfig, "rope_theta", src["rope_theta"], where["rope_theta"])
        if "rope_theta" in out and theta != out["rope_theta"]:
            raise ConfigError(f"contradictory rope_theta values: {theta} ({where['rope_theta']}) and "
                              f"{out['rope_theta']} ({names['text.rope_theta']})")
        out["rope_theta"] = theta
        names["text.rope_theta"] = where["rope_theta"]
    return out


def config_to_hf_dict(cfg: Qwen25VLConfig) -> dict[str, Any]:
    """The flat ``config.json`` layout of the published checkpoints (readable by transformers 4.x and 5.x), of
    Qwen2.5-VL or Qwen2-VL (`cfg.model_type`)."""
    t, v = cfg.text, cfg.vision
    return {
        "architectures": [_ARCHITECTURES[cfg.model_type]],
        "model_type": cfg.model_type,
        "vocab_size": t.vocab_size,
        "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_hidden_layers,
        "num_attention_heads": t.num_attention_heads,
        "num_key_value_heads": t.num_key_value_heads,
        "hidden_act": "silu",
        "rms_norm_eps": t.rms_norm_eps,
        "rope_theta": t.rope_theta,
        "rope_scaling": {"type": "mrope", "mrope_section": list(t.mrope_section)},
        "max_position_embeddings": t.max_position_embeddings,
        "tie_word_embeddings": t.tie_word_embeddings,
        "use_sliding_window": False,
        "attention_dropout": 0.0,
        "image_token_id": cfg.image_token_id,
        "video_token_id": cfg.video_token_id,
        "vision_start_token_id": cfg.vision_start_token_id,
        "vision_end_token_id": cfg.vision_end_token_id,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": list(cfg.eos_token_id) if len(cfg.eos_token_id) != 1 else cfg.eos_token_id[0],
        "pad_token_id": cfg.pad_token_id,
        "vision_config": _vision_to_hf_dict(v),
    }


def _vision_to_hf_dict(v: VisionConfig) -> dict[str, Any]:
    common = {
        "model_type": v.model_type,
        "depth": v.depth,
        "num_heads": v.num_heads,
        "in_chans": v.in_channels,
        "in_channels": v.in_channels,
        "patch_size": v.patch_size,
        "temporal_patch_size": v.temporal_patch_size,
        "spatial_merge_size": v.spatial_merge_size,
        "hidden_act": v.hidden_act,
        "rope_parameters": {"rope_theta": v.rope_theta, "rope_type": "axial"},
    }
    if v.model_type == "qwen2_vl":
        return {**common, "embed_dim": v.hidden_size, "mlp_ratio": v.intermediate_size // v.hidden_size,
                "hidden_size": v.out_hidden_size}
    return {**common, "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
            "window_size": v.window_size, "fullatt_block_indexes": list(v.fullatt_block_indexes),
            "out_hidden_size": v.out_hidden_size,
            "tokens_per_second": (int(v.tokens_per_second) if float(v.tokens_per_second).is_integer()
                                  else v.tokens_per_second),
            "rms_norm_eps": v.rms_norm_eps}


def load_hf_config(path: str | os.PathLike) -> Qwen25VLConfig:
    """Read ``config.json`` from a checkpoint directory (or the file itself); `ConfigError` names the file."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.lexists(path):
        raise ConfigError(f"no config.json at {path or repr(path)}")
    # a directory, a device, a Git LFS pointer, not UTF-8, not JSON, nested too deeply: refused by read_json
    return config_from_hf_dict(read_json(path, error=ConfigError), path)


def as_config(preset_or_config: str | Qwen25VLConfig | dict) -> Qwen25VLConfig:
    """A validated config from a preset name, a config, or a parsed HF config.json dict."""
    if isinstance(preset_or_config, Qwen25VLConfig):
        return preset_or_config.validate()
    if isinstance(preset_or_config, str):
        return get_preset(preset_or_config)
    if isinstance(preset_or_config, dict):
        return config_from_hf_dict(preset_or_config)
    raise ConfigError(f"expected a preset name, a Qwen25VLConfig or an HF config dict, "
                      f"got {type(preset_or_config).__name__}")


__all__ = ["VisionConfig", "TextConfig", "Qwen25VLConfig", "PRESETS", "MAX_INT", "get_preset", "config_from_hf_dict",
           "config_to_hf_dict", "load_hf_config", "as_config"]
