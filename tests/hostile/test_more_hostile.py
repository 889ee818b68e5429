"""More hostile use, found by attacking the CLI and the API past the other tests/hostile files: devices torch
parses but qvl cannot run on, seeds and paths of the wrong type, backend specs that contradict themselves, empty
paths on the command line, `qvl demo` and ablation workloads whose prompt cannot fit the model's positions or
memory (refused before anything is built, by `qvl ablate --check` too), seeds and names in ablation configs, a
byte-order mark before a config's TOML, generation_config.json's eos ids, a tokenizer.json that is not a file.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qvl
import qvl.demo
from qvl.ablate import load_config, parse_config
from qvl.ablate.config import ImageSpec, VideoSpec, WorkloadSpec, with_preset
from qvl.ablate.runner import make_run_dir
from qvl.ablate.workload import build_workload, check_workload
from qvl.backends import OPERATORS, parse_spec, resolve_plan
from qvl.config import get_preset
from qvl.devices import parse_device
from qvl.errors import CheckpointError, ConfigError, InputError, ResourceError
from qvl.generate_cli import resolve_model_source
from qvl.processing import Processor, QwenTokenizer
from tests.hostile.test_checkpoints import LFS_POINTER
from tests.hostile.test_cli import SMALL, cli_run, one_error, write_config
from tests.processing.helpers import write_tokenizer

TINY = get_preset("tiny")


@pytest.fixture
def no_allocation(monkeypatch):
    """Fail the test if a model would be allocated."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was allocated")

    monkeypatch.setattr(qvl.checkpoint, "_allocate", refuse)


# --- devices -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["meta", "mps", "xla", torch.device("meta")])
def test_devices_torch_parses_but_qvl_cannot_run_on_are_refused(device, no_allocation):
    with pytest.raises(InputError, match=r"qvl runs on cpu or cuda devices, not \w+"):
        parse_device(device, "device")
    with pytest.raises(InputError, match="^device 'meta'|^device 'mps'|^device 'xla'"):
        qvl.from_config("tiny", device=device)


@pytest.mark.parametrize("device, words", [(None, "must be a device name"), (0, "must be a device name"),
                                           ("cuda:abc", "Invalid device string"), ("", "must not be empty")])
def test_devices_that_are_not_device_names(device, words, no_allocation):
    with pytest.raises(InputError, match=words):
        qvl.from_config("tiny", device=device)


def test_generate_device_flag(capsys):
    for device in ("meta", "mps"):
        status, out, err = cli_run(capsys, "generate", "--model", "tiny", "--prompt", "hi", "--device", device)
        one_error(status, err, 2, f"--device '{device}': qvl runs on cpu or cuda devices")
        assert out == ""


# --- from_config / from_pretrained arguments ------------------------------------------------------------------------


@pytest.mark.parametrize("seed", ["x", 1.5, None, True, 2**64, -(2**63) - 1])
def test_weight_seed_outside_manual_seeds_range(seed, no_allocation):
    with pytest.raises(InputError, match="^seed must be an integer"):
        qvl.from_config("tiny", seed=seed)


def test_weight_seed_at_the_ends_of_the_range():
    for seed in (-(2**63), 2**64 - 1):
        assert qvl.from_config("tiny", seed=seed).dtype == torch.float32


@pytest.mark.parametrize("directory", [None, 3, ["a"]])
def test_checkpoint_folder_that_is_not_a_path(directory):
    with pytest.raises(CheckpointError, match="the checkpoint folder must be a path, got"):
        qvl.from_pretrained(directory)


def test_checkpoint_folder_as_bytes(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        qvl.from_pretrained(str(tmp_path / "missing").encode())
    model = qvl.from_config("tiny")
    qvl.save_pretrained(model, tmp_path / "saved")
    assert qvl.from_pretrained(str(tmp_path / "saved").encode()).cfg == model.cfg


# --- backend specs ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("call, words", [
    (lambda: parse_spec("nope"), "backends: unknown backend 'nope'"),
    (lambda: parse_spec(3), "backends: expected a backend name"),
    (lambda: parse_spec({"nope": "eager"}), "backends: unknown operator 'nope'"),
    (lambda: parse_spec("norm,eager"), "'eager' is not operator=backend"),
    (lambda: parse_spec("attention=eager,attention=triton"),
     "backends: operator 'attention' is given twice in 'attention=eager,attention=triton'"),
    (lambda: parse_spec("eager, rope=eager ,rope=eager"), "operator 'rope' is given twice"),
    (lambda: resolve_plan(fallback="nope"), "fallback: unknown backend 'nope'"),
    (lambda: resolve_plan(fallback=3), "fallback: unknown backend 3"),
    (lambda: resolve_plan(fallback=["eager"]), r"fallback: unknown backend \['eager'\]"),
])
def test_backend_spec_mistakes_are_config_errors(call, words):
    with pytest.raises(ConfigError, match=words):
        call()


def test_a_bare_backend_then_overrides_is_no_contradiction():
    assert parse_spec("eager,attention=triton") == {op: "eager" for op in OPERATORS} | {"attention": "triton"}


def test_backend_spec_mistakes_through_the_model_the_cli_and_an_ablation_config(capsys):
    model = qvl.from_config("tiny")
    with pytest.raises(ConfigError, match="unknown backend 'nope'"):
        model.set_backends("nope")
    with pytest.raises(ConfigError, match="unknown backend 'nope'"):
        qvl.from_config("tiny", backends={"attention": "nope"})
    status, _, err = cli_run(capsys, "generate", "--model", "tiny", "--prompt", "hi", "--backends",
                             "attention=eager,attention=triton")
    one_error(status, err, 2, "operator 'attention' is given twice")
    text = SMALL.format(name="dup").replace('backends = "attention=eager"', 'backends = "norm=eager,norm=triton"')
    with pytest.raises(ConfigError, match=r"variants\[1\] \(second\) backends: operator 'norm' is given twice"):
        parse_config(text)


@settings(max_examples=50, deadline=None)
@given(st.text(alphabet="=,  abcdeginorstuxl-", max_size=40))
def test_fuzz_backend_specs_parse_or_are_config_errors(spec):
    try:
        mapping = parse_spec(spec)
    except ConfigError as e:
        assert "\n" not in str(e)
        return
    assert all(isinstance(op, str) and isinstance(name, str) for op, name in mapping.items())


@settings(max_examples=50, deadline=None)
@given(st.one_of(st.text(max_size=12), st.sampled_from(["cpu", "cpu:0", "cuda", "cuda:0", "meta", "hpu", "mps:0"])))
def test_fuzz_device_names_parse_to_cpu_or_are_input_errors(name):
    try:
        device = parse_device(name, "--device")
    except InputError as e:
        assert str(e).startswith("--device ") and "\n" not in str(e)
        return
    assert device.type == "cpu" or (device.type == "cuda" and torch.cuda.is_available())


# --- empty paths on the command line ---------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, words", [
    (["plan", "--checkpoint", "", "--memory", "80GB"], "no config.json at ''"),
    (["ablate", "", "--check"], "'': an empty path names no file"),
    (["report", ""], "'': an empty path names no file"),
    (["generate", "--model", "tiny", "--prompt", "hi", "--image", ""], "image file not found: ''"),
    (["generate", "--model", "tiny", "--prompt", "hi", "--video", ""], "video not found: ''"),
])
def test_an_empty_path_is_not_taken_for_no_path(capsys, argv, words):
    """`--checkpoint ''` was read as no checkpoint (then "unknown preset None"), `ablate ''` ran the default
    config, and the others named nothing."""
    status, out, err = cli_run(capsys, *argv)
    one_error(status, err, 2, words)
    assert out == ""


def test_tokenizer_json_that_is_a_folder(tmp_path):
    qvl.save_pretrained(qvl.from_config("tiny"), tmp_path)
    (tmp_path / "tokenizer.json").mkdir()
    with pytest.raises(CheckpointError, match="tokenizer.json: is a directory, not a file"):
        resolve_model_source(str(tmp_path))


# --- qvl demo ----------------------------------------------------------------------------------------------------


def test_demo_new_tokens_past_the_positions_is_one_usage_error(capsys, monkeypatch):
    """Was: the model built, then every backend mix failing the same way (about a minute), exit 1."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was built")

    monkeypatch.setattr(qvl.demo, "from_config", refuse)
    status, out, err = cli_run(capsys, "demo", "--new-tokens", "5000")
    one_error(status, err, 2, "max_new_tokens (5000) exceeds max_position_embeddings (4096)")
    assert out.startswith("qvl demo: preset tiny")


# --- ablation workloads ------------------------------------------------------------------------------------------


@pytest.fixture
def nothing_drawn(monkeypatch):
    """Fail the test if a workload's pixels or text would be drawn."""
    def refuse(*args, **kwargs):
        raise AssertionError("inputs were made")

    monkeypatch.setattr(torch, "rand", refuse)
    monkeypatch.setattr(torch, "randint", refuse)


@pytest.mark.parametrize("spec, words", [
    (WorkloadSpec(prompt_tokens=10, decode_tokens=5000), "the prompt (10 tokens: 10 text, 0 vision and 0 around them) "
                                                         "plus decode_tokens (5000)"),
    (WorkloadSpec(prompt_tokens=5000), "the prompt (5000 tokens"),
    (WorkloadSpec(videos=(VideoSpec(size=(28, 28), frames=10**8, fps=2.0),)), "200000000 vision"),
    (WorkloadSpec(images=(ImageSpec(size=(10**5, 10**5)),), max_pixels=10**10), "vision"),
], ids=["decode", "prompt", "video frames", "image size"])
def test_workload_past_the_positions_is_refused_before_anything_is_made(spec, words, nothing_drawn):
    """Was: every frame drawn first (a 3.7 TB allocation for 10**8 video frames), then a plain ValueError."""
    with pytest.raises(ConfigError, match="exceeds the model's max_position_embeddings") as caught:
        build_workload(spec, TINY)
    assert str(caught.value).startswith("[workload]: ") and words in str(caught.value)


def test_workload_that_would_not_fit_is_refused_with_the_estimate(nothing_drawn, monkeypatch):
    """Was: 10**8 rows built one by one in Python lists (a hang, then an out-of-memory kill)."""
    monkeypatch.setenv("QVL_MEMORY_LIMIT", str(2**30))
    with pytest.raises(ResourceError, match=r"the workload's inputs \(100000000 rows of 16 tokens, 0 images and videos "
                                            r"each\) need 71.5 GiB; cpu has 1 GiB free"):
        build_workload(WorkloadSpec(batch_size=10**8), TINY)
    frames = VideoSpec(size=(28 * 20, 28 * 20), frames=400, fps=2.0)
    with pytest.raises(ResourceError, match="the workload's inputs"):  # fits the positions of the 3b model
        build_workload(WorkloadSpec(videos=(frames,), max_pixels=28 * 28 * 400), get_preset("3b"))


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1])
def test_workload_seed_outside_manual_seeds_range(seed, nothing_drawn):
    with pytest.raises(ConfigError, match=r"\[workload\] seed: must be an integer in \[-2\*\*63, 2\*\*64\)"):
        build_workload(WorkloadSpec(seed=seed), TINY)


def test_workload_check_agrees_with_what_is_built():
    spec = WorkloadSpec(images=(ImageSpec(size=(100, 150)), ImageSpec(size=(28, 300))),
                        videos=(VideoSpec(size=(60, 90), frames=5, fps=2.0),), prompt_tokens=7, batch_size=2)
    for cfg in (TINY, get_preset("tiny_qwen2_vl")):
        items = check_workload(spec, cfg)
        work = build_workload(spec, cfg)
        assert work.prompt_length == spec.prompt_tokens + work.vision_tokens + 2 * len(items)


def test_an_ablation_whose_workload_cannot_run_is_refused_up_front(tmp_path, capsys):
    """Was: `--check` passed, then the run made its folder and recorded every variant as failed (exit 1)."""
    config = write_config(tmp_path, "long", SMALL.format(name="long").replace("decode_tokens = 2",
                                                                               "decode_tokens = 5000"))
    for extra in (["--check"], ["--results-dir", tmp_path / "results", "--quiet"]):
        status, out, err = cli_run(capsys, "ablate", config, *extra)
        one_error(status, err, 2, f"{config}: [workload]: the prompt (6 tokens", "plus decode_tokens (5000)")
        assert out == ""
    assert not (tmp_path / "results").exists()


def test_a_workload_only_a_variants_overrides_break_names_that_variant(tmp_path, capsys):
    text = SMALL.format(name="short").replace('name = "third"', 'name = "third"\n'
                                              'overrides = { "text.max_position_embeddings" = 7 }')
    with pytest.raises(ConfigError, match=r"^<config>: variant 'third' \(its overrides\): \[workload\]: the prompt "
                                          r"\(6 tokens.*max_position_embeddings \(7\)$"):
        parse_config(text)
    status, _, err = cli_run(capsys, "ablate", write_config(tmp_path, "short", text), "--check")
    one_error(status, err, 2, "variant 'third' (its overrides): [workload]")


def test_a_workload_that_would_not_fit_is_refused_at_parse_time(monkeypatch, nothing_drawn):
    monkeypatch.setenv("QVL_MEMORY_LIMIT", str(2**30))
    with pytest.raises(ResourceError, match=r"^<config>: \[workload\]: the workload's inputs \(100000000 rows"):
        parse_config(SMALL.format(name="big").replace("[run]", "batch_size = 100000000\n[run]"))


def test_a_workload_image_file_that_is_not_an_image_is_a_config_error(tmp_path):
    (tmp_path / "pic.png").write_bytes(b"not an image")
    text = SMALL.format(name="pic").replace("[workload]", '[workload]\nimages = [{ file = "pic.png" }]')
    with pytest.raises(ConfigError, match=r"pic.toml: \[workload\]: cannot identify image file .*pic.png"):
        load_config(write_config(tmp_path, "pic", text))


def test_with_preset_checks_the_workload_again():
    text = SMALL.format(name="x").replace("decode_tokens = 2", "decode_tokens = 5000")
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        parse_config(text)
    small = parse_config(text.replace("decode_tokens = 5000", "decode_tokens = 2"))
    assert with_preset(small, "3b").model.preset == "3b"  # 3b's positions hold it


# --- seeds in ablation configs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("section", ["model", "workload"])
@pytest.mark.parametrize("value, words", [
    ("1e20", "must be an integer, got 1e+20"), ("true", "must be an integer, got true"),
    (str(2**64), f"must be an integer in [-2**63, 2**64), got {2**64}"),
    (str(-(2**63) - 1), "must be an integer in [-2**63, 2**64)"),
])
def test_seeds_outside_manual_seeds_range_are_refused_by_their_key(section, value, words, no_allocation):
    """Was: `[model] seed = 1e20` or a huge integer passed `--check`, then failed every variant's build."""
    text = SMALL.format(name="s").replace("[run]", "[model]\n[run]").replace(f"[{section}]",
                                                                              f"[{section}]\nseed = {value}")
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    assert f"[{section}] seed: {words}" in str(caught.value)


def test_seeds_at_the_ends_of_the_range_parse():
    for seed in (-(2**63), 2**64 - 1):
        cfg = parse_config(SMALL.format(name="s").replace("[run]", f"seed = {seed}\n[model]\nseed = {seed}\n[run]"))
        assert cfg.model.seed == cfg.workload.seed == seed


# --- ablation and variant names --------------------------------------------------------------------------------------


def test_a_config_name_too_long_for_a_folder(tmp_path, capsys):
    """Was: passed `--check`, then "File name too long" creating the run folder."""
    with pytest.raises(ConfigError, match=r"^<config>: name: must be at most 255 bytes in UTF-8 .*got 300: 'x{20}"):
        parse_config(SMALL.format(name="x" * 300))
    status, _, err = cli_run(capsys, "ablate", write_config(tmp_path, "n", SMALL.format(name="x" * 256)), "--check")
    assert len(one_error(status, err, 2, "name: must be at most 255 bytes", "got 256")) < 300
    longest = parse_config(SMALL.format(name="x" * 255))  # the longest name makes its folder
    assert os.path.isdir(make_run_dir(str(tmp_path / "results"), longest.name))


@pytest.mark.parametrize("name", ["a\\nb", "\\u001b[31mred", "tab\\there", "line\\u2028break", "del\\u007f"])
def test_variant_names_with_control_characters(name, tmp_path, capsys):
    """Was: accepted, then printed into the terminal table as is (a newline splits the row)."""
    text = SMALL.format(name="c").replace('name = "third"', f'name = "{name}"')
    with pytest.raises(ConfigError, match=r"^<config>: variants\[2\] name: must not hold control characters") as e:
        parse_config(text)
    assert "\n" not in str(e.value) and "\x1b" not in str(e.value)
    status, _, err = cli_run(capsys, "ablate", write_config(tmp_path, "c", text), "--check")
    one_error(status, err, 2, "variants[2] name: must not hold control characters")


def test_variant_names_are_measured_in_utf8_bytes():
    ok = parse_config(SMALL.format(name="u").replace('name = "third"', f'name = "{"é" * 127}"'))
    assert ok.variants[2].name == "é" * 127  # 254 bytes
    with pytest.raises(ConfigError, match=r"variants\[2\] name: must be at most 255 bytes in UTF-8 .*got 256"):
        parse_config(SMALL.format(name="u").replace('name = "third"', f'name = "{"é" * 128}"'))


# --- a byte-order mark --------------------------------------------------------------------------------------------


def test_an_ablation_config_with_a_utf8_byte_order_mark(tmp_path, capsys):
    """Was: "not valid TOML: Invalid statement (at line 1, column 1)"."""
    path = tmp_path / "bom.toml"
    path.write_bytes(b"\xef\xbb\xbf" + SMALL.format(name="bom").encode())
    assert load_config(path) == load_config(write_config(tmp_path, "bom"))
    status, out, _ = cli_run(capsys, "ablate", path, "--check")
    assert status == 0 and out.startswith(f"{path}: ok: bom")


# --- a checkpoint's generation_config.json, tokenizer.json; the processor's config ---------------------------------


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    qvl.save_pretrained(qvl.from_config("tiny"), folder)
    write_tokenizer(folder, TINY)
    return folder


@pytest.fixture
def checkpoint(tiny_checkpoint, tmp_path):
    """A copy of the tiny checkpoint to spoil."""
    return Path(shutil.copytree(tiny_checkpoint, tmp_path / "ckpt"))


@pytest.mark.parametrize("eos, shown", [
    (["x"], '["x"]'), ([-5], "[-5]"), (1.5, "1.5"), (True, "true"), ([2, False], "[2, false]"), ("2", '"2"'),
    ([TINY.text.vocab_size], f"[{TINY.text.vocab_size}]"), ({"a": 1}, '{"a": 1}'),
])
def test_generation_config_eos_ids_that_are_not_ids(checkpoint, eos, shown):
    """Was: ["x"] "invalid literal for int()", [-5] refused after the model loaded, 1.5 ignored, true taken as 1."""
    path = checkpoint / "generation_config.json"
    path.write_text(json.dumps({"eos_token_id": eos}))
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(path))}: eos_token_id must be a token id or a list of "
                                              r"them \(integers >= 0 and below the model's vocab_size \(1024\)\), got "
                                              f"{re.escape(shown)}$"):
        Processor.from_pretrained(checkpoint, TINY)


def test_generation_config_eos_ids_without_a_model_config(checkpoint):
    (checkpoint / "generation_config.json").write_text('{"eos_token_id": [5, -1]}')
    with pytest.raises(CheckpointError, match=r"eos_token_id must be .*\(integers >= 0\), got \[5, -1\]"):
        Processor.from_pretrained(checkpoint)
    (checkpoint / "generation_config.json").write_text(f'{{"eos_token_id": {TINY.text.vocab_size}}}')
    Processor.from_pretrained(checkpoint)  # no vocabulary to hold it against


@pytest.mark.parametrize("eos, extra", [(None, ()), (7, (7,)), ([7, 8, 7], (7, 8)), ([], ())])
def test_generation_config_eos_ids_that_are_ids(checkpoint, eos, extra):
    if eos is not None:
        (checkpoint / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    stop = Processor.from_pretrained(checkpoint, TINY).stop_ids
    assert stop == (*TINY.eos_token_id, *extra)


def test_generate_refuses_the_eos_ids_before_loading_the_model(checkpoint, capsys, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(qvl.checkpoint, "from_pretrained", refuse)
    (checkpoint / "generation_config.json").write_text('{"eos_token_id": [-5]}')
    status, out, err = cli_run(capsys, "generate", "--model", checkpoint, "--prompt", "hi")
    one_error(status, err, 2, f"{checkpoint / 'generation_config.json'}: eos_token_id", "got [-5]")
    assert out == ""


@pytest.mark.parametrize("cfg", [None, 3, ["tiny"]])
def test_processor_for_a_config_that_is_not_one(cfg):
    """Was: AttributeError 'NoneType' object has no attribute 'vision'."""
    with pytest.raises(ConfigError, match="expected a preset name, a Qwen25VLConfig or an HF config dict, got"):
        Processor.for_config(cfg)
    if cfg is not None:  # None there: no model config to check the files against
        with pytest.raises(ConfigError, match="expected a preset name"):
            Processor.from_pretrained(".", cfg)
    assert Processor.for_config("tiny").stop_ids == Processor.for_config(TINY).stop_ids


@pytest.mark.parametrize("spoil, words", [
    (lambda p: p.write_bytes(LFS_POINTER), ["a Git LFS pointer file for 986400 bytes", "`git lfs pull`"]),
    (lambda p: os.mkfifo(p), ["is not a regular file (a FIFO, socket or device)"]),
    (lambda p: p.mkdir(), ["is a directory, not a file"]),
    (lambda p: p.write_bytes(b"\xff{}"), ["not UTF-8 (byte 0xff at offset 0)"]),
], ids=["lfs pointer", "fifo", "folder", "not utf-8"])
def test_tokenizer_json_that_is_not_a_tokenizer_file(checkpoint, spoil, words):
    """Was: the LFS pointer "expected value at line 1 column 1" (tokenizers' parser); a FIFO would block."""
    path = checkpoint / "tokenizer.json"
    path.unlink()
    spoil(path)
    for read in (lambda: QwenTokenizer.from_file(checkpoint), lambda: Processor.from_pretrained(checkpoint, TINY)):
        with pytest.raises(CheckpointError) as caught:
            read()
        assert str(caught.value).startswith(f"{path}: ") and all(w in str(caught.value) for w in words)


@pytest.fixture(scope="module")
def tiny_model():
    return qvl.from_config("tiny")


def test_inputs_embeds_that_are_not_finite_are_named(tiny_model):
    hidden = tiny_model.cfg.text.hidden_size
    for value in (float("nan"), float("inf")):
        embeds = torch.randn(2, 5, hidden)
        embeds[1, 3, 7] = value
        with pytest.raises(InputError, match=rf"inputs_embeds hold {value} \(not finite\) at batch row 1, position 3"):
            tiny_model(inputs_embeds=embeds)
    embeds = torch.randn(1, 5, hidden, requires_grad=True)  # the check reads no gradient: training still works
    tiny_model(inputs_embeds=embeds).logits.sum().backward()
    assert embeds.grad is not None and torch.isfinite(embeds.grad).all()


@pytest.mark.parametrize("what", ["input_ids", "inputs_embeds", "pixel_values"])
def test_inputs_on_the_meta_device_hold_no_values(tiny_model, what):
    from qvl.demo import demo_prompt

    inputs = demo_prompt(tiny_model.cfg)
    if what == "inputs_embeds":
        inputs = {"inputs_embeds": torch.zeros(1, 5, tiny_model.cfg.text.hidden_size, device="meta")}
    else:
        inputs[what] = inputs[what].to("meta")
    with pytest.raises(InputError, match=f"{what.replace('_values', '')}.*: on the meta device, which holds shapes "
                                         "but no values"):
        tiny_model(**inputs)
