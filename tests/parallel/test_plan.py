"""qvl.parallel.plan and `qvl plan`: the weights per rank equal the real pieces' bytes, the KV cache per token is
the cache's own arithmetic, and the longest context is the longest cache qvl's memory check lets through."""

from __future__ import annotations

import json
import math

import pytest
import torch

import qvl
from qvl.cli import main
from qvl.config import config_to_hf_dict, get_preset
from qvl.errors import ConfigError, ResourceError
from qvl.memory import USABLE_SHARE
from qvl.model.cache import StaticKVCache
from qvl.parallel import format_plan, memory_plan, parse_bytes, rank_bytes, rank_slice

GIB = 2**30
TINY = get_preset("tiny")


@pytest.mark.parametrize("preset", ["tiny", "tiny_qwen2_vl", "3b", "32b", "72b"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weights_at_tp_1_are_the_whole_model(preset, dtype):
    cfg = get_preset(preset)
    assert memory_plan(cfg, dtype, 1, 141 * GIB).weight_bytes == cfg.weight_bytes(dtype)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_weights_per_rank_are_the_real_pieces_bytes(tp):
    model = qvl.from_config(TINY)
    real = sum(rank_slice(n, p.detach(), TINY, tp, 0).numel() * 4 for n, p in model.named_parameters())
    plan = memory_plan(TINY, torch.float32, tp, GIB)
    assert plan.weight_bytes == real
    assert plan.vision_bytes == sum(p.numel() * 4 for n, p in model.named_parameters() if n.startswith("visual."))
    if tp == 1:
        assert real == sum(p.numel() * 4 for p in model.parameters())


@pytest.mark.parametrize("tp,kv_heads", [(1, 2), (2, 1), (4, 1)])  # tiny: 2 KV heads, replicated at tp 4
@pytest.mark.parametrize("batch", [1, 3])
def test_kv_cache_per_token(tp, kv_heads, batch):
    t = TINY.text
    plan = memory_plan(TINY, torch.bfloat16, tp, GIB, batch=batch)
    assert plan.kv_bytes_per_token == t.num_hidden_layers * 2 * kv_heads * t.head_dim * 2 * batch
    # the model's own cache holds exactly that per position
    model = qvl.from_config(TINY)
    cache = model.new_cache(batch, 10)
    assert (cache.k.numel() + cache.v.numel()) * 4 // 10 == memory_plan(TINY, torch.float32, 1, GIB,
                                                                         batch=batch).kv_bytes_per_token


def test_longest_context_is_what_qvl_memory_check_lets_through(monkeypatch):
    """Weights in USABLE_SHARE of the memory, the cache in USABLE_SHARE of what they leave: exactly the checks of
    qvl.memory.ensure_fits (QVL_MEMORY_LIMIT stands for the free memory once the weights are in)."""
    t = TINY.text
    for tp, batch in [(1, 1), (2, 1), (2, 3), (4, 2)]:
        one = memory_plan(TINY, torch.float32, tp, GIB, batch)
        want = 1000
        memory = one.weight_bytes + math.ceil((want + 0.5) * one.kv_bytes_per_token / USABLE_SHARE)
        plan = memory_plan(TINY, torch.float32, tp, memory, batch)
        assert plan.max_context == plan.room == want and plan.note == "the cache fills the memory left"
        assert plan.cache_bytes == want * plan.kv_bytes_per_token
        assert plan.free_bytes == memory - plan.weight_bytes - plan.cache_bytes > 0
        kv_heads = plan.kv_bytes_per_token // (t.num_hidden_layers * 2 * t.head_dim * 4 * batch)
        monkeypatch.setenv("QVL_MEMORY_LIMIT", str(memory - plan.weight_bytes))
        StaticKVCache.ensure_fits(t.num_hidden_layers, batch, want, kv_heads, t.head_dim, torch.float32, "cpu")
        with pytest.raises(ResourceError):
            StaticKVCache.ensure_fits(t.num_hidden_layers, batch, want + 1, kv_heads, t.head_dim, torch.float32, "cpu")


def test_weights_that_do_not_fit_leave_no_context_and_say_why():
    plan = memory_plan(get_preset("72b"), torch.bfloat16, 1, 141 * GIB)
    assert not plan.weights_fit and plan.max_context == plan.room == 0
    assert plan.note == "the weights alone need 137 GiB of 127 GiB usable"
    weights = memory_plan(TINY, torch.float32, 1, GIB).weight_bytes
    at_edge = math.ceil(weights / USABLE_SHARE)  # the weights just fit
    assert memory_plan(TINY, torch.float32, 1, at_edge).weights_fit
    assert not memory_plan(TINY, torch.float32, 1, at_edge - 1).weights_fit
    crowded = memory_plan(TINY, torch.float32, 1, at_edge, batch=10**4)  # one position of 10^4 rows: 4.9 MiB
    assert crowded.max_context == 0 and crowded.note == "no room for one position's cache"


def test_longest_context_is_capped_at_max_position_embeddings():
    plan = memory_plan(get_preset("72b"), torch.bfloat16, 2, 141 * GIB)
    assert plan.max_context == 128000 < plan.room
    assert plan.note == f"max_position_embeddings (room for {plan.room:,})"
    assert plan.room == int(USABLE_SHARE * (141 * GIB - plan.weight_bytes) // plan.kv_bytes_per_token)


def test_bad_arguments_are_refused():
    with pytest.raises(ConfigError, match="^tp 3 cannot split num_attention_heads 4"):
        memory_plan(TINY, torch.float32, 3, GIB)
    with pytest.raises(ConfigError, match=r"^batch must be an integer >= 1, got 0$"):
        memory_plan(TINY, torch.float32, 1, GIB, batch=0)
    with pytest.raises(ConfigError, match=r"^memory_bytes must be an integer >= 1, got 1.5$"):
        memory_plan(TINY, torch.float32, 1, 1.5)
    with pytest.raises(ConfigError, match=r"^dtype must be float32, float16 or bfloat16, got torch.int8$"):
        memory_plan(TINY, torch.int8, 1, GIB)


def test_parse_bytes():
    assert parse_bytes("141GiB") == 141 * GIB
    assert parse_bytes("80GB") == 80 * 10**9
    assert parse_bytes("80 gb") == 80 * 10**9
    assert parse_bytes("1.5TiB") == 3 * 2**39
    assert parse_bytes("1000") == parse_bytes("1000B") == 1000
    for bad in ("", "GiB", "12XB", "-1GiB", "1e9", "0", "0.1B", "9" * 41, "99999999999TiB"):
        with pytest.raises(ConfigError):
            parse_bytes(bad)


def test_table_rows():
    rows = [memory_plan(TINY, torch.float32, tp, GIB) for tp in (1, 2)] + [(3, "tp 3 cannot split x")]
    lines = format_plan(rows).splitlines()
    assert lines[0].split()[:3] == ["tp", "weights/rank", "vision/rank"]
    assert lines[1].split()[0] == "1" and "4,096" in lines[1]
    assert lines[3].split()[:2] == ["3", "-"] and lines[3].endswith("tp 3 cannot split x")


# --- qvl plan ------------------------------------------------------------------------------------------------------


def test_cli_prints_one_row_per_degree(capsys):
    assert main(["plan", "--preset", "72b", "--tp", "1", "2", "4", "8", "--memory", "141GiB"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "qvl plan: preset 72b, 73,410,777,344 parameters in bfloat16; 141 GiB per rank, batch 1"
    rows = {line.split()[0]: line for line in out[2:6]}
    assert list(rows) == ["1", "2", "4", "8"]
    assert "the weights alone need 137 GiB" in rows["1"]
    assert rows["2"].split()[:3] == ["2", "69", "GiB"] and "128,000" in rows["2"]


def test_cli_defaults_and_checkpoint(tmp_path, capsys):
    """No --tp: the degrees up to 8 that split the model; --checkpoint reads config.json, same numbers."""
    assert main(["plan", "--preset", "32b", "--memory", "80GB", "--dtype", "float16", "--batch", "2"]) == 0
    by_preset = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in by_preset[2:6]] == ["1", "2", "4", "8"]
    (tmp_path / "config.json").write_text(json.dumps(config_to_hf_dict(get_preset("32b"))))
    assert main(["plan", "--checkpoint", str(tmp_path), "--memory", "80GB", "--dtype", "float16", "--batch", "2"]) == 0
    assert capsys.readouterr().out.splitlines()[1:] == by_preset[1:]


def test_cli_refused_degrees(capsys):
    """One degree that cannot split: an error line, status 2. Among several: a row, status 0; all: an error."""
    assert main(["plan", "--preset", "tiny", "--tp", "3", "--memory", "1GiB"]) == 2
    err = capsys.readouterr().err
    assert err == "qvl: error: tp 3 cannot split num_attention_heads 4; degrees that split every dimension: 1, 2, 4\n"
    assert main(["plan", "--preset", "tiny", "--tp", "2", "3", "--memory", "1GiB"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[3].split()[:2] == ["3", "-"] and "tp 3 cannot split num_attention_heads 4" in out[3]
    assert main(["plan", "--preset", "tiny", "--tp", "3", "8", "--memory", "1GiB"]) == 2
    assert capsys.readouterr().err.startswith("qvl: error: tp 3 cannot split")


@pytest.mark.parametrize("argv,message", [
    (["--preset", "tiny", "--memory", "lots"], "argument --memory: cannot read 'lots' as a size"),
    (["--preset", "tiny", "--memory", "0"], "argument --memory: a size must be between 1 byte and 8 EiB"),
    (["--preset", "tiny", "--memory", "1GiB", "--tp", "0"], "argument --tp: must be a positive integer, got '0'"),
    (["--preset", "tiny", "--memory", "1GiB", "--tp", "two"], "argument --tp: must be a positive integer"),
    (["--preset", "tiny", "--memory", "1GiB", "--batch", "-1"], "argument --batch: must be a positive integer"),
    (["--memory", "1GiB"], "one of the arguments --preset --checkpoint is required"),
    (["--preset", "tiny"], "the following arguments are required: --memory"),
    (["--preset", "huge", "--memory", "1GiB"], "argument --preset: invalid choice: 'huge'"),
])
def test_cli_usage_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        main(["plan", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"qvl: error: plan: {message}") and err.count("\n") == 1


def test_cli_missing_checkpoint(tmp_path, capsys):
    assert main(["plan", "--checkpoint", str(tmp_path / "nowhere"), "--memory", "1GiB"]) == 2
    assert capsys.readouterr().err.startswith("qvl: error: no config.json at ")


def test_a_split_vision_tower_is_planned_per_rank(capsys):
    cfg = get_preset("72b")
    data, split = (memory_plan(cfg, torch.bfloat16, 8, 141 * GIB, vision=v) for v in ("data", "tensor"))
    assert data.vision_bytes == rank_bytes(cfg, torch.bfloat16, 1, tower="vision")  # whole on every rank
    assert split.vision_bytes == rank_bytes(cfg, torch.bfloat16, 8, tower="vision", vision="tensor")
    assert split.vision_bytes < data.vision_bytes / 4
    assert split.weight_bytes - split.vision_bytes == data.weight_bytes - data.vision_bytes  # the same decoder
    assert main(["plan", "--preset", "3b", "--memory", "80GB", "--vision", "tensor"]) == 0
    out = capsys.readouterr().out
    assert "the vision tower split like the decoder" in out
    assert [line.split()[0] for line in out.splitlines()[2:5]] == ["1", "2", "4"]  # 8 cannot split its MLP width
