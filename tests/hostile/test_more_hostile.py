"""More hostile use, found by attacking the CLI and the API past the other tests/hostile files: devices torch
parses but qvl cannot run on, seeds and paths of the wrong type, backend specs that contradict themselves, empty
paths on the command line, `qvl demo` and ablation workloads whose prompt cannot fit the model's positions or
memory (refused before anything is built), a tokenizer.json that is a folder.
"""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qvl
import qvl.demo
from qvl.ablate import parse_config
from qvl.ablate.config import ImageSpec, VideoSpec, WorkloadSpec
from qvl.ablate.workload import build_workload, check_workload
from qvl.backends import parse_spec, resolve_plan
from qvl.config import get_preset
from qvl.devices import parse_device
from qvl.errors import CheckpointError, ConfigError, InputError, ResourceError
from qvl.generate_cli import resolve_model_source
from tests.hostile.test_cli import SMALL, cli_run, one_error

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
    assert parse_spec("eager,attention=triton") == {"attention": "triton", "rope": "eager", "norm": "eager",
                                                    "mlp": "eager", "cache": "eager", "loss": "eager"}


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


def test_an_ablation_run_records_the_refusal_and_runs_nothing_else(tmp_path, capsys):
    config = tmp_path / "long.toml"
    config.write_text(SMALL.format(name="long").replace("decode_tokens = 2", "decode_tokens = 5000"))
    status, _, err = cli_run(capsys, "ablate", config, "--results-dir", tmp_path / "results", "--quiet")
    assert status == 1 and "Traceback" not in err
    (results,) = (tmp_path / "results" / "long").glob("*/results.json")
    variants = json.loads(results.read_text())["variants"]
    assert [v["status"] for v in variants] == ["failed"] * 3
    assert all("ConfigError: [workload]: the prompt (6 tokens" in v["error"] for v in variants)
