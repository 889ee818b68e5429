"""Every Triton kernel compiles for the H100 (sm_90) without spills, within shared memory, and on wgmma where
it multiplies 16-bit tiles: checked here, without a GPU, by benchmarks/sm90_compile.py (--quick: one GEMM
tile per family; the full run compiles every autotuning candidate)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytest.importorskip("triton")


def test_every_kernel_compiles_for_sm90(tmp_path):
    report = tmp_path / "sm90.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "sm90_compile.py"), "--quick",
                           "--json", str(report)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "0 failed checks" in proc.stdout
    assert report.stat().st_size > 0
