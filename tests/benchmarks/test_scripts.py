"""The benchmark scripts outside the pytest-benchmark suites. The GPU session's figure scripts run at their smoke
sizes: a script that breaks should fail here, not after it has spent lent device time."""

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_script(name, out):
    subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", name), "--smoke", "--out", str(out)],
                   cwd=ROOT, check=True, capture_output=True, timeout=300)


def smoke_rows(script, stem, out, impl):
    """Run `script` at its smoke size: every row measured (none failed), the table written with `impl`'s rows."""
    run_script(script, out)
    with open(out / f"{stem}.json") as f:
        rows = json.load(f)["rows"]
    assert rows and not [r for r in rows if "error" in r]
    table = (out / f"{stem}.md").read_text()
    assert table.startswith("Device: ") and f"| {impl} |" in table
    return rows


# kernel_figures' figures with a row per backend, and the operator those rows call
FIGURE_OPERATORS = {"norm": "norm", "norm+residual": "norm", "mlp": "mlp", "rope": "rope",
                    "attention causal": "attention", "attention varlen": "attention",
                    "attention decode": "attention", "cache (rope+write)": "cache"}


def test_kernel_figures_smoke_run_has_a_row_per_backend(tmp_path):
    """Every backend usable here that implements an operator has a row `qvl[<spec>]` in each of its figures, taken
    from the registry (a new backend needs no edit of the script), measured or skipped with the backend's reason;
    the MLP's include the partial triton-gemm backend."""
    from benchmarks.harness import backend_specs

    rows = smoke_rows("kernel_figures.py", "kernel_figures", tmp_path, "qvl[triton]")
    for figure, operator in FIGURE_OPERATORS.items():
        impls = {r["impl"] for r in rows if r["op"] == figure}
        expected = {f"qvl[{spec}]" for spec in backend_specs(operator)}
        assert expected <= impls, (figure, expected - impls)
    assert {r["impl"] for r in rows if r["op"] == "mlp"} >= {"qvl[eager]", "qvl[triton]", "qvl[triton-gemm]"}


def test_preprocess_smoke_run_times_every_route(tmp_path):
    rows = smoke_rows("preprocess.py", "preprocess", tmp_path, "pil (host)")
    assert {r["route"] for r in rows} >= {"pil (host)", "torch (host)"}
    assert all(r["ms"] > 0 and r["levels_from_torch_host"] <= 3 for r in rows)


def test_decode_sweep_smoke_run_writes_every_row(tmp_path):
    smoke_rows("decode_sweep.py", "decode_sweep", tmp_path, "triton")


def test_host_profile_smoke_run_profiles_every_call(tmp_path):
    """Each call timed and profiled: own time attributed to qvl's code (the eager backend's modules) and to the
    C functions it reaches, the top functions listed, the table written."""
    run_script("host_profile.py", tmp_path)
    rows = json.loads((tmp_path / "host_profile.json").read_text())["rows"]
    assert [(r["backend"], r["what"]) for r in rows] == [("eager", w) for w in ("vision tower", "prefill",
                                                                                "decode step")]
    for r in rows:
        assert r["wall_ms"] > 0 and r["by_origin_ms"]["qvl"] > 0 and r["by_origin_ms"]["builtins"] > 0
        assert any(t["origin"] == "qvl" for t in r["top"])
    assert "| eager | decode step |" in (tmp_path / "host_profile.md").read_text()


def test_host_overhead_measures_every_figure_without_fallbacks(tmp_path):
    """Compiled Triton launches on a stand-in device: each backend's every call runs on that backend (the
    script raises if one fell back) and every figure is a positive time."""
    out = tmp_path / "host.json"
    subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "host_overhead.py"), "--json", str(out)],
                   cwd=ROOT, check=True, capture_output=True, timeout=300)
    figures = json.loads(out.read_text())
    assert set(figures) == {"eager", "triton"}
    for backend in figures.values():
        assert set(backend) >= {"norm", "attention (decode)", "mlp", "decoder layer (decode)"}
        assert all(us > 0 for us in backend.values())


def test_model_peers_smoke_run_agrees_with_transformers(tmp_path):
    """The whole-model comparison at the tiny preset in float32: transformers reads qvl's saved checkpoint and
    both implementations produce the same logits (to parity precision) and the same greedy tokens."""
    pytest.importorskip("transformers")
    from benchmarks.model_peers import SMOKE_WORKLOAD
    run_script("model_peers.py", tmp_path)
    rows = {r["impl"]: r for r in json.loads((tmp_path / "model_peers.json").read_text())["rows"]}
    peer, eager = rows["transformers (SDPA)"], rows["qvl eager"]
    assert not [r for r in rows.values() if "error" in r]
    assert peer["logits_rel_err"] <= 1e-4 and eager["logits_rel_err"] == 0
    assert peer["tokens"] == eager["tokens"] and len(eager["tokens"]) == SMOKE_WORKLOAD.decode_tokens
    assert all(r["decode_tok_s"] > 0 for r in rows.values())
    assert all(r["vision_ms"] > 0 and r["ttft_ms"] > 0 for r in rows.values())
    # launches per decode step, the same every step: qvl eager's decode step (the count the CPU baseline holds for
    # this preset) and the generation loop's own work around it
    with open(os.path.join(ROOT, "benchmarks", "baselines", "cpu.json")) as f:
        step = json.load(f)["counts"]
    for r in rows.values():
        assert r["launches_per_step"] == int(r["launches_per_step"]) > 0, r
    assert eager["launches_per_step"] > step["launches/decode_step[eager]"]
    assert "| transformers (SDPA) |" in (tmp_path / "model_peers.md").read_text()


def test_train_peers_smoke_run_agrees_with_transformers(tmp_path):
    """A training step at the tiny preset in float32: transformers, reading qvl's saved checkpoint, gives the loss
    qvl eager gives, with and without checkpointing."""
    pytest.importorskip("transformers")
    run_script("train_peers.py", tmp_path)
    rows = {r["impl"]: r for r in json.loads((tmp_path / "train_peers.json").read_text())["rows"]}
    assert not [r for r in rows.values() if "error" in r]
    assert rows["transformers (SDPA)"]["loss_rel_err"] <= 1e-5
    assert rows["qvl eager, checkpointing"]["loss_rel_err"] == 0 and rows["qvl eager"]["loss_rel_err"] == 0
    assert all(r["step_ms"] > 0 and r["tokens_per_s"] > 0 for r in rows.values())
    assert "| transformers (SDPA) |" in (tmp_path / "train_peers.md").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the stage runs at full size: the lease runs it")
def test_gpu_session_script_runs_a_lease_and_packs_its_results(tmp_path):
    """benchmarks/gpu_session.sh, the one command a lent GPU runs, end to end on this machine: a one-stage lease
    (the whole-model peers at their smoke size) logs the stage, brings its table back and packs the rest."""
    pytest.importorskip("transformers")
    bin_dir = tmp_path / "bin"  # the script calls python3: make it this interpreter
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (bin_dir / "python3").chmod(0o755)
    out = tmp_path / "out"
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", OUT=str(out), PLAN="peers:200",
               BUDGET_S="260", WHEELS=str(tmp_path / "no-wheels"))
    subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_session.sh"), "lease"], cwd=ROOT, env=env,
                   check=True, capture_output=True, timeout=300)
    summary = (out / "summary.txt").read_text()
    assert "model_peers exit 0" in summary, summary
    assert "| transformers (SDPA) |" in (out / "model_peers.md").read_text()
    assert (out / "environment.txt").exists() and (out / "results.tar.gz").stat().st_size > 0
    assert not (out / "full").exists()  # packed into results.tar.gz


def test_decode_batches_smoke_run_writes_its_table(tmp_path):
    """Decode tok/s by batch for transformers (static cache) and qvl: every cell a positive rate."""
    pytest.importorskip("transformers")
    run_script("decode_batches.py", tmp_path)
    rows = json.loads((tmp_path / "decode_batches.json").read_text())["rows"]
    assert [r["batch"] for r in rows] == [1, 2]
    assert all(isinstance(r[k], float) and r[k] > 0 for r in rows for k in r if k != "batch"), rows
    assert "| batch | transformers (SDPA, static cache) | qvl eager |" in (tmp_path / "decode_batches.md").read_text()


def test_tp_collectives_smoke_run_finds_a_group_of_one_changes_nothing(tmp_path):
    """The model in a gloo group of one rank (every tensor-parallel collective run) next to the same model without
    a group: equal logits, equal greedy tokens, both decode rates measured."""
    run_script("tp_collectives.py", tmp_path)
    result = json.loads((tmp_path / "tp_collectives.json").read_text())
    assert result["meta"]["backend"] == "gloo"
    assert result["meta"]["logits_max_abs_difference"] == 0.0 and result["meta"]["tokens_equal"]
    assert [r["model"] for r in result["rows"]] == ["no group", "group of one"]
    assert all(r["decode_tok_s"] > 0 for r in result["rows"])
