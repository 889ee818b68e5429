"""pytest-benchmark wiring: session-wide device limits and calibration, a helper that runs and annotates.

With QVL_BENCH_ROWS set (benchmarks/regress.py sets it), every benchmark's outcome is appended to that file
as one JSON line the moment it is known: its figures when measured, the reason when it failed or was
skipped. A run that fails halfway or is stopped by a time box keeps every row it finished.
"""

from __future__ import annotations

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

from benchmarks import harness  # noqa: E402
from qvl.backends import BackendUnsupportedError  # noqa: E402

# Calls slower than this (seconds; only interpreted whole-model rows on the CPU) skip the pre-measurement and
# the warm-up round: they vary little relative to their length, and each call costs the CI seconds.
SLOW_CALL_S = 1.0


def record(row: dict) -> None:
    path = os.environ.get(harness.ROWS_ENV)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


def pytest_runtest_logreport(report):
    """Failures (in any phase) and skips, with their one-line reason; measured rows are recorded by `measure`."""
    if report.failed:
        crash = getattr(report.longrepr, "reprcrash", None)
        reason = crash.message if crash is not None else str(report.longrepr).strip().splitlines()[-1]
        record({"name": report.nodeid, "outcome": "failed", "reason": f"{report.when}: {reason}"})
    elif report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        record({"name": report.nodeid, "outcome": "skipped", "reason": reason.removeprefix("Skipped: ")})


@pytest.fixture(scope="session")
def limits():
    return {"copy_bytes_per_s": harness.copy_bandwidth(), "matmul_flops_per_s": harness.matmul_rate()}


@pytest.fixture
def measure(request, benchmark, limits):
    """measure(fn, bytes=None, flops=None): time fn with pytest-benchmark and store the derived figures.

    A call the backend declares unsupported (xformers given M-RoPE sections, say) skips the row with the
    backend's reason: the suite measures what each backend can run, as strict plans define it."""

    def run(fn, *, nbytes: float | None = None, flops: float | None = None):
        def timed():
            out = fn()
            harness.sync()
            return out

        # Microsecond-scale calls are repeated within a round (each round >= MIN_ROUND_S), so a round's
        # time is not dominated by timer and scheduler jitter; the stats are per call either way.
        try:
            if benchmark.disabled:  # --benchmark-disable: each row runs once, untimed, and nothing is recorded
                benchmark.pedantic(timed)
                return
            first = harness.median_seconds(timed, reps=1)  # after one warm-up call (compiles, autotunes)
        except BackendUnsupportedError as e:
            pytest.skip(f"unsupported: {e}")
        if first > SLOW_CALL_S:  # the interpreted vision tower and prefill on the CPU: already warm, 3 rounds
            iterations, rounds, warmup = 1, 3, 0
        else:
            once = harness.median_seconds(timed, reps=3, warmup=0)
            iterations = max(1, int(harness.MIN_ROUND_S / max(once, 1e-9)))
            # Slow calls (interpreted Triton on the CPU) vary little relative to their length: fewer rounds.
            rounds, warmup = (20 if harness.CUDA else (7 if once < 0.2 else 3)), 1
        # The calibration is timed right before and after each benchmark: the machine's speed drifts
        # during a run, and a calibration from its start would not share that drift.
        before = harness.calibration_seconds()
        benchmark.pedantic(timed, rounds=rounds, warmup_rounds=warmup, iterations=iterations)
        calibration = (before + harness.calibration_seconds()) / 2
        median = benchmark.stats.stats.median
        info = benchmark.extra_info
        info["device"] = harness.device_name()
        info["calibration_s"] = calibration
        info["normalized"] = median / calibration
        info["per_s"] = 1.0 / median
        if nbytes:
            info["TB/s"] = nbytes / median / 1e12
            info["of_copy_bandwidth"] = nbytes / median / limits["copy_bytes_per_s"]
        if flops:
            info["TFLOP/s"] = flops / median / 1e12
            info["of_matmul_rate"] = flops / median / limits["matmul_flops_per_s"]
        record({"name": request.node.nodeid, "outcome": "passed", "figures": dict(info) | {"median_s": median}})

    return run
