"""`qvl ablate` under tensor parallelism on the CPU (2 gloo ranks as local workers): the same figures and
comparisons as one process, in generate and train mode (rank 0 gathering tp 1's whole gradients), rank 0 alone
writing; degrees refused before anything starts; SIGTERM keeps what was measured."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file, save_file

from qvl import from_config
from qvl.ablate import ConfigError, parse_config
from qvl.ablate.train import whole_gradients
from qvl.cli import main
from qvl.config import PRESETS
from qvl.parallel.launch import run_workers
from tests.ops.compare import rel_err
from tests.parallel import tp_cases

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CONFIG = """
name = "tp"
reference = "eager"
[model]
device = "cpu"
{model}
[workload]
images = [{{ size = [56, 84] }}]
prompt_tokens = 6
decode_tokens = 4
[run]
warmup = 1
repeats = 1
[[variants]]
name = "eager"
[[variants]]
name = "rope theta"           # another architecture, same weights: a float32 error well above noise
overrides = {{ "text.rope_theta" = 100.0 }}
[[variants]]
name = "bf16"
dtype = "bfloat16"
[[variants]]
name = "graph on a cpu"       # fails on every rank alike, midway: the run goes on
cuda_graph = true
"""


def write(tmp_path, model=""):
    path = tmp_path / "tp.toml"
    path.write_text(CONFIG.format(model=model))
    return path


def qvl(*args, **kwargs):
    env = {**os.environ, "PYTHONPATH": ROOT}
    env.pop("WORLD_SIZE", None)
    return subprocess.run([sys.executable, "-m", "qvl", *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=120, **kwargs)


def results(root):
    (path,) = glob.glob(os.path.join(root, "tp", "*", "results.json"))
    with open(path) as f:
        return json.load(f)


def by_name(r):
    return {v["name"]: v for v in r["variants"]}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The ablation at tp 1, in this process: what every tp 2 run is held against."""
    tmp = tmp_path_factory.mktemp("tp1")
    assert main(["ablate", str(write(tmp)), "--results-dir", str(tmp / "r"), "--quiet"]) == 1  # the graph variant fails
    return results(tmp / "r")


def check_like_one_process(r, one):
    assert r["run"]["tp"] == 2 and one["run"]["tp"] == 1 and r["status"] == "complete"
    tp, ref = by_name(r), by_name(one)
    assert [v["status"] for v in r["variants"]] == ["ok", "ok", "ok", "failed"]
    assert tp["graph on a cpu"]["error"] == ref["graph on a cpu"]["error"]
    for name in ("eager", "rope theta", "bf16"):
        figures, c, c1 = tp[name]["figures"], tp[name]["comparison"], ref[name]["comparison"]
        assert figures["prefill_ms"]["n"] == 1 and figures["decode_tok_s"]["median"] > 0
        assert figures["vision_ms"]["n"] == 1 and figures["launches_per_decode_step"] > 0
        assert c["compared_to"] == "eager" and c["token_agreement"] == c1["token_agreement"] == 1.0
        assert tp[name]["model"]["parameters"] == ref[name]["model"]["parameters"]
        assert tp[name]["model"]["rank_parameters"] < ref[name]["model"]["parameters"]
    assert tp["eager"]["comparison"]["deterministic"]
    # the same weights as tp 1's: the ablation's own effect, not a different model, in float32 ...
    err, err1 = tp["rope theta"]["comparison"]["logits_rel_err"], ref["rope theta"]["comparison"]["logits_rel_err"]
    assert err1 > 1e-3 and err == pytest.approx(err1, rel=1e-4)
    # ... and in bfloat16, whose rounding differs with the split sums
    err, err1 = tp["bf16"]["comparison"]["logits_rel_err"], ref["bf16"]["comparison"]["logits_rel_err"]
    assert 0 < err < 2e-2 and err == pytest.approx(err1, rel=0.2)


def test_tp_flag_gives_the_figures_and_comparisons_of_one_process(tmp_path, one_process):
    done = qvl("ablate", write(tmp_path), "--tp", 2, "--results-dir", tmp_path / "r")
    assert done.returncode == 1, done.stderr  # the graph variant failed, as at tp 1
    assert "on cpu, tp 2: 4 variants" in done.stderr
    assert done.stdout.count("eager (ref)") == 1 and "rope theta" in done.stdout  # the table, printed once
    r = results(tmp_path / "r")
    check_like_one_process(r, one_process)
    (run_dir,) = glob.glob(str(tmp_path / "r" / "tp" / "*"))
    assert sorted(os.listdir(run_dir)) == ["plot.png", "report.md", "results.json"]
    with open(os.path.join(run_dir, "report.md")) as f:
        assert "tensor-parallel over 2 ranks (peak memory, model MiB and launches/step are rank 0's)" in f.read()


def test_config_key_tp(tmp_path, one_process):
    done = qvl("ablate", write(tmp_path, "tp = 2"), "--results-dir", tmp_path / "r", "--quiet")
    assert done.returncode == 1, done.stderr
    check_like_one_process(results(tmp_path / "r"), one_process)


def test_degree_that_cannot_split_the_model_is_refused_before_anything_starts(tmp_path, capsys):
    config = write(tmp_path)
    for extra in ([], ["--check"]):
        assert main(["ablate", str(config), "--tp", "3", "--results-dir", str(tmp_path / "r"), *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("qvl: error: --tp: tp 3 cannot split num_attention_heads") and err.count("\n") == 1
        assert "degrees that split every dimension: 1, 2" in err
    assert not os.path.exists(tmp_path / "r")
    assert main(["ablate", str(write(tmp_path, "tp = 3")), "--check"]) == 2
    assert f"{config}: [model] tp: tp 3 cannot split" in capsys.readouterr().err
    # a variant's overrides are checked too
    odd = '[[variants]]\nname = "odd"\noverrides = { "text.intermediate_size" = 129 }\n'
    text = CONFIG.format(model="tp = 2") + odd
    with pytest.raises(ConfigError, match=r"^x.toml: \[model\] tp: variant 'odd' \(its overrides\): tp 2 cannot "
                                          r"split intermediate_size 129; degrees that split every dimension: 1$"):
        parse_config(text, path="x.toml")


TRAIN_CONFIG = """
name = "tp"
reference = "eager"
[model]
device = "cpu"
[workload]
images = [{ size = [56, 84] }]
prompt_tokens = 6
batch_size = 2
[run]
mode = "train"
warmup = 1
repeats = 1
train_steps = 2
learning_rate = 1e-3
[[variants]]
name = "eager"
[[variants]]
name = "checkpointing"        # recomputation repeats the layers' collectives: the same gradients
gradient_checkpointing = true
[[variants]]
name = "rope theta"           # another architecture, same weights: a gradient error well above noise
overrides = { "text.rope_theta" = 100.0 }
"""


def test_train_mode_at_tp_2_gives_the_figures_and_comparisons_of_one_process(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    config = tmp_path / "train.toml"
    config.write_text(TRAIN_CONFIG)
    for tp in (1, 2):  # --tp 2 starts two local workers from this process
        assert main(["ablate", str(config), "--tp", str(tp), "--results-dir", str(tmp_path / f"r{tp}"), "--quiet"]) == 0
    one, r = results(tmp_path / "r1"), results(tmp_path / "r2")
    assert r["run"]["tp"] == 2 and r["run"]["mode"] == "train" and r["status"] == "complete"
    tp, ref = by_name(r), by_name(one)
    for name in ("eager", "checkpointing", "rope theta"):
        figures, figures1 = tp[name]["figures"], ref[name]["figures"]
        assert tp[name]["status"] == "ok" and figures["step_ms"]["n"] == 1
        assert figures["tokens"] == figures1["tokens"] and figures["counted_tokens"] == figures1["counted_tokens"]
        assert figures["loss"] == pytest.approx(figures1["loss"], rel=1e-5)
        # AdamW on each rank's piece is tp 1's update split: the same curve
        assert figures["loss_curve"] == pytest.approx(figures1["loss_curve"], rel=1e-5)
        model, model1 = tp[name]["model"], ref[name]["model"]
        assert model["rank_parameters"] < model["parameters"] == model1["parameters"]
        c, c1 = tp[name]["comparison"], ref[name]["comparison"]
        # rank 0's whole gradients have tp 1's names and shapes, so every parameter is compared
        assert c["compared_to"] == "eager" and c["grad_rel_err_param"] == c1["grad_rel_err_param"]
    assert tp["checkpointing"]["comparison"]["grad_rel_err"] <= 1e-5
    err, err1 = tp["rope theta"]["comparison"]["grad_rel_err"], ref["rope theta"]["comparison"]["grad_rel_err"]
    assert err1 > 1e-3 and err == pytest.approx(err1, rel=1e-3)


# whole_gradients on each kind of split: KV heads split and the vision tower data-parallel (whole on every rank);
# one KV head replicated over both ranks (its rows' gradient summed) with the vision tower split, untied LM head
GRADIENT_CASES = {"kv2": (PRESETS["tiny"], "data"),
                  "kv1": (PRESETS["tiny"].with_overrides({"text.num_key_value_heads": 1,
                                                          "text.tie_word_embeddings": False}), "tensor")}


def _gradients(model) -> dict:
    model.train()
    model(**tp_cases.training_batch(model.cfg)).loss.backward()
    return {name: p.grad for name, p in model.named_parameters()}


def whole_gradients_worker(results: str) -> None:
    """One rank of `test_rank_0_gathers_tp_1s_whole_gradients`: rank 0 writes each case's whole gradients."""
    rank = int(os.environ["RANK"])
    for case, (cfg, vision) in GRADIENT_CASES.items():
        model = from_config(cfg, seed=0, tp=2, vision_parallel=vision)
        grads = whole_gradients(model, _gradients(model))
        assert (grads is None) == (rank != 0)
        if grads is not None:
            save_file({k: g.contiguous() for k, g in grads.items()}, os.path.join(results, f"{case}.safetensors"))


def test_rank_0_gathers_tp_1s_whole_gradients(tmp_path):
    run_workers(2, whole_gradients_worker, (str(tmp_path),))
    for case, (cfg, _) in GRADIENT_CASES.items():
        expected = _gradients(from_config(cfg, seed=0))
        whole = load_file(tmp_path / f"{case}.safetensors")
        assert sorted(whole) == sorted(expected)
        for name, grad in expected.items():
            assert whole[name].shape == grad.shape and rel_err(whole[name], grad) <= 1e-5, (case, name)


def test_under_torchrun_tp_must_be_the_world_size(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["ablate", str(write(tmp_path)), "--tp", "1", "--results-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err == ("qvl: error: tp 1 ([model] tp or --tp) but torchrun started WORLD_SIZE 2 processes: they must be "
                   "equal\n")
    assert not os.path.exists(tmp_path / "r")


def test_sigterm_keeps_what_rank_0_measured(tmp_path):
    config = tmp_path / "tp.toml"
    config.write_text(CONFIG.format(model="tp = 2").replace("repeats = 1", "repeats = 40"))
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.Popen([sys.executable, "-m", "qvl", "ablate", str(config), "--results-dir",
                             str(tmp_path / "r"), "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # until rank 0 has measured the reference and started the next variant
        paths = glob.glob(str(tmp_path / "r" / "tp" / "*" / "results.json"))
        try:
            with open(paths[0]) as f:
                state = [v["status"] for v in json.load(f)["variants"]]
        except (IndexError, OSError, ValueError):
            state = []
        if state[:2] == ["ok", "running"]:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted; what was measured is in" in err
    r = results(tmp_path / "r")
    assert r["status"] == "interrupted" and r["finished"]
    assert [v["status"] for v in r["variants"]] == ["ok", "interrupted", "pending", "pending"]
    assert by_name(r)["eager"]["figures"]["prefill_ms"]["n"] == 40
    (run_dir,) = glob.glob(str(tmp_path / "r" / "tp" / "*"))
    assert os.path.exists(os.path.join(run_dir, "report.md"))
