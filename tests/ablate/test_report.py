"""Rendering stored results: the plot is optional, odd values render, runs compare, the progress bar behaves."""

import builtins
import io
import json
import os

import pytest

from qvl.ablate import compare_runs, format_table, load_results, parse_config, render_run, run_ablation
from qvl.ablate.measure import Progress, summarize
from qvl.ablate.runner import write_json
from qvl.cli import main


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """One small real run, reused by the rendering tests."""
    root = tmp_path_factory.mktemp("runs")
    config = parse_config("""
name = "small"
reference = "eager"
[workload]
prompt_tokens = 8
decode_tokens = 3
[run]
warmup = 0
repeats = 1
[[variants]]
name = "eager"
[[variants]]
name = "again"
backends = "norm=eager"
""", path=str(root / "small.toml"))
    results = run_ablation(config, results_root=str(root), quiet=True)
    return results, results["results_dir"]


def test_text_only_workload_has_no_vision_time(stored):
    results, _ = stored
    eager = results["variants"][0]
    assert eager["figures"]["vision_ms"] is None and eager["figures"]["prefill_ms"]["n"] == 1
    assert "-" in format_table(results).splitlines()[2]


def test_plot_skipped_without_matplotlib(stored, tmp_path, monkeypatch):
    results, _ = stored
    real_import = builtins.__import__

    def no_mpl(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_mpl)
    info = render_run(results, str(tmp_path))
    assert info["skipped"].startswith("matplotlib is not installed")
    assert not (tmp_path / "plot.png").exists()
    assert "No plot: matplotlib is not installed" in (tmp_path / "report.md").read_text()


def test_non_finite_values_are_stored_and_rendered(stored, tmp_path):
    results, _ = stored
    odd = json.loads(json.dumps(results))
    odd["variants"][1]["comparison"]["logits_rel_err"] = float("nan")
    odd["variants"][1]["comparison"]["logits_max_err"] = float("inf")
    write_json(str(tmp_path / "results.json"), odd)
    text = (tmp_path / "results.json").read_text()
    assert '"nan"' in text and '"inf"' in text and "NaN" not in text
    back, _ = load_results(str(tmp_path))
    assert "nan" in format_table(back) and "inf" in format_table(back)
    assert render_run(back, str(tmp_path)) == {"file": "plot.png"}


def test_compare_styles(stored):
    results, d = stored
    text = compare_runs([(results, d), (results, d)])
    assert text.count("small/") == 2 * len(results["variants"]) and "1.00x" in text
    md = compare_runs([(results, d), (results, d)], style="md")
    assert md.startswith("# Ablation runs compared") and "| eager |" in md


def test_report_errors(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no results.json here or in its subfolders" in capsys.readouterr().err
    (tmp_path / "results.json").write_text("{}")
    assert main(["report", str(tmp_path)]) == 2
    assert "not a qvl ablation results file" in capsys.readouterr().err


def test_report_no_write(stored, capsys):
    results, d = stored
    os.remove(os.path.join(d, "report.md"))
    assert main(["report", d, "--no-write"]) == 0
    assert "again" in capsys.readouterr().out and not os.path.exists(os.path.join(d, "report.md"))


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_only_on_a_terminal():
    tty = FakeTTY()
    bar = Progress(4, stream=tty)
    bar.update("eager: repeat 1/3", advance=1)
    bar.message("[1/2] eager: done")
    bar.update(advance=3)
    bar.close()
    out = tty.getvalue()
    assert "[######..................] 1/4" in out and "[1/2] eager: done\n" in out and "4/4" in out
    pipe = io.StringIO()
    bar = Progress(4, stream=pipe)
    bar.update("x", advance=2)
    bar.message("line")
    bar.close()
    assert pipe.getvalue() == "line\n"
    assert Progress(4, enabled=False, stream=FakeTTY()).enabled is False


def test_summarize():
    assert summarize([]) is None
    s = summarize([3.0, 1.0, 2.0])
    assert (s["median"], s["min"], s["max"], s["n"]) == (2.0, 1.0, 3.0, 3)
