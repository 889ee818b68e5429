"""Checkpoint I/O: save/load round trips, both key layouts, transformers-written checkpoints, dtypes, errors.

Everything runs on the `tiny` preset on CPU. The transformers model is only a reference for the on-disk
format (qvl itself never imports transformers).
"""

from __future__ import annotations

import json
import os
import pathlib
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import qvl
import qvl.checkpoint as ckpt
from qvl.config import config_to_hf_dict, load_hf_config
from tests.backends.model_checks import logits

transformers = pytest.importorskip("transformers")

TINY = qvl.PRESETS["tiny"]
UNTIED = TINY.with_overrides({"text.tie_word_embeddings": False})


# --- helpers -----------------------------------------------------------------------------------------------------


def _inputs(cfg=TINY):
    """A prompt with one 4x4-patch image (4 merged tokens) and some text, plus its pixels."""
    gen = torch.Generator().manual_seed(1)
    ids = [5, 6, cfg.vision_start_token_id] + [cfg.image_token_id] * 4 + [cfg.vision_end_token_id, 7, 8, 9]
    input_ids = torch.tensor([ids])
    grid = torch.tensor([[1, 4, 4]])
    pixels = torch.randn(16, cfg.vision.patch_dim, generator=gen)
    return dict(input_ids=input_ids, pixel_values=pixels, image_grid_thw=grid)


def _params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in model.named_parameters()}


def _assert_same_params(a, b):
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys()
    for name in pa:
        assert pa[name].dtype == pb[name].dtype, name
        assert torch.equal(pa[name], pb[name]), name


def _nested_key(flat: str) -> str:
    """Flat (published) key -> nested (transformers >= 4.52 in-memory) key."""
    if flat.startswith("model."):
        return "model.language_model." + flat[len("model."):]
    if flat.startswith("visual."):
        return "model." + flat
    return flat


def _flat_key(key: str) -> str:
    """Any layout -> flat key (written independently of qvl.checkpoint.canonical_key)."""
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model."):]
    if key.startswith("model.visual."):
        return key[len("model."):]
    return key


def _rewrite(directory, fn):
    """Apply fn(dict[str, Tensor]) -> dict to the single model.safetensors of a directory."""
    path = os.path.join(directory, "model.safetensors")
    tensors = fn(load_file(path))
    save_file(tensors, path, metadata={"format": "pt"})


def _hf_model(cfg, seed=0, dtype=torch.float32):
    """A transformers Qwen2.5-VL of the same shape with every tensor randomized (norms near 1)."""
    hf_cfg = transformers.Qwen2_5_VLConfig(**config_to_hf_dict(cfg))
    model = transformers.Qwen2_5_VLForConditionalGeneration(hf_cfg).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name or "ln_q" in name:
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.05 * noise)
    return model.to(dtype)


def _text_inv_freq(cfg):
    d = cfg.text.head_dim
    return 1.0 / (cfg.text.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))


def _vision_inv_freq(cfg):
    d = cfg.vision.head_dim // 2
    half = 1.0 / (cfg.vision.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    return torch.cat([half, half])


def _assert_rotary(model, cfg):
    assert model.inv_freq.dtype == torch.float32
    assert model.visual.inv_freq.dtype == torch.float32
    torch.testing.assert_close(model.inv_freq.double(), _text_inv_freq(cfg), rtol=1e-6, atol=0)
    torch.testing.assert_close(model.visual.inv_freq.double(), _vision_inv_freq(cfg), rtol=1e-6, atol=0)


# --- fixtures ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model():
    return qvl.from_config("tiny", seed=3)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_model):
    """A float32 tied tiny checkpoint written by qvl (single file). Tests must not modify it."""
    d = tmp_path_factory.mktemp("saved")
    qvl.save_pretrained(tiny_model, d)
    return d


@pytest.fixture
def saved_copy(tmp_path, saved):
    """A private copy of `saved` that a test may damage."""
    d = tmp_path / "copy"
    d.mkdir()
    for fn in os.listdir(saved):
        (d / fn).write_bytes((saved / fn).read_bytes())
    return d


@pytest.fixture(scope="module")
def hf_tied():
    return _hf_model(TINY, seed=11)


@pytest.fixture(scope="module")
def hf_untied():
    return _hf_model(UNTIED, seed=12)


# --- round trips -------------------------------------------------------------------------------------------------


def test_round_trip_single_file(saved, tiny_model):
    assert sorted(os.listdir(saved)) == ["config.json", "model.safetensors"]
    loaded = qvl.from_pretrained(saved)
    assert loaded.cfg == tiny_model.cfg
    _assert_same_params(tiny_model, loaded)
    inputs = _inputs()
    assert torch.equal(logits(tiny_model, **inputs), logits(loaded, **inputs))


def test_round_trip_sharded(tmp_path, tiny_model):
    qvl.save_pretrained(tiny_model, tmp_path, max_shard_bytes=64 * 1024)
    files = sorted(os.listdir(tmp_path))
    shards = [fn for fn in files if fn.endswith(".safetensors")]
    assert "model.safetensors" not in files
    assert "model.safetensors.index.json" in files
    assert len(shards) >= 3
    with open(tmp_path / "model.safetensors.index.json") as f:
        weight_map = json.load(f)["weight_map"]
    assert set(weight_map.values()) == set(shards)
    # Every checkpoint tensor appears exactly once, in the shard the index names.
    expected_keys = {key for srcs in ckpt.checkpoint_sources(tiny_model).values() for key, _ in srcs}
    assert set(weight_map) == expected_keys
    for fn in shards:
        assert {k for k, v in weight_map.items() if v == fn} == set(load_file(tmp_path / fn))

    loaded = qvl.from_pretrained(tmp_path)
    _assert_same_params(tiny_model, loaded)
    inputs = _inputs()
    assert torch.equal(logits(tiny_model, **inputs), logits(loaded, **inputs))


def test_saved_file_uses_flat_layout_with_split_projections(saved, tiny_model):
    tensors = load_file(saved / "model.safetensors")
    assert "lm_head.weight" not in tensors  # tied
    assert not any(k.startswith("model.language_model.") or k.startswith("model.visual.") for k in tensors)
    t = TINY.text
    q_rows, kv_rows = t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    qkv = tiny_model.model.layers[1].self_attn.qkv_proj
    assert torch.equal(tensors["model.layers.1.self_attn.q_proj.weight"], qkv.weight[:q_rows])
    assert torch.equal(tensors["model.layers.1.self_attn.k_proj.weight"], qkv.weight[q_rows:q_rows + kv_rows])
    assert torch.equal(tensors["model.layers.1.self_attn.v_proj.bias"], qkv.bias[q_rows + kv_rows:])
    gate_up = tiny_model.model.layers[0].mlp.gate_up_proj.weight
    assert torch.equal(tensors["model.layers.0.mlp.gate_proj.weight"], gate_up[:t.intermediate_size])
    assert torch.equal(tensors["model.layers.0.mlp.up_proj.weight"], gate_up[t.intermediate_size:])
    vup = tiny_model.visual.blocks[2].mlp.gate_up_proj.bias
    assert torch.equal(tensors["visual.blocks.2.mlp.up_proj.bias"], vup[TINY.vision.intermediate_size:])
    assert torch.equal(tensors["visual.merger.mlp.2.weight"], tiny_model.visual.merger.fc2.weight)


# --- key layouts -------------------------------------------------------------------------------------------------


def test_nested_layout_loads_same_weights(saved_copy, tiny_model):
    _rewrite(saved_copy, lambda t: {_nested_key(k): v for k, v in t.items()})
    keys = load_file(saved_copy / "model.safetensors").keys()
    assert any(k.startswith("model.language_model.layers.") for k in keys)
    assert any(k.startswith("model.visual.blocks.") for k in keys)
    assert not any(k.startswith("visual.") or k.startswith("model.layers.") for k in keys)
    nested = qvl.from_pretrained(saved_copy)
    _assert_same_params(tiny_model, nested)


def test_nested_layout_sharded(tmp_path, tiny_model):
    qvl.save_pretrained(tiny_model, tmp_path, max_shard_bytes=64 * 1024)
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    for fn in set(index["weight_map"].values()):
        t = load_file(tmp_path / fn)
        save_file({_nested_key(k): v for k, v in t.items()}, tmp_path / fn)
    index["weight_map"] = {_nested_key(k): v for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    _assert_same_params(tiny_model, qvl.from_pretrained(tmp_path))


# --- checkpoints written by transformers -------------------------------------------------------------------------


def _check_against_hf(model, hf):
    hf_tensors = {_flat_key(k): v.detach() for k, v in hf.state_dict().items()}
    if model.cfg.text.tie_word_embeddings:
        hf_tensors.pop("lm_head.weight", None)
    sources = ckpt.checkpoint_sources(model)
    used = set()
    for name, p in model.named_parameters():
        pieces = [hf_tensors[key] for key, _ in sorted(sources[name], key=lambda s: s[1])]
        used.update(key for key, _ in sources[name])
        expected = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
        assert p.dtype == expected.dtype, name
        assert torch.equal(p.detach(), expected), name
    assert used == set(hf_tensors), "every transformers tensor must fill a qvl parameter"

    # The fused layouts, checked against the transformers modules directly (independent of checkpoint_sources).
    for i, layer in enumerate(hf.model.language_model.layers):
        ours = model.model.layers[i]
        a, m = layer.self_attn, layer.mlp
        qkv = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])
        assert torch.equal(ours.self_attn.qkv_proj.weight, qkv)
        assert torch.equal(ours.self_attn.qkv_proj.bias, torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]))
        assert torch.equal(ours.self_attn.o_proj.weight, a.o_proj.weight)
        assert torch.equal(ours.mlp.gate_up_proj.weight, torch.cat([m.gate_proj.weight, m.up_proj.weight]))
    for i, block in enumerate(hf.model.visual.blocks):
        ours = model.visual.blocks[i]
        assert torch.equal(ours.attn.qkv.weight, block.attn.qkv.weight)
        gate_up = torch.cat([block.mlp.gate_proj.weight, block.mlp.up_proj.weight])
        assert torch.equal(ours.mlp.gate_up_proj.weight, gate_up)
        assert torch.equal(ours.mlp.gate_up_proj.bias, torch.cat([block.mlp.gate_proj.bias, block.mlp.up_proj.bias]))
    assert torch.equal(model.visual.merger.fc1.weight, hf.model.visual.merger.mlp[0].weight)
    assert torch.equal(model.visual.merger.fc2.bias, hf.model.visual.merger.mlp[2].bias)
    assert torch.equal(model.lm_weight(), hf.lm_head.weight)


@pytest.mark.parametrize("shard", [None, "20KB"], ids=["single", "sharded"])
def test_transformers_checkpoint(tmp_path, hf_tied, shard):
    kwargs = {} if shard is None else {"max_shard_size": shard}
    hf_tied.save_pretrained(tmp_path, **kwargs)
    if shard is None:
        assert (tmp_path / "model.safetensors").is_file()
    else:
        assert (tmp_path / "model.safetensors.index.json").is_file()
        assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    assert load_hf_config(tmp_path) == TINY
    model = qvl.from_pretrained(tmp_path)
    assert model.cfg == TINY
    assert model.dtype == torch.float32
    _check_against_hf(model, hf_tied)


def test_transformers_checkpoint_untied(tmp_path, hf_untied):
    hf_untied.save_pretrained(tmp_path)
    assert "lm_head.weight" in load_file(tmp_path / "model.safetensors")
    model = qvl.from_pretrained(tmp_path)
    assert model.cfg.text.tie_word_embeddings is False
    _check_against_hf(model, hf_untied)
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)


def test_transformers_checkpoint_same_logits(tmp_path, hf_tied):
    """The loaded weights mean the same thing: qvl's logits match the transformers model's."""
    hf_tied.save_pretrained(tmp_path)
    model = qvl.from_pretrained(tmp_path)
    inputs = _inputs()
    # transformers 5 derives the 3-D (M-RoPE) positions only when told which tokens are image tokens.
    mm_token_type_ids = (inputs["input_ids"] == TINY.image_token_id).int()
    with torch.no_grad():
        ref = hf_tied(**inputs, mm_token_type_ids=mm_token_type_ids).logits
    torch.testing.assert_close(logits(model, **inputs), ref, rtol=1e-4, atol=1e-4)


def test_qvl_checkpoint_readable_by_transformers(tmp_path, tiny_model):
    qvl.save_pretrained(tiny_model, tmp_path, max_shard_bytes=64 * 1024)
    hf = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path)
    _check_against_hf(tiny_model, hf)


# --- tied and untied embeddings ----------------------------------------------------------------------------------


def test_untied_round_trip(tmp_path):
    model = qvl.from_config(UNTIED, seed=5)
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    qvl.save_pretrained(model, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    assert torch.equal(tensors["lm_head.weight"], model.lm_head.weight)
    assert json.loads((tmp_path / "config.json").read_text())["tie_word_embeddings"] is False
    loaded = qvl.from_pretrained(tmp_path)
    assert loaded.cfg.text.tie_word_embeddings is False
    _assert_same_params(model, loaded)
    assert torch.equal(loaded.lm_weight(), model.lm_head.weight)
    assert not torch.equal(loaded.lm_weight(), loaded.model.embed_tokens.weight)
    inputs = _inputs()
    assert torch.equal(logits(model, **inputs), logits(loaded, **inputs))


def test_untied_checkpoint_without_lm_head_is_refused(tmp_path):
    qvl.save_pretrained(qvl.from_config(UNTIED), tmp_path)
    _rewrite(tmp_path, lambda t: {k: v for k, v in t.items() if k != "lm_head.weight"})
    with pytest.raises(qvl.CheckpointError, match=r"missing keys \(1\): lm_head\.weight"):
        qvl.from_pretrained(tmp_path)


def test_tied_checkpoint_with_lm_head_loads(saved_copy, tiny_model):
    def add_head(t):
        t["lm_head.weight"] = t["model.embed_tokens.weight"].clone()
        return t

    _rewrite(saved_copy, add_head)
    loaded = qvl.from_pretrained(saved_copy)
    assert not hasattr(loaded, "lm_head")
    _assert_same_params(tiny_model, loaded)
    assert torch.equal(loaded.lm_weight(), tiny_model.model.embed_tokens.weight)


# --- failures ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["model.layers.1.self_attn.k_proj.weight", "visual.merger.mlp.0.bias",
                                 "model.embed_tokens.weight"])
def test_missing_key_is_named(saved_copy, key):
    _rewrite(saved_copy, lambda t: {k: v for k, v in t.items() if k != key})
    with pytest.raises(qvl.CheckpointError, match=r"missing keys \(1\): " + key.replace(".", r"\.") + "$"):
        qvl.from_pretrained(saved_copy)


def test_unexpected_key_is_named(saved_copy):
    def add(t):
        t["model.layers.0.self_attn.rotary_emb.extra"] = torch.zeros(3)
        return t

    _rewrite(saved_copy, add)
    with pytest.raises(qvl.CheckpointError,
                       match=r"unexpected keys \(1\): model\.layers\.0\.self_attn\.rotary_emb\.extra"):
        qvl.from_pretrained(saved_copy)


@pytest.mark.parametrize("key, bad, good", [
    ("model.norm.weight", [65], [64]),
    ("model.layers.0.self_attn.v_proj.weight", [16, 64], [32, 64]),
    ("visual.blocks.3.mlp.up_proj.bias", [63], [64]),
    ("visual.patch_embed.proj.weight", [32, 3, 1, 14, 14], [32, 3, 2, 14, 14]),
])
def test_shape_mismatch_names_key_and_shapes(saved_copy, key, bad, good):
    _rewrite(saved_copy, lambda t: {**t, key: torch.zeros(bad)})
    msg = f"{key}: checkpoint {bad} vs model {good}"
    with pytest.raises(qvl.CheckpointError, match="shape mismatches") as info:
        qvl.from_pretrained(saved_copy)
    assert msg in str(info.value)


def test_sharded_index_naming_missing_shard(tmp_path, tiny_model):
    qvl.save_pretrained(tiny_model, tmp_path, max_shard_bytes=64 * 1024)
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    victim = shards[1].name
    shards[1].unlink()
    with pytest.raises(qvl.CheckpointError, match=r"shard files that are missing: " + victim.replace(".", r"\.")):
        qvl.from_pretrained(tmp_path)


def test_index_with_shard_not_on_disk(tmp_path, tiny_model):
    qvl.save_pretrained(tiny_model, tmp_path, max_shard_bytes=64 * 1024)
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.norm.weight"] = "model-extra.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(qvl.CheckpointError, match=r"model-extra\.safetensors"):
        qvl.from_pretrained(tmp_path)


def test_no_weights(tmp_path, saved):
    (tmp_path / "config.json").write_bytes((saved / "config.json").read_bytes())
    with pytest.raises(qvl.CheckpointError,
                       match=r"no weights in .*expected model\.safetensors or model\.safetensors\.index\.json"):
        qvl.from_pretrained(tmp_path)


def test_missing_directory(tmp_path):
    with pytest.raises(qvl.CheckpointError):
        qvl.from_pretrained(tmp_path / "nope")
    with pytest.raises(qvl.CheckpointError, match="does not exist"):
        ckpt.load_weights(qvl.from_config("tiny"), str(tmp_path / "nope"))


class _Trap:
    """Unpickling this creates a file: proof that a pickle was (wrongly) loaded."""

    def __init__(self, path):
        self.path = pathlib.Path(path)

    def __reduce__(self):
        return (pathlib.Path.touch, (self.path,))


@pytest.mark.parametrize("payload", ["trap", "garbage"])
def test_pickle_only_directory_is_refused_unopened(tmp_path, saved, payload):
    (tmp_path / "config.json").write_bytes((saved / "config.json").read_bytes())
    sentinel = tmp_path.parent / f"{tmp_path.name}-unpickled"
    data = pickle.dumps({"model.norm.weight": _Trap(sentinel)}) if payload == "trap" else b"\x80\x04garbage" * 10
    (tmp_path / "pytorch_model.bin").write_bytes(data)
    if payload == "trap":  # the trap works: loading it would have a visible effect
        probe = tmp_path.parent / f"{tmp_path.name}-probe"
        pickle.loads(pickle.dumps(_Trap(probe)))
        assert probe.exists()
        probe.unlink()
    with pytest.raises(qvl.CheckpointError, match=r"pickle files \(pytorch_model\.bin\), which qvl never loads"):
        qvl.from_pretrained(tmp_path)
    assert not sentinel.exists()


def test_pickle_next_to_safetensors_is_ignored(saved_copy, tiny_model):
    sentinel = saved_copy.parent / "unpickled"
    (saved_copy / "pytorch_model.bin").write_bytes(pickle.dumps(_Trap(sentinel)))
    _assert_same_params(tiny_model, qvl.from_pretrained(saved_copy))
    assert not sentinel.exists()


def test_unsupported_dtype(saved):
    with pytest.raises(ValueError, match="dtype must be float32, float16 or bfloat16"):
        qvl.from_pretrained(saved, dtype=torch.float64)


# --- dtypes ------------------------------------------------------------------------------------------------------


def test_load_as_bf16_rounds_float32_checkpoint(saved, tiny_model):
    model = qvl.from_pretrained(saved, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    ref = _params(tiny_model)
    for name, p in model.named_parameters():
        assert p.dtype == torch.bfloat16, name
        assert torch.equal(p.detach(), ref[name].to(torch.bfloat16)), name
    _assert_rotary(model, TINY)
    torch.testing.assert_close(model.inv_freq, tiny_model.inv_freq, rtol=0, atol=0)
    torch.testing.assert_close(model.visual.inv_freq, tiny_model.visual.inv_freq, rtol=0, atol=0)
    with torch.no_grad():
        logits = model(**_inputs()).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


def test_float32_load_has_correct_rotary(saved):
    _assert_rotary(qvl.from_pretrained(saved), TINY)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtype_none_follows_config(tmp_path, dtype):
    model = qvl.from_config("tiny", dtype=dtype, seed=2)
    qvl.save_pretrained(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == str(dtype).removeprefix("torch.")
    loaded = qvl.from_pretrained(tmp_path)  # dtype=None
    assert loaded.dtype == dtype
    assert all(p.dtype == dtype for p in loaded.parameters())
    _assert_same_params(model, loaded)
    _assert_rotary(loaded, TINY)
    # An explicit dtype wins over the config's.
    assert qvl.from_pretrained(tmp_path, dtype=torch.float32).dtype == torch.float32


def test_dtype_none_follows_transformers_config(tmp_path):
    hf = _hf_model(TINY, seed=13, dtype=torch.bfloat16)
    hf.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert (raw.get("dtype") or raw.get("torch_dtype")) == "bfloat16"
    model = qvl.from_pretrained(tmp_path)
    assert model.dtype == torch.bfloat16
    _check_against_hf(model, hf)
    _assert_rotary(model, TINY)


class _Float32Spy(TorchDispatchMode):
    """Records every materialized float32 tensor at least `min_numel` large produced by an aten op."""

    def __init__(self, min_numel):
        super().__init__()
        self.min_numel = min_numel
        self.hits = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if (isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.device.type != "meta"
                    and t.numel() >= self.min_numel):
                self.hits.append((str(func), tuple(t.shape)))
        return out


def _smallest_param(model):
    return min(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def saved_bf16(tmp_path_factory):
    model = qvl.from_config("tiny", dtype=torch.bfloat16, seed=4)
    d = tmp_path_factory.mktemp("bf16")
    qvl.save_pretrained(model, d, max_shard_bytes=64 * 1024)
    return d, model


def test_bf16_checkpoint_loads_without_float32_copy(saved_bf16):
    directory, model = saved_bf16
    assert {t.dtype for fn in directory.glob("*.safetensors") for t in load_file(fn).values()} == {torch.bfloat16}
    spy = _Float32Spy(min_numel=_smallest_param(model))
    with spy:
        loaded = qvl.from_pretrained(directory, dtype=torch.bfloat16)
    assert spy.hits == []
    _assert_same_params(model, loaded)
    _assert_rotary(loaded, TINY)


def test_float32_spy_catches_a_float32_detour(saved_bf16, monkeypatch):
    """Positive control: an allocator that builds in float32 and converts afterwards is detected."""
    directory, model = saved_bf16
    real_allocate = ckpt._allocate

    def allocate_via_float32(cfg, dtype, device, backends, fallback, *parallel):
        return real_allocate(cfg, torch.float32, device, backends, fallback, *parallel).to(dtype)

    monkeypatch.setattr(ckpt, "_allocate", allocate_via_float32)
    spy = _Float32Spy(min_numel=_smallest_param(model))
    with spy:
        loaded = qvl.from_pretrained(directory, dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16
    assert any(shape == tuple(model.model.embed_tokens.weight.shape) for _, shape in spy.hits)


# --- config.json rope spellings ----------------------------------------------------------------------------------


def _expected_cfg():
    # Non-default values, so the test sees that they are actually read.
    return TINY.with_overrides({"text.rope_theta": 250000.0, "text.mrope_section": (2, 2, 4),
                                "vision.rope_theta": 5000.0})


def _flat_rope_config(cfg):
    hf = config_to_hf_dict(cfg)
    hf["rope_theta"] = cfg.text.rope_theta
    hf["rope_scaling"] = {"type": "mrope", "mrope_section": list(cfg.text.mrope_section)}
    hf["vision_config"]["rope_parameters"] = {"rope_theta": cfg.vision.rope_theta, "rope_type": "axial"}
    return hf


def _nested_rope_config(cfg):
    """The transformers 5 layout: decoder fields (and bos/eos/pad) under text_config, rope_parameters."""
    flat = config_to_hf_dict(cfg)
    text_keys = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "hidden_act", "rms_norm_eps", "max_position_embeddings",
                 "use_sliding_window", "attention_dropout", "bos_token_id", "eos_token_id", "pad_token_id"]
    text = {k: flat[k] for k in text_keys}
    text["model_type"] = "qwen2_5_vl_text"
    text["rope_parameters"] = {"rope_theta": cfg.text.rope_theta, "mrope_section": list(cfg.text.mrope_section),
                               "rope_type": "default"}
    vision = {k: v for k, v in flat["vision_config"].items() if k != "in_chans"}
    vision["rope_parameters"] = {"rope_theta": cfg.vision.rope_theta, "rope_type": "axial"}
    top = {k: flat[k] for k in ("architectures", "model_type", "tie_word_embeddings", "image_token_id",
                                "video_token_id", "vision_start_token_id", "vision_end_token_id")}
    return {**top, "dtype": "float32", "text_config": text, "vision_config": vision}


def test_rope_spellings_parse_to_same_config(tmp_path):
    expected = _expected_cfg()
    flat, nested = _flat_rope_config(expected), _nested_rope_config(expected)
    assert "rope_theta" not in nested and "vocab_size" not in nested and "rope_scaling" not in nested["text_config"]
    (tmp_path / "flat").mkdir()
    (tmp_path / "nested").mkdir()
    (tmp_path / "flat" / "config.json").write_text(json.dumps(flat))
    (tmp_path / "nested" / "config.json").write_text(json.dumps(nested))
    a, b = load_hf_config(tmp_path / "flat"), load_hf_config(tmp_path / "nested")
    assert a == b == expected
    assert a.text.rope_theta == 250000.0 and a.text.mrope_section == (2, 2, 4)


def test_transformers_written_config_parses(tmp_path):
    expected = _expected_cfg()
    hf_cfg = transformers.Qwen2_5_VLConfig(**_flat_rope_config(expected))
    hf_cfg.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert "rope_parameters" in raw["text_config"]
    assert load_hf_config(tmp_path) == expected


@pytest.mark.parametrize("layout", ["flat", "nested"])
def test_rope_spelling_reaches_model(tmp_path, layout):
    expected = _expected_cfg()
    model = qvl.from_config(expected, seed=6)
    qvl.save_pretrained(model, tmp_path)
    hf = _flat_rope_config(expected) if layout == "flat" else _nested_rope_config(expected)
    (tmp_path / "config.json").write_text(json.dumps(hf))
    loaded = qvl.from_pretrained(tmp_path)
    assert loaded.cfg == expected
    _assert_same_params(model, loaded)
    _assert_rotary(loaded, expected)
    inputs = _inputs()
    assert torch.equal(logits(model, **inputs), logits(loaded, **inputs))


# --- regressions: bugs found while writing these tests ------------------------------------------------------------


def test_resave_single_file_over_sharded_save(tmp_path):
    first, second = qvl.from_config("tiny", seed=1), qvl.from_config("tiny", seed=2)
    qvl.save_pretrained(first, tmp_path, max_shard_bytes=64 * 1024)
    qvl.save_pretrained(second, tmp_path)
    _assert_same_params(second, qvl.from_pretrained(tmp_path))


def test_resave_sharded_over_single_file_and_with_fewer_shards(tmp_path):
    models = [qvl.from_config("tiny", seed=s) for s in (1, 2, 3)]
    qvl.save_pretrained(models[0], tmp_path)
    qvl.save_pretrained(models[1], tmp_path, max_shard_bytes=64 * 1024)
    assert not (tmp_path / "model.safetensors").exists()
    _assert_same_params(models[1], qvl.from_pretrained(tmp_path))
    qvl.save_pretrained(models[2], tmp_path, max_shard_bytes=256 * 1024)  # fewer shards: the old ones go
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert sorted(fn for fn in os.listdir(tmp_path) if fn.endswith(".safetensors")) == sorted(
        set(index["weight_map"].values()))
    _assert_same_params(models[2], qvl.from_pretrained(tmp_path))


@pytest.mark.parametrize("fails_at", ["second shard", "config.json"])
def test_a_failed_save_keeps_the_earlier_checkpoint(tmp_path, monkeypatch, fails_at):
    """Nothing lost when a save fails halfway: the directory still holds the earlier save, whole, and no
    partial files."""
    first, second = qvl.from_config("tiny", seed=1), qvl.from_config(UNTIED, seed=2)
    qvl.save_pretrained(first, tmp_path, max_shard_bytes=64 * 1024)
    before = {fn: (tmp_path / fn).read_bytes() for fn in os.listdir(tmp_path)}
    import safetensors.torch

    calls, json_dump = [], json.dump  # the real ones, called by the failing stand-ins

    def save_file_failing(tensors, filename, metadata=None):
        calls.append(filename)
        if fails_at == "second shard" and len(calls) == 2:
            raise OSError(28, "No space left on device")
        save_file(tensors, filename, metadata=metadata)

    def dump_failing(obj, f, **kwargs):
        if "vision_config" in obj:  # the config, written last
            raise OSError(28, "No space left on device")
        json_dump(obj, f, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file_failing)
    if fails_at == "config.json":
        monkeypatch.setattr(ckpt.json, "dump", dump_failing)
    with pytest.raises(OSError, match="No space left"):
        qvl.save_pretrained(second, tmp_path, max_shard_bytes=32 * 1024)
    monkeypatch.undo()
    assert {fn: (tmp_path / fn).read_bytes() for fn in os.listdir(tmp_path)} == before
    _assert_same_params(first, qvl.from_pretrained(tmp_path))


def test_vision_rope_theta_and_eps_round_trip(tmp_path):
    cfg = TINY.with_overrides({"vision.rope_theta": 5000.0, "vision.rms_norm_eps": 1e-5})
    qvl.save_pretrained(qvl.from_config(cfg), tmp_path)
    assert load_hf_config(tmp_path) == cfg


def test_same_tensor_under_both_layouts_is_refused(saved_copy):
    def duplicate(t):
        t["model.language_model.norm.weight"] = torch.full_like(t["model.norm.weight"], 7.0)
        return t

    _rewrite(saved_copy, duplicate)
    with pytest.raises(qvl.CheckpointError, match=r"keys present twice \(1\): ") as info:
        qvl.from_pretrained(saved_copy)
    assert "model.norm.weight in model.safetensors" in str(info.value)
    assert "model.language_model.norm.weight in model.safetensors" in str(info.value)


# --- vision configs transformers accepts -------------------------------------------------------------------------


def test_full_attention_indexes_past_the_depth_are_ignored(tmp_path):
    """transformers accepts fullatt_block_indexes naming blocks the tower does not have (they never match a block):
    qvl loads such a checkpoint, keeps the indexes as written, and computes the same logits."""
    from tests.model.test_parity import perturbed_hf_model

    cfg = TINY.with_overrides({"vision.fullatt_block_indexes": [1, 7, 15, 23, 31]})  # depth 4: 7.. are past it
    hf = perturbed_hf_model(cfg)
    hf.save_pretrained(tmp_path)
    model = qvl.from_pretrained(tmp_path)
    assert model.cfg.vision.fullatt_block_indexes == (1, 7, 15, 23, 31)
    inputs = _inputs()
    mm_token_type_ids = (inputs["input_ids"] == TINY.image_token_id).int()
    with torch.no_grad():
        ref = hf(**inputs, mm_token_type_ids=mm_token_type_ids).logits
    torch.testing.assert_close(logits(model, **inputs), ref, rtol=1e-4, atol=1e-4)
    assert json.loads((tmp_path / "config.json").read_text())["vision_config"]["fullatt_block_indexes"] == [
        1, 7, 15, 23, 31]


def test_negative_full_attention_indexes_are_refused():
    with pytest.raises(ValueError, match=r"fullatt_block_indexes \[-1\] are negative"):
        TINY.with_overrides({"vision.fullatt_block_indexes": [-1, 2]})


def test_qwen2_vl_checkpoint_keeps_transformers_names(tmp_path):
    """A Qwen2-VL model saves its vision weights under transformers' names: LayerNorm biases, mlp.fc1/fc2, the
    merger's ln_q bias and mlp.0/mlp.2; no Qwen2.5-VL gate/up names."""
    cfg = qvl.PRESETS["tiny_qwen2_vl"]
    model = qvl.from_config(cfg)
    qvl.save_pretrained(model, tmp_path)
    keys = set(load_file(tmp_path / "model.safetensors"))
    for key in ("visual.blocks.0.norm1.bias", "visual.blocks.2.norm2.weight", "visual.blocks.1.mlp.fc1.weight",
                "visual.blocks.1.mlp.fc2.bias", "visual.merger.ln_q.bias", "visual.merger.mlp.0.weight",
                "visual.merger.mlp.2.bias"):
        assert key in keys, key
    assert not any("gate_proj" in k and k.startswith("visual.") for k in keys)
    assert load_hf_config(tmp_path) == cfg
    _assert_same_params(qvl.from_pretrained(tmp_path), model)
