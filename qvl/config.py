"""Model configuration: dataclasses for the two towers, named presets, HF config.json I/O.

The field names follow the published Hugging Face Qwen2.5-VL ``config.json`` so that a
checkpoint's config maps onto these dataclasses one to one. Qwen2-VL checkpoints, whose vision
sizes are named differently (embed_dim, mlp_ratio, hidden_size = the output width), map onto the
same dataclasses with ``vision.model_type = "qwen2_vl"``. Parsing is plain JSON: nothing in a config
is ever evaluated.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields, replace
from typing import Any

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

    def validate(self) -> None:
        _require(self.model_type in MODEL_TYPES,
                 f"vision.model_type {self.model_type!r} unknown; valid options are {', '.join(MODEL_TYPES)}")
        for name in ("depth", "hidden_size", "intermediate_size", "num_heads", "patch_size",
                     "temporal_patch_size", "spatial_merge_size", "out_hidden_size"):
            _require(getattr(self, name) > 0, f"vision.{name} must be positive")
        _require(self.hidden_size % self.num_heads == 0, "vision.hidden_size must be divisible by vision.num_heads")
        _require(self.head_dim % 4 == 0, "vision head_dim must be divisible by 4 (2-D rotary over h and w)")
        activations = VISION_ACTIVATIONS[self.model_type]
        _require(self.hidden_act in activations, f"vision.hidden_act {self.hidden_act!r} not supported for "
                 f"{self.model_type}; valid options are {', '.join(activations)}")
        if self.windowed:
            unit = self.spatial_merge_size * self.patch_size
            _require(
                self.window_size % unit == 0 and self.window_size >= unit,
                f"vision.window_size ({self.window_size}) must be a positive multiple of "
                f"spatial_merge_size * patch_size ({unit})",
            )
            negative = [i for i in self.fullatt_block_indexes if i < 0]
            _require(not negative, f"vision.fullatt_block_indexes {negative} are negative (block indexes count "
                                   "from 0; indexes past the depth are ignored)")
        if self.model_type == "qwen2_vl":
            _require(self.intermediate_size % self.hidden_size == 0,
                     f"vision.intermediate_size ({self.intermediate_size}) must be a multiple of vision.hidden_size "
                     f"({self.hidden_size}) for qwen2_vl: its config.json stores the ratio (mlp_ratio)")
            _require(self.rms_norm_eps == QWEN2_VL_NORM_EPS,
                     f"vision.rms_norm_eps ({self.rms_norm_eps}) must be {QWEN2_VL_NORM_EPS} for qwen2_vl: "
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

    def validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads"):
            _require(getattr(self, name) > 0, f"text.{name} must be positive")
        _require(self.hidden_size % self.num_attention_heads == 0,
                 "text.hidden_size must be divisible by text.num_attention_heads")
        _require(self.num_attention_heads % self.num_key_value_heads == 0,
                 "text.num_attention_heads must be a multiple of text.num_key_value_heads")
        _require(len(self.mrope_section) == 3,
                 f"text.mrope_section needs 3 entries (t, h, w), got {self.mrope_section}")
        _require(
            sum(self.mrope_section) * 2 == self.head_dim,
            f"text.mrope_section {tuple(self.mrope_section)} sums to {sum(self.mrope_section)}, "
            f"but must sum to head_dim / 2 = {self.head_dim // 2}",
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

    def validate(self) -> Qwen25VLConfig:
        self.text.validate()
        self.vision.validate()
        _require(self.vision.out_hidden_size == self.text.hidden_size,
                 f"vision.out_hidden_size ({self.vision.out_hidden_size}) must equal text.hidden_size "
                 f"({self.text.hidden_size}): merged patches are placed into the text embedding sequence")
        special = {"image_token_id": self.image_token_id, "video_token_id": self.video_token_id,
                   "vision_start_token_id": self.vision_start_token_id}
        for name, tok in special.items():
            _require(0 <= tok < self.text.vocab_size,
                     f"{name} ({tok}) outside the vocabulary (size {self.text.vocab_size})")
        _require(self.image_token_id != self.video_token_id, "image_token_id and video_token_id must differ")
        return self

    def with_overrides(self, overrides: dict[str, Any]) -> Qwen25VLConfig:
        """Return a copy with dotted overrides applied, e.g. ``{"vision.window_size": 56}``."""
        text, vision, top = {}, {}, {}
        for key, value in overrides.items():
            part, _, name = key.rpartition(".")
            target = {"text": text, "vision": vision, "": top}.get(part)
            if target is None:
                raise ValueError(f"unknown config override {key!r}: use text.<field>, vision.<field> or <field>")
            target[name] = value
        cfg = replace(self, **_coerce(Qwen25VLConfig, top, "")) if top else self
        if text:
            cfg = replace(cfg, text=replace(cfg.text, **_coerce(TextConfig, text, "text.")))
        if vision:
            cfg = replace(cfg, vision=replace(cfg.vision, **_coerce(VisionConfig, vision, "vision.")))
        return cfg.validate()


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(f"invalid Qwen2.5-VL config: {message}")


def _coerce(cls, values: dict[str, Any], prefix: str) -> dict[str, Any]:
    """Check names against the dataclass and turn lists into tuples (configs stay hashable)."""
    known = {f.name: f for f in fields(cls) if f.name not in ("text", "vision")}
    out = {}
    for name, value in values.items():
        if name not in known:
            raise ValueError(f"unknown config field {prefix + name!r}; valid fields: {', '.join(sorted(known))}")
        out[name] = tuple(value) if isinstance(value, list) else value
    return out


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
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid options are: {', '.join(PRESETS)}")
    return PRESETS[name]


# --- Hugging Face config.json ------------------------------------------------------------------------------------

_TEXT_KEYS = [f.name for f in fields(TextConfig) if f.name not in ("rope_theta", "mrope_section")]
_VISION_RENAMES = {"in_chans": "in_channels"}  # older Qwen2-VL spelling
_ARCHITECTURES = {"qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration", "qwen2_vl": "Qwen2VLForConditionalGeneration"}
# Qwen2-VL's vision_config: embed_dim is the tower's width, hidden_size the merger's output width, and the MLP's
# width is embed_dim * mlp_ratio. Missing fields take transformers' Qwen2VLVisionConfig defaults.
_QWEN2_VL_VISION_DEFAULTS = {"embed_dim": 1280, "mlp_ratio": 4, "hidden_act": "quick_gelu"}


def config_from_hf_dict(hf: dict[str, Any]) -> Qwen25VLConfig:
    """Build a config from a parsed HF ``config.json`` (flat or ``text_config`` layout).

    Accepts both rope spellings: ``rope_scaling: {type: mrope, mrope_section}`` with a top-level
    ``rope_theta`` (the published checkpoints), and ``rope_parameters: {rope_theta, mrope_section}``
    (transformers >= 5).
    """
    if not isinstance(hf, dict):
        raise ValueError("config.json must hold a JSON object")
    model_type = hf.get("model_type", "qwen2_5_vl")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"config.json has model_type {model_type!r}; qvl reads only "
                         + " and ".join(repr(m) for m in MODEL_TYPES))
    # transformers >= 5 nests the decoder fields under text_config; the flat layout keeps them at the top.
    text_src = dict(hf)
    if isinstance(hf.get("text_config"), dict):
        text_src = {**hf, **hf["text_config"]}
    text_kwargs = {k: text_src[k] for k in _TEXT_KEYS if k in text_src}
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if k not in text_src]
    if missing:
        raise ValueError(f"config.json is missing required text fields: {', '.join(missing)}")
    text_kwargs.setdefault("num_key_value_heads", text_src["num_attention_heads"])
    if "tie_word_embeddings" in hf:  # the top-level flag governs lm_head in both layouts
        text_kwargs["tie_word_embeddings"] = bool(hf["tie_word_embeddings"])

    rope = _rope_fields(text_src)
    text_kwargs.update(rope)
    text = TextConfig(**_coerce(TextConfig, text_kwargs, "text."))

    vision_src = hf.get("vision_config")
    if not isinstance(vision_src, dict):
        raise ValueError("config.json has no vision_config object")
    vision_kwargs = {"model_type": model_type}
    known_vision = {f.name for f in fields(VisionConfig)} - {"model_type"}
    if model_type == "qwen2_vl":
        vision_src = _qwen2_vl_vision_fields(vision_src)
    for key, value in vision_src.items():
        key = _VISION_RENAMES.get(key, key)
        if key in known_vision:
            vision_kwargs[key] = value
    rp = vision_src.get("rope_parameters")
    if isinstance(rp, dict) and "rope_theta" in rp:
        vision_kwargs["rope_theta"] = rp["rope_theta"]
    vision_kwargs.setdefault("out_hidden_size", text.hidden_size)
    vision = VisionConfig(**_coerce(VisionConfig, vision_kwargs, "vision."))

    top = {}
    for key in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id",
                "bos_token_id", "pad_token_id"):
        if text_src.get(key) is not None:
            top[key] = int(text_src[key])
    eos = text_src.get("eos_token_id")
    if eos is not None:
        top["eos_token_id"] = tuple(eos) if isinstance(eos, list) else (int(eos),)
    return Qwen25VLConfig(text=text, vision=vision, **top).validate()


def _qwen2_vl_vision_fields(src: dict[str, Any]) -> dict[str, Any]:
    """A Qwen2-VL vision_config in VisionConfig's names: its widths renamed, its Qwen2.5-VL-only fields dropped."""
    src = {**_QWEN2_VL_VISION_DEFAULTS, **src}
    out = {k: v for k, v in src.items() if k not in ("embed_dim", "mlp_ratio", "hidden_size", "intermediate_size",
                                                     "window_size", "fullatt_block_indexes", "tokens_per_second",
                                                     "out_hidden_size", "rms_norm_eps")}
    out["hidden_size"] = src["embed_dim"]
    out["intermediate_size"] = int(src["embed_dim"] * src["mlp_ratio"])  # as transformers sizes its fc1
    if "hidden_size" in src:  # else the text width (config_from_hf_dict's default)
        out["out_hidden_size"] = src["hidden_size"]
    out["rms_norm_eps"] = QWEN2_VL_NORM_EPS
    out["fullatt_block_indexes"] = ()
    return out


def _rope_fields(src: dict[str, Any]) -> dict[str, Any]:
    scaling, params = src.get("rope_scaling"), src.get("rope_parameters")
    out: dict[str, Any] = {}
    sections = []
    for spelling, block in (("rope_scaling", scaling), ("rope_parameters", params)):
        if block is None:
            continue
        if not isinstance(block, dict):
            raise ValueError(f"config.json field {spelling} must be an object")
        kind = block.get("rope_type", block.get("type"))
        if kind not in (None, "default", "mrope"):
            raise ValueError(f"config.json {spelling} has rope type {kind!r}; Qwen2.5-VL uses M-RoPE "
                             "('mrope' or 'default' with mrope_section)")
        if "mrope_section" in block:
            sections.append((spelling, tuple(block["mrope_section"])))
        if "rope_theta" in block:
            out["rope_theta"] = float(block["rope_theta"])
    if len({s for _, s in sections}) > 1:
        raise ValueError("config.json has contradictory mrope_section values: "
                         + ", ".join(f"{name}={list(s)}" for name, s in sections))
    if sections:
        out["mrope_section"] = sections[0][1]
    if "rope_theta" in src:
        if "rope_theta" in out and float(src["rope_theta"]) != out["rope_theta"]:
            raise ValueError(f"config.json has contradictory rope_theta values: {src['rope_theta']} (top level) "
                             f"and {out['rope_theta']} (rope_parameters)")
        out["rope_theta"] = float(src["rope_theta"])
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
        "eos_token_id": list(cfg.eos_token_id) if len(cfg.eos_token_id) > 1 else cfg.eos_token_id[0],
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
    """Read ``config.json`` from a checkpoint directory (or the file itself)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"no config.json at {path}")
    with open(path, encoding="utf-8") as f:
        try:
            hf = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from e
    return config_from_hf_dict(hf)


def as_config(preset_or_config: str | Qwen25VLConfig | dict) -> Qwen25VLConfig:
    if isinstance(preset_or_config, Qwen25VLConfig):
        return preset_or_config.validate()
    if isinstance(preset_or_config, str):
        return get_preset(preset_or_config)
    if isinstance(preset_or_config, dict):
        return config_from_hf_dict(preset_or_config)
    raise ValueError(f"expected a preset name, a Qwen25VLConfig or an HF config dict, "
                     f"got {type(preset_or_config).__name__}")


__all__ = ["VisionConfig", "TextConfig", "Qwen25VLConfig", "PRESETS", "get_preset", "config_from_hf_dict",
           "config_to_hf_dict", "load_hf_config", "as_config"]
