"""The benchmark scripts outside the pytest-benchmark suites. The GPU session's figure scripts run at their smoke
sizes: a script that breaks should fail here, not after it has spent lent device time."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_script(name, out):
    subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", name), "--smoke", "--out", str(out)],
                   cwd=ROOT, check=True, capture_output=True, timeout=300)


@pytest.mark.parametrize("script, stem", [("kernel_figures.py", "kernel_figures"), ("decode_sweep.py", "decode_sweep")])
def test_smoke_run_writes_every_row(tmp_path, script, stem):
    run_script(script, tmp_path)
    with open(tmp_path / f"{stem}.json") as f:
        rows = json.load(f)["rows"]
    assert rows and not [r for r in rows if "error" in r]  # every row measured, none failed
    table = (tmp_path / f"{stem}.md").read_text()
    assert table.startswith("Device: ") and "| triton" in table


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
