"""Hostile model configs: every bad config.json, override, preset name or dataclass is refused with a one-line
`qvl.ConfigError` naming the file, the field and the value; configs too large for this machine are refused with a
`qvl.ResourceError` and the estimate before anything is allocated.

The tiny preset's facts: text hidden 64, 4 heads, 2 kv heads (head_dim 16, mrope_section (2, 3, 3)), vocab 1024;
vision hidden 32, 2 heads, patch 14, merge 2, window 56; image/video/vision-start ids 1001/1002/1003, pad 1007.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qvl
import qvl.checkpoint
from qvl.cli import main
from qvl.config import (
    MAX_INT,
    PRESETS,
    Qwen25VLConfig,
    TextConfig,
    VisionConfig,
    as_config,
    config_from_hf_dict,
    config_to_hf_dict,
    get_preset,
    load_hf_config,
)
from qvl.errors import ConfigError, ResourceError
from qvl.model.qwen2_5_vl import Qwen25VL

TINY = get_preset("tiny")


def hf_dict(preset: str = "tiny") -> dict:
    return copy.deepcopy(config_to_hf_dict(get_preset(preset)))


def put(hf: dict, path: str, value) -> dict:
    """Set hf[a][b] for the dotted path "a.b" (creating objects on the way)."""
    *parents, leaf = path.split(".")
    for p in parents:
        hf = hf.setdefault(p, {})
    hf[leaf] = value
    return hf


def refused(call, *args, error=ConfigError, **kwargs) -> str:
    """The one-line message of the `error` that call(*args) raises (exactly that class)."""
    with pytest.raises(error) as info:
        call(*args, **kwargs)
    assert type(info.value) is error
    message = str(info.value)
    assert "\n" not in message and len(message) < 400, message
    return message


def refused_dict(changes: dict, preset: str = "tiny") -> str:
    hf = hf_dict(preset)
    for path, value in changes.items():
        put(hf, path, value)
    return refused(config_from_hf_dict, hf)


# --- wrong types --------------------------------------------------------------------------------------------------
# An integer field takes integers only: transformers 5's strict configs refuse 2.0 and true there too (checked
# below against transformers itself), and booleans are never integers although Python's True is an int.

WRONG_TYPES = [
    ("vision_config.depth", "4", "vision_config.depth must be an integer, got '4'"),
    ("vision_config.depth", 2.5, "vision_config.depth must be an integer, got 2.5"),
    ("vision_config.depth", 2.0, "vision_config.depth must be an integer, got 2.0"),
    ("vision_config.depth", True, "vision_config.depth must be an integer, got True"),
    ("num_hidden_layers", False, "num_hidden_layers must be an integer, got False"),
    ("hidden_size", None, "hidden_size must be an integer, got None"),
    ("vocab_size", [1024], "vocab_size must be an integer, got [1024]"),
    ("num_attention_heads", {"n": 4}, "num_attention_heads must be an integer, got an object with 1 key"),
    ("intermediate_size", "x" * 500, "intermediate_size must be an integer, got 'xxxx"),
    ("max_position_embeddings", 4096.0, "max_position_embeddings must be an integer, got 4096.0"),
    ("vision_config.fullatt_block_indexes", 1, "vision_config.fullatt_block_indexes must be a list of integers, got 1"),
    ("vision_config.fullatt_block_indexes", [1, 3.0], "vision_config.fullatt_block_indexes[1] must be an integer, "
                                                      "got 3.0"),
    ("vision_config.hidden_act", 3, "vision_config.hidden_act must be a string, got 3"),
    ("rope_scaling.mrope_section", "233", "rope_scaling.mrope_section must be a list of integers, got '233'"),
    ("rope_scaling.mrope_section", [2, 3, True], "rope_scaling.mrope_section[2] must be an integer, got True"),
    ("rope_scaling.mrope_section", [2, 3, 3, 0], "rope_scaling.mrope_section needs 3 entries (t, h, w), got "
                                                 "[2, 3, 3, 0]"),
    ("tie_word_embeddings", "false", "tie_word_embeddings must be true or false, got 'false'"),
    ("tie_word_embeddings", 1, "tie_word_embeddings must be true or false, got 1"),
    ("image_token_id", 1001.0, "image_token_id must be an integer, got 1001.0"),
    ("pad_token_id", "1007", "pad_token_id must be an integer, got '1007'"),
    ("eos_token_id", [1006, "x"], "eos_token_id[1] must be an integer, got 'x'"),
    ("bos_token_id", [1005], "bos_token_id must be an integer, got [1005]"),
    ("rope_theta", "1e6", "rope_theta must be a positive finite number, got '1e6'"),
    ("rope_theta", True, "rope_theta must be a positive finite number, got True"),
    ("vision_config.tokens_per_second", None, "vision_config.tokens_per_second must be a positive finite number, "
                                              "got None"),
]


@pytest.mark.parametrize("path, value, message", WRONG_TYPES, ids=[f"{p}={v!r:.12}" for p, v, _ in WRONG_TYPES])
def test_wrong_types_are_refused_naming_the_field(path, value, message):
    got = refused_dict({path: value})
    assert got.startswith("config.json: invalid Qwen2.5-VL config: " + message), got


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 0.0, -1e-6, 0])
@pytest.mark.parametrize("path", ["rms_norm_eps", "rope_theta", "vision_config.rms_norm_eps",
                                  "vision_config.rope_parameters.rope_theta", "vision_config.tokens_per_second"])
def test_non_finite_and_non_positive_numbers(path, value):
    message = refused_dict({path: value})
    assert f"{path} must be a positive finite number, got {value!r}" in message


def test_numbers_past_floats_range_are_refused_not_overflowed():
    assert "rope_theta must be a positive finite number, got an integer of 1329 bits" in refused_dict(
        {"rope_theta": 10**400})


def test_json_nan_in_a_file_names_the_file_and_field(tmp_path):
    text = json.dumps(hf_dict()).replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": NaN')
    assert "NaN" in text
    (tmp_path / "config.json").write_text(text)
    assert refused(load_hf_config, tmp_path) == (f"{tmp_path / 'config.json'}: invalid Qwen2.5-VL config: "
                                                 "rms_norm_eps must be a positive finite number, got nan")


def test_integral_floats_are_refused_as_transformers_refuses_them():
    """transformers 5's strict config refuses depth 2.0 (and a bool) where an int belongs: so does qvl."""
    transformers = pytest.importorskip("transformers")
    for value in (2.0, True):
        hf = hf_dict()
        hf["vision_config"]["depth"] = value
        with pytest.raises(Exception, match="depth"):
            transformers.Qwen2_5_VLConfig(**hf)
        assert "vision_config.depth must be an integer" in refused(config_from_hf_dict, hf)


def test_nested_text_config_fields_are_named_where_they_are():
    hf = hf_dict()
    hf["text_config"] = {k: hf.pop(k) for k in ("vocab_size", "hidden_size", "num_attention_heads")}
    hf["text_config"]["num_attention_heads"] = "4"
    assert "text_config.num_attention_heads must be an integer, got '4'" in refused(config_from_hf_dict, hf)
    hf["text_config"]["num_attention_heads"] = 5
    assert ("text_config.hidden_size (64) must be divisible by text_config.num_attention_heads (5)"
            in refused(config_from_hf_dict, hf))
    hf["text_config"] = "big"
    assert refused(config_from_hf_dict, hf) == "config.json: text_config must be an object, got 'big'"


def test_qwen2_vl_vision_fields_are_named_as_its_config_json_spells_them():
    assert "vision_config.embed_dim must be an integer, got '32'" in refused_dict(
        {"vision_config.embed_dim": "32"}, "tiny_qwen2_vl")
    assert "vision_config.mlp_ratio must be an integer, got 4.0" in refused_dict(
        {"vision_config.mlp_ratio": 4.0}, "tiny_qwen2_vl")
    assert "vision_config.mlp_ratio must be positive, got 0" in refused_dict(
        {"vision_config.mlp_ratio": 0}, "tiny_qwen2_vl")
    # embed_dim * mlp_ratio past MAX_INT: refused, not multiplied into a size
    assert "vision_config.embed_dim * mlp_ratio must be at most 2**31 - 1" in refused_dict(
        {"vision_config.embed_dim": 2**30, "vision_config.mlp_ratio": 4}, "tiny_qwen2_vl")
    assert ("vision_config.hidden_size (32) must equal hidden_size (64)"
            in refused_dict({"vision_config.hidden_size": 32}, "tiny_qwen2_vl"))


def test_both_spellings_of_in_channels_must_agree():
    hf = hf_dict()
    hf["vision_config"]["in_chans"] = "3"
    assert ("vision_config.in_chans ('3') and vision_config.in_channels (3) contradict each other"
            in refused(config_from_hf_dict, hf))
    del hf["vision_config"]["in_channels"]
    assert "vision_config.in_chans must be an integer, got '3'" in refused(config_from_hf_dict, hf)


def test_dtype_names_that_are_not_strings():
    assert "torch_dtype must be a dtype name, got ['bfloat16']" in refused_dict({"torch_dtype": ["bfloat16"]})


# --- negative, zero and absurd sizes -----------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                  "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                                  "vision_config.depth", "vision_config.hidden_size", "vision_config.num_heads",
                                  "vision_config.patch_size", "vision_config.temporal_patch_size",
                                  "vision_config.spatial_merge_size", "vision_config.window_size",
                                  "vision_config.in_channels", "vision_config.out_hidden_size"])
@pytest.mark.parametrize("value", [0, -1])
def test_sizes_must_be_positive(path, value):
    hf = hf_dict()
    if path == "vision_config.in_channels":
        del hf["vision_config"]["in_chans"]  # the older spelling, written beside it
    put(hf, path, value)
    assert f"{path} must be positive, got {value}" in refused(config_from_hf_dict, hf)


@pytest.mark.parametrize("path", ["image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id",
                                  "bos_token_id", "pad_token_id"])
def test_token_ids_must_not_be_negative(path):
    assert f"{path} must be >= 0, got -1" in refused_dict({path: -1})


def test_negative_list_entries():
    assert "vision_config.fullatt_block_indexes [-1] are negative" in refused_dict(
        {"vision_config.fullatt_block_indexes": [1, -1]})
    assert "eos_token_id [-3] are negative" in refused_dict({"eos_token_id": [1006, -3]})


@pytest.mark.parametrize("value", [2**31, 10**30, 2**200])
@pytest.mark.parametrize("path", ["vocab_size", "vision_config.depth", "image_token_id",
                                  "vision_config.fullatt_block_indexes"])
def test_sizes_past_max_int_are_refused_before_any_arithmetic(path, value):
    """A size of 10**30 ends in a ConfigError, never an OverflowError or a torch error."""
    message = refused_dict({path: [value] if path.endswith("indexes") else value})
    assert "must be at most 2**31 - 1, got " in message
    assert str(value) in message or "an integer of 201 bits" in message


def test_max_int_itself_is_a_valid_size():
    cfg = TINY.with_overrides({"text.max_position_embeddings": MAX_INT})
    assert cfg.text.max_position_embeddings == MAX_INT


# --- contradictions -----------------------------------------------------------------------------------------------

CONTRADICTIONS = [
    ({"text.num_attention_heads": 5}, "text.hidden_size (64) must be divisible by text.num_attention_heads (5)"),
    ({"text.num_key_value_heads": 3}, "text.num_attention_heads (4) must be a multiple of text.num_key_value_heads "
                                      "(3)"),
    ({"text.num_key_value_heads": 8}, "text.num_attention_heads (4) must be a multiple of text.num_key_value_heads "
                                      "(8)"),
    ({"text.mrope_section": (2, 3, 4)}, "text.mrope_section (2, 3, 4) sums to 9, but must sum to head_dim / 2 = 8"),
    ({"text.hidden_size": 68, "text.num_attention_heads": 4, "vision.out_hidden_size": 68},
     "text.mrope_section (2, 3, 3) sums to 8, but must sum to head_dim / 2 = 8.5"),
    ({"vision.out_hidden_size": 32}, "vision.out_hidden_size (32) must equal text.hidden_size (64)"),
    ({"vision.num_heads": 3}, "vision.hidden_size (32) must be divisible by vision.num_heads (3)"),
    ({"vision.num_heads": 16}, "the vision head size vision.hidden_size / vision.num_heads = 2 must be divisible by "
                               "4"),
    ({"vision.window_size": 50}, "vision.window_size (50) must be a positive multiple of spatial_merge_size * "
                                 "patch_size (28)"),
    ({"vision.spatial_merge_size": 3}, "vision.window_size (56) must be a positive multiple of spatial_merge_size * "
                                       "patch_size (42)"),
    ({"vision.model_type": "qwen3_vl"}, "vision.model_type 'qwen3_vl' unknown; valid options are qwen2_5_vl, "
                                        "qwen2_vl"),
    ({"vision.hidden_act": "gelu"}, "vision.hidden_act 'gelu' not supported for qwen2_5_vl; valid options are silu"),
    ({"image_token_id": 1024}, "image_token_id (1024) outside the vocabulary (text.vocab_size 1024)"),
    ({"text.vocab_size": 1002}, "video_token_id (1002) outside the vocabulary (text.vocab_size 1002)"),
    ({"pad_token_id": 5000}, "pad_token_id (5000) outside the vocabulary (text.vocab_size 1024)"),
    ({"pad_token_id": None, "eos_token_id": (5000,)}, "eos_token_id (5000) outside the vocabulary"),
    ({"video_token_id": 1001}, "image_token_id, video_token_id and vision_start_token_id must differ, got 1001, "
                               "1001, 1003"),
    ({"vision_start_token_id": 1002}, "image_token_id, video_token_id and vision_start_token_id must differ, got "
                                      "1001, 1002, 1002"),
]


@pytest.mark.parametrize("overrides, message", CONTRADICTIONS, ids=[str(o) for o, _ in CONTRADICTIONS])
def test_contradictions_through_overrides(overrides, message):
    got = refused(TINY.with_overrides, overrides)
    assert got.startswith("invalid Qwen2.5-VL config: " + message), got


@pytest.mark.parametrize("changes, message", [
    ({"num_attention_heads": 5}, "config.json: invalid Qwen2.5-VL config: hidden_size (64) must be divisible by "
                                 "num_attention_heads (5)"),
    ({"vision_config.out_hidden_size": 32}, "vision_config.out_hidden_size (32) must equal hidden_size (64)"),
    ({"vision_config.window_size": 60}, "vision_config.window_size (60) must be a positive multiple"),
    ({"rope_scaling.mrope_section": [4, 2, 3]}, "rope_scaling.mrope_section (4, 2, 3) sums to 9"),
    ({"image_token_id": 2000}, "image_token_id (2000) outside the vocabulary (vocab_size 1024)"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' not supported: qvl's text decoder MLP is SwiGLU with 'silu'"),
    ({"use_sliding_window": True}, "use_sliding_window True not supported: qvl's decoder attends over the whole "
                                   "sequence"),
])
def test_contradictions_in_config_json_name_its_fields(changes, message):
    assert message in refused_dict(changes)


def test_ids_the_model_never_looks_up_may_lie_past_the_vocabulary():
    """transformers' own tester config leaves vision_end_token_id at its default, past its 99-token vocabulary:
    qvl only compares that id (and bos, and eos ids after the first) with tokens, so it loads."""
    cfg = config_from_hf_dict(hf_dict() | {"vision_end_token_id": 151653, "bos_token_id": 151643,
                                           "eos_token_id": [1006, 151645]})
    assert (cfg.vision_end_token_id, cfg.bos_token_id, cfg.eos_token_id) == (151653, 151643, (1006, 151645))


# --- weight sizes -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [TINY, PRESETS["tiny_qwen2_vl"],
                                 TINY.with_overrides({"text.tie_word_embeddings": False}),
                                 PRESETS["tiny_qwen2_vl"].with_overrides({"vision.hidden_act": "gelu",
                                                                           "vision.spatial_merge_size": 1})],
                         ids=["tiny", "tiny_qwen2_vl", "untied", "qwen2_vl_merge1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_bytes_is_what_a_built_model_holds(cfg, dtype):
    model = qvl.from_config(cfg, dtype=dtype)
    assert cfg.weight_bytes(dtype) == sum(p.numel() * p.element_size() for p in model.parameters())


@pytest.mark.parametrize("name", ["3b", "7b", "32b", "72b"])
def test_parameter_count_of_the_published_sizes(name):
    """Built on the meta device (no memory): the count from the config alone is the model's."""
    cfg = get_preset(name)
    with torch.device("meta"):
        model = Qwen25VL(cfg, backends="eager")
    assert cfg.num_parameters() == sum(p.numel() for p in model.parameters())


def test_parameter_count_matches_transformers():
    transformers = pytest.importorskip("transformers")
    for name in ("tiny", "tiny_qwen2_vl"):
        cfg = get_preset(name)
        kind = transformers.Qwen2VLConfig if cfg.model_type == "qwen2_vl" else transformers.Qwen2_5_VLConfig
        model_cls = (transformers.Qwen2VLForConditionalGeneration if cfg.model_type == "qwen2_vl"
                     else transformers.Qwen2_5_VLForConditionalGeneration)
        with torch.device("meta"):
            hf = model_cls(kind(**config_to_hf_dict(cfg)))
        assert cfg.num_parameters() == sum(p.numel() for p in hf.parameters()), name


def huge_config() -> Qwen25VLConfig:
    """Valid, but petabytes of weights: hidden 2**20 over 1000 layers."""
    return Qwen25VLConfig(
        text=TextConfig(vocab_size=151936, hidden_size=2**20, intermediate_size=2**22, num_hidden_layers=1000,
                        num_attention_heads=1024, num_key_value_heads=8, mrope_section=(128, 192, 192)),
        vision=VisionConfig(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=2**20),
    ).validate()


class _Tripwire:
    built = 0

    def __init__(self, *args, **kwargs):
        type(self).built += 1
        raise AssertionError("a model was built before the memory check")


def test_huge_config_is_refused_with_the_estimate_before_allocating(monkeypatch):
    monkeypatch.delenv("QVL_MEMORY_LIMIT", raising=False)
    monkeypatch.setattr(qvl.checkpoint, "Qwen25VL", _Tripwire)
    cfg = huge_config()
    start = time.perf_counter()
    message = refused(qvl.from_config, cfg, dtype=torch.bfloat16, error=ResourceError)
    assert time.perf_counter() - start < 1.0
    assert _Tripwire.built == 0
    assert message.startswith(f"this config's weights ({cfg.num_parameters():,} parameters) in bfloat16 need "), message
    assert "PiB; cpu has " in message and "free" in message


def test_memory_limit_refuses_even_the_tiny_model(monkeypatch):
    monkeypatch.setenv("QVL_MEMORY_LIMIT", str(100_000))
    monkeypatch.setattr(qvl.checkpoint, "Qwen25VL", _Tripwire)
    message = refused(qvl.from_config, "tiny", error=ResourceError)
    assert message == ("the tiny preset's weights (244,640 parameters) in float32 need 956 KiB; cpu has 97.7 KiB "
                       "free (qvl uses at most 90% of it)")
    assert _Tripwire.built == 0
    monkeypatch.undo()
    assert isinstance(qvl.from_config("tiny"), Qwen25VL)


def test_memory_limit_refuses_a_checkpoint(tmp_path, monkeypatch):
    qvl.save_pretrained(qvl.from_config("tiny"), tmp_path)
    monkeypatch.setenv("QVL_MEMORY_LIMIT", str(TINY.weight_bytes(torch.float32)))  # 90% of it is usable: too little
    assert "the tiny preset's weights" in refused(qvl.from_pretrained, tmp_path, error=ResourceError)
    monkeypatch.setenv("QVL_MEMORY_LIMIT", str(2 * TINY.weight_bytes(torch.float32)))
    assert isinstance(qvl.from_pretrained(tmp_path), Qwen25VL)


def test_bad_dtype_is_refused():
    assert refused(qvl.from_config, "tiny", dtype=torch.int8) == (
        "dtype must be float32, float16 or bfloat16, got torch.int8")
    assert "got ['float32']" in refused(qvl.from_config, "tiny", dtype=["float32"])


# --- config.json files --------------------------------------------------------------------------------------------


def write_config(folder, data: bytes):
    (folder / "config.json").write_bytes(data)
    return folder / "config.json"


@pytest.mark.parametrize("data, message", [
    (b'{"model_type": "qwen2_5_vl", "vocab_size": "\xff\xfe"}', ": not UTF-8 (byte 0xff at offset 44)"),
    (b"\x89PNG\r\n\x1a\n", ": not UTF-8 (byte 0x89 at offset 0)"),
    (b"{not json", ": not JSON: Expecting property name enclosed in double quotes: line 1 column 2"),
    (b"", ": empty, not JSON"),
    (b"[1, 2]", ": must hold a JSON object, got list"),
    (b'"qwen2_5_vl"', ": must hold a JSON object, got str"),
    (b"null", ": must hold a JSON object, got NoneType"),
    (b"[" * 100_000 + b"]" * 100_000, ": not usable JSON: nested too deeply"),
    (b'{"vocab_size": 1' + b"0" * 5000 + b"}", ": not JSON: Exceeds the limit (4300 digits)"),
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 1234\n",
     ": a Git LFS pointer file for 1234 bytes, not the file itself: run `git lfs pull`"),
    (b'{"model_type": "llava"}', ": model_type 'llava' unknown; qvl reads only 'qwen2_5_vl' and 'qwen2_vl'"),
    (b'{"model_type": "qwen2_5_vl"}', ": missing required text fields: vocab_size, hidden_size, intermediate_size, "
                                      "num_hidden_layers, num_attention_heads"),
], ids=["latin1", "png", "not-json", "empty", "array", "string", "null", "deep", "digits", "lfs", "llava",
        "missing"])
def test_unreadable_config_json(tmp_path, data, message):
    path = write_config(tmp_path, data)
    got = refused(load_hf_config, tmp_path)
    assert got.startswith(f"{path}{message}"), got


def test_config_json_that_is_a_directory(tmp_path):
    (tmp_path / "config.json").mkdir()
    assert refused(load_hf_config, tmp_path).startswith(f"{tmp_path / 'config.json'}: is a directory")


def test_config_json_that_is_a_device(tmp_path):
    if not os.path.exists("/dev/zero"):
        pytest.skip("no /dev/zero here")
    os.symlink("/dev/zero", tmp_path / "config.json")
    assert refused(load_hf_config, tmp_path).startswith(f"{tmp_path / 'config.json'}: is not a regular file")


def test_config_json_too_large_is_refused_before_reading(tmp_path):
    path = tmp_path / "config.json"
    with open(path, "wb") as f:
        f.truncate(2**34)  # sparse 16 GiB: reading it would take minutes and all the memory
    start = time.perf_counter()
    assert refused(load_hf_config, path).startswith(f"{path}: 17179869184 bytes, over the ")
    assert time.perf_counter() - start < 1.0


def test_missing_config_json(tmp_path):
    assert refused(load_hf_config, tmp_path) == f"no config.json at {tmp_path / 'config.json'}"
    os.symlink(tmp_path / "elsewhere.json", tmp_path / "config.json")  # dangling
    assert refused(load_hf_config, tmp_path).startswith(f"{tmp_path / 'config.json'}: no such file")


def test_missing_vision_config(tmp_path):
    hf = hf_dict()
    del hf["vision_config"]
    path = write_config(tmp_path, json.dumps(hf).encode())
    assert refused(load_hf_config, path) == f"{path}: has no vision_config object"
    hf["vision_config"] = [1]
    write_config(tmp_path, json.dumps(hf).encode())
    assert refused(load_hf_config, path) == f"{path}: vision_config must be an object, got [1]"


def test_bad_config_through_from_pretrained_and_the_cli(tmp_path, capsys):
    """The checkpoint loader and `qvl generate` report the same one line (the CLI with exit status 2)."""
    qvl.save_pretrained(qvl.from_config("tiny"), tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    hf["vision_config"]["depth"] = "four"
    (tmp_path / "config.json").write_text(json.dumps(hf))
    expected = f"{tmp_path / 'config.json'}: invalid Qwen2.5-VL config: vision_config.depth must be an integer, " \
               "got 'four'"
    assert refused(qvl.from_pretrained, tmp_path) == expected
    assert main(["generate", "--model", str(tmp_path), "--prompt", "hi"]) == 2
    assert capsys.readouterr().err == f"qvl: error: {expected}\n"


# --- overrides, presets, dataclasses ------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, message", [
    ({"vision.depth": "4"}, "invalid Qwen2.5-VL config: vision.depth must be an integer, got '4'"),
    ({"text.rope_theta": math.nan}, "invalid Qwen2.5-VL config: text.rope_theta must be a positive finite number, "
                                    "got nan"),
    ({"text.tie_word_embeddings": 0}, "invalid Qwen2.5-VL config: text.tie_word_embeddings must be true or false, "
                                      "got 0"),
    ({"text.bogus": 1}, "unknown config field 'text.bogus'; valid fields: "),
    ({"text": 1}, "unknown config field 'text'; valid fields: "),
    ({"audio.rate": 1}, "unknown config override 'audio.rate': use text.<field>, vision.<field> or <field>"),
    ({3: 1}, "unknown config override 3: use text.<field>"),
])
def test_with_overrides_refuses_unknown_keys_and_bad_values(overrides, message):
    assert refused(TINY.with_overrides, overrides).startswith(message)


def test_with_overrides_needs_a_dict():
    assert refused(TINY.with_overrides, ["vision.depth", 2]).startswith("config overrides must be a dict")


def test_with_overrides_takes_a_single_eos_id():
    assert TINY.with_overrides({"eos_token_id": 1006}).eos_token_id == (1006,)
    assert TINY.with_overrides({"pad_token_id": None}).pad_token_id is None


@pytest.mark.parametrize("name, shown", [("huge", "'huge'"), ("Tiny", "'Tiny'"), (["tiny"], "['tiny']"),
                                         (None, "None")])
def test_unknown_presets(name, shown):
    assert refused(get_preset, name) == f"unknown preset {shown}; valid options are: {', '.join(PRESETS)}"


def test_as_config_of_another_type():
    assert refused(as_config, 3) == "expected a preset name, a Qwen25VLConfig or an HF config dict, got int"


def test_configs_built_directly_are_checked_before_building():
    bad = Qwen25VLConfig(vision=VisionConfig(depth="4"))
    assert refused(qvl.from_config, bad) == "invalid Qwen2.5-VL config: vision.depth must be an integer, got '4'"
    bad = Qwen25VLConfig(text=TextConfig(num_key_value_heads=True))
    assert "text.num_key_value_heads must be an integer, got True" in refused(bad.validate)


# --- fuzz ---------------------------------------------------------------------------------------------------------


def _paths(d: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        out.append(prefix + k)
        if isinstance(v, dict):
            out += _paths(v, f"{prefix}{k}.")
    return out


_EXTRA_PATHS = ["text_config", "text_config.hidden_size", "rope_parameters", "rope_parameters.rope_theta",
                "rope_parameters.mrope_section", "vision_config.rope_parameters", "vision_config.embed_dim",
                "vision_config.mlp_ratio", "torch_dtype"]
PATHS = {p: sorted(set(_paths(hf_dict(p)) + _EXTRA_PATHS)) for p in ("tiny", "tiny_qwen2_vl")}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 2048) | st.integers(-(2**80), 2**80)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8)
    | st.sampled_from(["qwen2_5_vl", "qwen2_vl", "silu", "gelu", "mrope", "default"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)


@st.composite
def mutated_configs(draw):
    preset = draw(st.sampled_from(["tiny", "tiny_qwen2_vl"]))
    hf = hf_dict(preset)
    for path in draw(st.lists(st.sampled_from(PATHS[preset]), min_size=1, max_size=4)):
        *parents, leaf = path.split(".")
        holder = hf
        for p in parents:
            holder = holder.get(p) if isinstance(holder, dict) else None
        if not isinstance(holder, dict):
            continue  # a parent was replaced by a non-object earlier
        if draw(st.integers(0, 9)) == 0:
            holder.pop(leaf, None)
        else:
            holder[leaf] = draw(json_values)
    return hf


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_configs())
def test_fuzz_config_dicts_validate_or_raise_config_error(hf):
    """Whatever a config.json holds: a config that validates and can be sized, or a one-line ConfigError."""
    try:
        cfg = config_from_hf_dict(hf)
    except ConfigError as e:
        assert type(e) is ConfigError and str(e).startswith("config.json: ") and "\n" not in str(e), str(e)
        return
    assert cfg.validate() is cfg
    assert isinstance(cfg.weight_bytes(torch.bfloat16), int) and cfg.weight_bytes(torch.bfloat16) > 0
    assert config_from_hf_dict(config_to_hf_dict(cfg)) == cfg


@pytest.mark.parametrize("value", ["lots", "-5", "0", "1e9"])
def test_a_memory_limit_that_is_not_a_byte_count_is_refused(monkeypatch, value):
    monkeypatch.setenv("QVL_MEMORY_LIMIT", value)
    with pytest.raises(ConfigError, match="QVL_MEMORY_LIMIT must be a positive number of bytes"):
        qvl.from_config("tiny")
