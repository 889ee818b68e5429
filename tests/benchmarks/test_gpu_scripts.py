"""The GPU session's figure scripts, run at their smoke sizes: a script that breaks should fail here, not
after it has spent lent device time."""

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
