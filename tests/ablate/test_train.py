"""Train mode of `qvl ablate` on the CPU: results.json, the table, report.md and the plot of a train run; the
gradients of a checkpointing variant against the reference's; the loss curve; the shared model given back
unchanged; the labels; the config's mode rules. Only `test_triton_variant_trains` runs Triton (interpreted,
one timed step and a two-step curve)."""

import glob
import json
import math
import os

import pytest
import torch

from qvl.ablate import ConfigError, compare_runs, load_results, parse_config, run_ablation
from qvl.ablate.runner import AblationRun
from qvl.ablate.train import compare_gradients
from qvl.ablate.workload import build_workload, training_labels
from qvl.backends import IGNORE_INDEX
from qvl.cli import main

TRAIN = """
name = "{name}"
reference = "eager"
[workload]
images = [{{ size = [56, 84] }}]
prompt_tokens = 6
batch_size = 2
[run]
mode = "train"
warmup = 1
repeats = 2
train_steps = 4
learning_rate = 1e-3
[[variants]]
name = "eager"
[[variants]]
name = "eager + checkpointing"
gradient_checkpointing = true
[[variants]]
name = "bfloat16"
dtype = "bfloat16"
[[variants]]
name = "patch 7"
overrides = {{ "vision.patch_size" = 7 }}
"""


def read(d):
    with open(os.path.join(d, "results.json")) as f:
        return json.load(f)


def by_name(results):
    return {v["name"]: v for v in results["variants"]}


@pytest.fixture(scope="module")
def train_run(tmp_path_factory):
    """One train run through the CLI, every model the runner hands out recorded with its weights, train/eval
    mode and checkpointing as first handed out."""
    root = tmp_path_factory.mktemp("train")
    config = root / "train_e2e.toml"
    config.write_text(TRAIN.format(name="train_e2e"))
    handed_out = []
    real_model = AblationRun._model

    def recording(self, v):
        model, info = real_model(self, v)
        if all(model is not m for m, *_ in handed_out):
            handed_out.append((model, {n: p.detach().clone() for n, p in model.named_parameters()}, model.training,
                               model.is_gradient_checkpointing))
        return model, info

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(AblationRun, "_model", recording)
        code = main(["ablate", str(config), "--results-dir", str(root / "results"), "--quiet"])
    (d,) = glob.glob(str(root / "results" / "train_e2e" / "*"))
    return code, d, handed_out


def test_results_of_a_train_run(train_run):
    code, d, _ = train_run
    assert code == 0
    results = read(d)
    assert results["status"] == "complete"
    assert results["run"]["mode"] == "train" and results["run"]["train_steps"] == 4
    assert results["run"]["learning_rate"] == 1e-3
    variants = by_name(results)
    assert all(v["status"] == "ok" for v in variants.values())
    for v in variants.values():
        f = v["figures"]
        assert f["step_ms"]["n"] == 2 and f["step_ms"]["min"] > 0 and f["tokens_per_s"]["n"] == 2
        assert f["tokens"] == results["workload"]["batch_size"] * v["workload"]["prompt_length"]
        assert 0 < f["counted_tokens"] < f["tokens"]
        assert f["peak_memory_mib"] is None  # not measured on a CPU
        assert len(f["loss_curve"]) == 4 and f["loss_curve"][0] == pytest.approx(f["loss"])
        assert "prefill_ms" not in f and "launches_per_decode_step" not in f  # the generate figures
    assert variants["eager"]["requested"]["gradient_checkpointing"] is False
    assert variants["eager + checkpointing"]["requested"]["gradient_checkpointing"] is True


def test_checkpointing_gives_the_reference_gradients(train_run):
    variants = by_name(read(train_run[1]))
    ref, ckpt = variants["eager"], variants["eager + checkpointing"]
    assert ref["comparison"]["grad_rel_err"] == 0.0 and ref["comparison"]["note"] == "the reference"
    assert ckpt["comparison"]["compared_to"] == "eager"
    assert ckpt["comparison"]["grad_rel_err"] <= 1e-5
    assert ckpt["comparison"]["loss_abs_err"] <= 1e-5
    assert ckpt["figures"]["loss_curve"] == pytest.approx(ref["figures"]["loss_curve"], rel=1e-5)


def test_dtype_variants_are_compared_and_other_architectures_are_not(train_run):
    variants = by_name(read(train_run[1]))
    bf16 = variants["bfloat16"]["comparison"]
    assert 0 < bf16["grad_rel_err"] < 0.5 and bf16["grad_rel_err_param"]  # bf16 rounding, named parameter
    patch = variants["patch 7"]["comparison"]
    assert patch["compared_to"] is None and "another prompt" in patch["note"]


def test_the_reference_loss_curve_falls(train_run):
    curve = by_name(read(train_run[1]))["eager"]["figures"]["loss_curve"]
    assert all(b < a for a, b in zip(curve, curve[1:], strict=False))
    assert curve[0] == pytest.approx(math.log(1024), rel=0.05)  # random weights: about uniform over the vocab


def test_shared_models_are_given_back_unchanged(train_run):
    _, _, handed_out = train_run
    assert len(handed_out) == 3  # float32 (shared by eager and eager + checkpointing), bfloat16, patch 7
    for model, weights, training, checkpointing in handed_out:
        for name, p in model.named_parameters():
            assert torch.equal(p, weights[name]), name
            assert p.grad is None, name
        assert model.training == training and model.is_gradient_checkpointing == checkpointing


def test_table_report_and_plot(train_run, capsys):
    _, d, _ = train_run
    report = open(os.path.join(d, "report.md")).read()
    assert "| step ms | tokens/s | peak MiB | loss | final loss | grad rel err | worst param |" in report
    assert "training on the prompt's own tokens, 4 AdamW steps" in report and "gradient checkpointing" in report
    assert "**grad rel err**" in report and "decode tok/s" not in report
    assert os.path.getsize(os.path.join(d, "plot.png")) > 0
    os.remove(os.path.join(d, "plot.png"))
    assert main(["report", d]) == 0  # renders the stored run again
    out = capsys.readouterr().out
    assert "step ms" in out and "final loss" in out and "eager + checkpointing" in out and "prefill ms" not in out
    assert os.path.getsize(os.path.join(d, "plot.png")) > 0
    results, _ = load_results(d)
    compared = compare_runs([(results, d), (results, d)])
    assert "step vs first" in compared and "1.00x" in compared


def test_triton_variant_trains(tmp_path):
    """Triton (interpreted) forward and backward in the runner; calls it cannot differentiate go to eager."""
    config = parse_config("""
reference = "eager"
[workload]
images = [{ size = [56, 56] }]
prompt_tokens = 4
[run]
mode = "train"
warmup = 0
repeats = 1
train_steps = 2
fallback = "eager"
[[variants]]
name = "eager"
[[variants]]
name = "triton"
backends = "triton"
""", path=str(tmp_path / "tri.toml"), default_name="tri")
    results = run_ablation(config, results_root=str(tmp_path), quiet=True)
    triton = by_name(results)["triton"]
    assert triton["status"] == "ok", triton["error"]
    assert triton["comparison"]["grad_rel_err"] < 1e-3  # float32 kernels against eager
    assert len(triton["figures"]["loss_curve"]) == 2


def test_training_labels_ignore_padding_and_vision_tokens():
    config = parse_config('reference = "e"\n[workload]\nimages = [{ size = [56, 84] }]\nprompt_tokens = 6\n'
                          '[[variants]]\nname = "e"\n')
    cfg = config.model_config()
    ids = build_workload(config.workload, cfg).inputs["input_ids"]
    mask = torch.ones_like(ids)
    mask[:, 0] = 0  # one left-padded position
    labels = training_labels(ids, cfg, mask)
    vision = (ids == cfg.image_token_id) | (ids == cfg.vision_start_token_id) | (ids == cfg.vision_end_token_id)
    ignored = vision | (mask == 0)
    assert int(vision.sum()) == 6 + 2 and bool((labels[ignored] == IGNORE_INDEX).all())
    assert torch.equal(labels[~ignored], ids[~ignored])
    assert torch.equal(training_labels(ids, cfg)[0, 0], ids[0, 0])  # no mask: nothing padded


def test_compare_gradients():
    ref = {"a": torch.ones(3), "b": torch.zeros(2)}
    assert compare_gradients({"a": torch.ones(3), "b": torch.zeros(2)}, ref) == {"grad_rel_err": 0.0,
                                                                                   "grad_rel_err_param": None}
    out = compare_gradients({"a": torch.tensor([1.0, 1.0, 1.3]), "b": torch.zeros(2)}, ref)
    assert out["grad_rel_err"] == pytest.approx(0.3 / math.sqrt(3)) and out["grad_rel_err_param"] == "a"
    assert compare_gradients({"a": torch.ones(3), "b": torch.ones(2)}, ref)["grad_rel_err"] == math.inf
    nan = compare_gradients({"a": torch.full((3,), float("nan")), "b": torch.ones(2)}, ref)
    assert math.isnan(nan["grad_rel_err"]) and nan["grad_rel_err_param"] == "a"
    assert "not compared" in compare_gradients({"a": torch.ones(4), "b": torch.zeros(2)}, ref)["note"]
    assert "not compared" in compare_gradients({"a": torch.ones(3)}, ref)["note"]


BASE = 'reference = "e"\n{run}\n[[variants]]\nname = "e"\n{variant}'


@pytest.mark.parametrize(("run", "variant", "expected"), [
    ("[run]\ntrain_steps = 3", "", "x.toml: [run] train_steps: only used when [run] mode = 'train'; this config's "
                                   "mode is 'generate' (leave it out, or at its default 8)"),
    ("[run]\nlearning_rate = 0.1", "", "[run] learning_rate: only used when [run] mode = 'train'"),
    ("", "gradient_checkpointing = true", "variants[0] (e) gradient_checkpointing: only used when [run] mode = "
                                          "'train'; this config's mode is 'generate'"),
    ("[run]\nmode = \"train\"", "cuda_graph = true", "variants[0] (e) cuda_graph: only used when [run] mode = "
                                                     "'generate'; this config's mode is 'train'"),
    ("[workload]\ndecode_tokens = 4\n[run]\nmode = \"train\"", "", "[workload] decode_tokens: only used when [run] "
                                                                   "mode = 'generate'"),
    ("[run]\nmode = \"fit\"", "", "x.toml: [run] mode: must be one of generate, train; got 'fit'"),
    ("[run]\nmode = \"train\"\ntrain_steps = 0", "", "[run] train_steps: must be an integer >= 1, got 0"),
    ("[run]\nmode = \"train\"\nlearning_rate = -1e-3", "", "[run] learning_rate: must be a positive number"),
    ("[run]\nmode = \"train\"", "gradient_checkpointing = 1", "gradient_checkpointing: must be true or false, got 1"),
])
def test_config_errors(run, variant, expected):
    with pytest.raises(ConfigError) as e:
        parse_config(BASE.format(run=run, variant=variant), path="x.toml", default_name="x")
    assert expected in str(e.value)


def test_config_defaults_and_mode_keys_at_their_defaults():
    generate = parse_config(BASE.format(run="[run]\ntrain_steps = 8", variant="gradient_checkpointing = false"))
    assert generate.run.mode == "generate"  # the other mode's keys at their defaults change nothing
    train = parse_config(BASE.format(run="[run]\nmode = \"train\"", variant="gradient_checkpointing = true"))
    assert (train.run.train_steps, train.run.learning_rate) == (8, 1e-4)
    assert train.variants[0].gradient_checkpointing is True and train.variants[0].cuda_graph is False


def test_shipped_train_config_checks(capsys):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.path.join(root, "ablations", "train.toml")
    assert main(["ablate", path, "--check"]) == 0
    out = capsys.readouterr().out
    assert "ok: train, preset tiny in float32, 5 variants" in out and 'mode = "train"' in out
    config = parse_config(open(path).read(), path=path, default_name="train")
    assert config.reference == "eager" and config.run.fallback == "eager"
    assert [(v.spec, v.gradient_checkpointing) for v in config.variants] == [
        ("eager", False), ("eager", True), ("triton", False), ("triton", True), ("triton,loss=eager", False)]
