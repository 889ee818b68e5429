"""The ablation runner end to end on the CPU: results.json, report.md and the plot; failures and interruptions
keep every other variant's results; `qvl report` renders and compares stored runs."""

import glob
import json
import os
import signal
from dataclasses import replace

import pytest
import torch

from qvl.ablate import default_config, format_table, load_results, parse_config, run_ablation
from qvl.ablate import runner as runner_module
from qvl.backends import OPERATORS, Backend, BackendUnsupportedError, OpImpl, get_backend, registry
from qvl.cli import main

SMALL = """
name = "{name}"
reference = "eager"
[workload]
images = [{{ size = [56, 84] }}]
prompt_tokens = 6
decode_tokens = 4
batch_size = 2
[run]
warmup = 1
repeats = 2
"""


class RefusingNorm(OpImpl):
    operator = "norm"

    def not_supported_reasons(self, call):
        return ["refuses every call (test backend)"]

    def __call__(self, *args, **kwargs):  # pragma: no cover - never selected
        raise AssertionError("a refused call ran")


@pytest.fixture
def refusing(monkeypatch):
    """A registered backend whose norm supports nothing: strict plans fail on it, fallback plans route around."""
    monkeypatch.setitem(registry._BACKENDS, "refusing", Backend("refusing", {"norm": RefusingNorm()}))


@pytest.fixture
def gone(monkeypatch):
    """A registered backend that is unavailable on this machine: no fallback makes a variant on it runnable."""
    monkeypatch.setitem(registry._BACKENDS, "gone", Backend("gone", {}, availability=lambda: ["not here (test)"]))


def write_config(tmp_path, name, variants):
    path = tmp_path / f"{name}.toml"
    path.write_text(SMALL.format(name=name) + variants)
    return path


def run_dir(root, name):
    (d,) = glob.glob(os.path.join(root, name, "*"))
    return d


def read(d):
    with open(os.path.join(d, "results.json")) as f:
        return json.load(f)


def by_name(results):
    return {v["name"]: v for v in results["variants"]}


E2E_VARIANTS = """
[[variants]]
name = "eager again"          # listed first: the reference still runs first
backends = "attention=eager,norm=eager"
[[variants]]
name = "eager"
[[variants]]
name = "strict refusal"
backends = "norm=refusing"
[[variants]]
name = "refusal with fallback"
backends = "norm=refusing"
fallback = "eager"
[[variants]]
name = "bfloat16"
dtype = "bfloat16"
[[variants]]
name = "window 28"
overrides = { "vision.window_size" = 28 }
[[variants]]
name = "patch 7"
overrides = { "vision.patch_size" = 7 }
[[variants]]
name = "cuda graph"
cuda_graph = true
[[variants]]
name = "unavailable with fallback"
backends = "attention=gone"
fallback = "eager"
"""


def test_end_to_end(tmp_path, refusing, gone, capsys):
    config = write_config(tmp_path, "e2e", E2E_VARIANTS)
    root = str(tmp_path / "results")
    assert main(["ablate", str(config), "--results-dir", root, "--quiet"]) == 1  # one variant failed
    out = capsys.readouterr().out
    d = run_dir(root, "e2e")
    assert os.path.basename(d)[:8].isdigit()  # results/<config name>/<YYYYmmdd-HHMMSS>
    for name in ("eager again", "eager (ref)", "strict refusal", "bfloat16", "window 28"):
        assert name in out

    results = read(d)
    assert results["status"] == "complete" and results["reference"] == "eager"
    env = results["environment"]
    for key in ("python", "torch", "triton", "xformers", "qvl", "device_name", "timer", "peak_memory"):
        assert key in env
    cuda = torch.cuda.is_available()  # device "auto": the GPU path on a GPU, the CPU path in CI
    assert env["timer"] == ("CUDA events" if cuda else "time.perf_counter") and env["git"]["commit"]
    assert results["config"]["variants"][0]["name"] == "eager again" and "[[variants]]" in results["config_source"]
    assert results["workload"]["batch_size"] == 2 and results["workload"]["image_grids_thw"] == [[1, 4, 6]]
    v = by_name(results)

    ref = v["eager"]
    assert ref["status"] == "ok" and ref["plan"]["choices"] == {op: "eager" for op in OPERATORS}
    f = ref["figures"]
    for key in ("vision_ms", "prefill_ms", "decode_tok_s", "decode_ms_per_step"):
        assert f[key]["n"] == 2 and f[key]["min"] <= f[key]["median"] <= f[key]["max"] and f[key]["median"] > 0
    assert (f["peak_memory_mib"] > 0 if cuda else f["peak_memory_mib"] is None) and f["model_mib"] > 0
    if cuda:  # the variant's own need: its weights and more, never the other resident models
        assert f["model_mib"] <= f["peak_memory_mib"] <= f["device_peak_mib"]
    assert ref["comparison"]["logits_rel_err"] == 0 and ref["comparison"]["deterministic"]
    # a deterministic count: the same model and backends launch the same work per decode step
    assert f["launches_per_decode_step"] == v["eager again"]["figures"]["launches_per_decode_step"] > 0
    assert "launches/step" in out

    assert v["eager again"]["model"]["weights"] == "seed 0 (the model of an earlier variant)"
    assert v["eager again"]["model"]["build_s"] == 0.0 and ref["model"]["build_s"] > 0  # built once, reused
    same = v["eager again"]["comparison"]
    assert same == {"compared_to": "eager", "logits_rel_err": 0.0, "logits_max_err": 0.0, "token_agreement": 1.0,
                    "first_divergence": None, "note": same["note"]}

    strict = v["strict refusal"]
    assert strict["status"] == "failed" and strict["figures"] is None
    assert strict["error"].startswith("BackendUnsupportedError: norm: backend 'refusing' cannot run this call")
    assert "refuses every call" in strict["error"] and strict["traceback"]

    gone_variant = v["unavailable with fallback"]  # failed before its model was built
    assert gone_variant["status"] == "failed" and gone_variant["model"] is None
    assert gone_variant["error"] == ("BackendUnsupportedError: attention: backend 'gone' is unavailable on this "
                                     "machine: not here (test)")

    fb = v["refusal with fallback"]
    assert fb["status"] == "ok" and fb["comparison"]["logits_rel_err"] == 0.0
    assert fb["fallbacks"] and {x["operator"] for x in fb["fallbacks"]} == {"norm"}
    assert fb["fallbacks"][0]["used"] == "eager"
    assert fb["fallbacks"][0]["reasons"] == ["refuses every call (test backend)"]

    bf16 = v["bfloat16"]
    assert bf16["requested"]["dtype"] == "bfloat16" and bf16["model"]["dtype"] == "bfloat16"
    assert bf16["model"]["weights"].startswith("copied from the base model (float32)")
    assert 0 < bf16["comparison"]["logits_rel_err"] < 0.1  # rounding only: the same weights, compared in float32

    window = v["window 28"]
    assert window["model"]["architecture_overrides"] == {"vision.window_size": 28}
    assert 0 < window["comparison"]["logits_rel_err"] < 0.1  # the architecture's effect, same weights

    graph = v["cuda graph"]
    assert graph["requested"]["cuda_graph"] is True
    if cuda:  # the eager step replayed from a graph: the reference's own tokens and logits
        assert graph["status"] == "ok" and graph["comparison"]["token_agreement"] == 1.0
        assert graph["comparison"]["logits_rel_err"] < 1e-5
    else:
        assert graph["status"] == "failed" and "CUDA graphs need the model on a CUDA device" in graph["error"]

    patch = v["patch 7"]
    assert patch["status"] == "ok" and patch["comparison"]["compared_to"] is None
    assert "not compared" in patch["comparison"]["note"]
    assert "visual.patch_embed.proj.weight" in patch["model"]["weights"]  # other shape: drawn fresh

    report = open(os.path.join(d, "report.md")).read()
    for name in v:
        assert f"| {name}" in report
    assert "## What the figures mean" in report and "![speed and error per variant](plot.png)" in report
    assert "strict refusal" in report.split("## Not measured")[1]
    with open(os.path.join(d, "plot.png"), "rb") as png:
        assert png.read(8) == b"\x89PNG\r\n\x1a\n"
    assert results["plot"] == {"file": "plot.png"}

    # qvl report: one run rendered again, then two runs side by side
    os.remove(os.path.join(d, "report.md"))
    assert main(["report", d]) == 0
    assert "strict refusal" in capsys.readouterr().out and os.path.isfile(os.path.join(d, "report.md"))
    second = tmp_path / "second"
    second_results = dict(results, name="e2e-copy")
    os.makedirs(second / "20990101-000000")
    with open(second / "20990101-000000" / "results.json", "w") as fh:
        json.dump(second_results, fh)
    assert main(["report", d, str(second), "--out", str(tmp_path / "cmp")]) == 0  # a folder of runs: the latest
    out = capsys.readouterr().out
    assert "e2e/" in out and "e2e-copy/20990101-000000" in out and "1.00x" in out
    assert "| eager |" in (tmp_path / "cmp" / "compare.md").read_text()


def test_failing_variant_and_results_written_as_each_finishes(tmp_path, monkeypatch):
    """An out-of-memory error fails that variant only; results.json holds each finished variant at once."""
    config = parse_config(SMALL.format(name="oom") + """
[[variants]]
name = "eager"
[[variants]]
name = "oom"
backends = "attention=eager"
[[variants]]
name = "last"
backends = "mlp=eager"
""", path=str(tmp_path / "oom.toml"))
    real = runner_module.measure_timings
    root = str(tmp_path / "results")
    seen = []

    def measure(model, work, *args, **kwargs):
        seen.append(model.plan)
        if len(seen) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        if len(seen) == 3:  # before the last variant: the first two are already on disk, final
            on_disk = by_name(read(run_dir(root, "oom")))
            assert on_disk["eager"]["status"] == "ok" and on_disk["eager"]["figures"]["prefill_ms"]
            assert on_disk["oom"]["status"] == "failed" and on_disk["last"]["status"] == "running"
        return real(model, work, *args, **kwargs)

    monkeypatch.setattr(runner_module, "measure_timings", measure)
    results = run_ablation(config, results_root=root, quiet=True)
    v = by_name(results)
    assert v["oom"]["status"] == "failed" and v["oom"]["error"].startswith("OutOfMemoryError: CUDA out of memory")
    assert v["eager"]["status"] == "ok" and v["last"]["status"] == "ok"
    assert v["last"]["comparison"]["token_agreement"] == 1.0
    assert "oom" in format_table(results) and "OutOfMemoryError" in format_table(results)


def keyboard_interrupt():
    raise KeyboardInterrupt


def interrupt_second_measurement(monkeypatch, stop):
    """Call `stop()` when the second variant starts measuring."""
    real, calls = runner_module.measure_timings, []

    def measure(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            stop()
        return real(*args, **kwargs)

    monkeypatch.setattr(runner_module, "measure_timings", measure)


def test_interrupted_run_keeps_what_it_measured(tmp_path, monkeypatch, capsys):
    config = write_config(tmp_path, "stop", """
[[variants]]
name = "eager"
[[variants]]
name = "second"
backends = "attention=eager"
[[variants]]
name = "third"
backends = "norm=eager"
""")
    interrupt_second_measurement(monkeypatch, stop=keyboard_interrupt)
    root = str(tmp_path / "results")
    assert main(["ablate", str(config), "--results-dir", root, "--quiet"]) == 130
    assert "interrupted; what was measured is in" in capsys.readouterr().err
    d = run_dir(root, "stop")
    results = read(d)
    v = by_name(results)
    assert results["status"] == "interrupted" and results["finished"]
    assert v["eager"]["status"] == "ok" and v["eager"]["figures"]["decode_tok_s"]["median"] > 0
    assert v["second"]["status"] == "interrupted" and v["third"]["status"] == "pending"
    assert os.path.isfile(os.path.join(d, "report.md")) and os.path.isfile(os.path.join(d, "plot.png"))
    assert load_results(os.path.join(root, "stop"))[0]["status"] == "interrupted"


def test_reference_failure_leaves_others_measured_but_uncompared(tmp_path, refusing):
    config = parse_config(SMALL.format(name="noref") + """
[[variants]]
name = "eager"
backends = "norm=refusing"
[[variants]]
name = "other"
""", path=str(tmp_path / "noref.toml"))
    results = run_ablation(config, results_root=str(tmp_path / "results"), quiet=True, repeats=1, warmup=0)
    v = by_name(results)
    assert v["eager"]["status"] == "failed"
    assert v["other"]["status"] == "ok" and v["other"]["figures"]["prefill_ms"]["n"] == 1
    assert "reference variant 'eager' failed" in v["other"]["comparison"]["note"]


def test_variant_peak_memory_leaves_out_other_resident_models(monkeypatch):
    """On a GPU the runner keeps other variants' models resident (the base model, another dtype's copy); a
    variant's peak is its own weights plus what its runs allocate, not the device-wide peak. The CUDA memory
    counters are faked here so the arithmetic runs on any machine."""
    from qvl.ablate.measure import PeakMemory

    gib = 2**30
    state = {"allocated": 30 * gib, "peak": 45 * gib}  # 7 GiB of this variant's weights + 23 of others resident
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats",
                        lambda device=None: state.update(peak=state["allocated"]))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: state["allocated"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: state["peak"])
    memory = PeakMemory(torch.device("cuda"))
    memory.reset()
    state["peak"] = 31.5 * gib  # the variant's runs: 1.5 GiB of activations and KV cache at the most
    device_peak = memory.read_mib()
    assert device_peak == 31.5 * 1024  # the device's peak: everything resident
    assert memory.variant_peak_mib(7 * 1024, device_peak) == 8.5 * 1024
    cpu = PeakMemory(torch.device("cpu"))
    assert cpu.variant_peak_mib(7 * 1024, cpu.read_mib()) is None


def test_default_config_fits_the_machine():
    cpu = default_config("cpu")
    assert cpu.model.preset == "tiny" and cpu.model.device == "cpu" and cpu.reference == "eager"
    names = [v.name for v in cpu.variants]
    assert names[:2] == ["eager", "triton"]
    xformers_ok = not get_backend("xformers").unavailable_reasons()
    assert ("xformers" in names) == xformers_ok
    gpu = default_config("cuda")
    assert gpu.model.preset == "3b" and gpu.model.dtype == "bfloat16" and gpu.model.device == "cuda"
    ref, *bf16 = gpu.variants
    assert gpu.reference == ref.name and ref.dtype == "float32" and set(ref.backends.values()) == {"eager"}
    assert bf16[0].name == "eager" and bf16[0].dtype is None
    graphs = {v.name: set(v.backends.values()) for v in bf16 if v.cuda_graph}
    assert graphs == {"eager, CUDA graph": {"eager"}, "triton, CUDA graph": {"triton"}}


def test_triton_variant(tmp_path):
    """Eager against the Triton kernels (interpreted here), when the backend is available."""
    reasons = get_backend("triton").unavailable_reasons()
    if reasons:
        pytest.skip("triton backend unavailable: " + "; ".join(reasons))
    config = parse_config("""
name = "triton"
reference = "eager"
[workload]
images = [{ size = [56, 56] }]
prompt_tokens = 4
decode_tokens = 3
[run]
warmup = 0
repeats = 1
[[variants]]
name = "eager"
[[variants]]
name = "triton"
backends = "triton"
""", path=str(tmp_path / "triton.toml"))
    v = by_name(run_ablation(config, results_root=str(tmp_path / "results"), quiet=True))
    assert v["eager"]["status"] == "ok"
    if v["triton"]["status"] != "ok":  # the runner recorded it and went on; the kernels' own tests say why
        assert v["triton"]["error"]
        pytest.skip(f"triton backend fails on this machine: {v['triton']['error'][:200]}")
    c = v["triton"]["comparison"]
    assert c["logits_rel_err"] < 1e-3 and c["token_agreement"] == 1.0
    # fused kernels: a triton decode step launches a fraction of eager's work
    steps = {name: v[name]["figures"]["launches_per_decode_step"] for name in ("eager", "triton")}
    assert 0 < steps["triton"] < steps["eager"] / 2, steps


def test_sigterm_ends_the_run_like_an_interrupt(tmp_path, monkeypatch):
    """`timeout` or a job scheduler stops a run with SIGTERM: what was measured is still written."""
    config = write_config(tmp_path, "term", """
[[variants]]
name = "eager"
[[variants]]
name = "second"
backends = "attention=eager"
""")
    interrupt_second_measurement(monkeypatch, stop=lambda: os.kill(os.getpid(), signal.SIGTERM))
    before = signal.getsignal(signal.SIGTERM)
    root = str(tmp_path / "results")
    assert main(["ablate", str(config), "--results-dir", root, "--quiet"]) == 130
    assert signal.getsignal(signal.SIGTERM) is before  # the handler lives only as long as the run
    results = read(run_dir(root, "term"))
    assert results["status"] == "interrupted"
    assert [v["status"] for v in results["variants"]] == ["ok", "interrupted"]


def test_check_backends_is_the_registry_strict_plan(gone):
    """A variant fails at once on a backend unknown or unavailable here, with the registry's own message."""
    config = parse_config(SMALL.format(name="check") + """
[[variants]]
name = "eager"
[[variants]]
name = "gone"
backends = "triton,attention=gone"
fallback = "eager"
""")
    runner_module.check_backends(config.variant("eager"))
    with pytest.raises(BackendUnsupportedError, match=r"^attention: backend 'gone' is unavailable on this machine: "
                                                      r"not here \(test\)$"):
        runner_module.check_backends(config.variant("gone"))
    unknown = replace(config.variant("eager"), backends={**config.variant("eager").backends, "norm": "nope"})
    with pytest.raises(ValueError, match="unknown backend 'nope'; valid options are: eager"):
        runner_module.check_backends(unknown)
