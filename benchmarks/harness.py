"""Shared pieces of the benchmark suites: shapes, timing, device limits, calibration (launch counting is
qvl.launches).

Every figure is stored with what it needs to be read later: time, bytes or FLOPs, the device's copy
bandwidth and matmul rate measured in the same run, and a calibration time used to normalize timings on
noisy shared CPUs.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# On the CPU the triton backend runs interpreted: shapes shrink so the CI subset stays within minutes.
FULL = CUDA
# benchmarks/regress.py names a file here; the suites append each benchmark's outcome to it (conftest.py).
ROWS_ENV = "QVL_BENCH_ROWS"
# Shortest round of a timed benchmark: quick calls are repeated within a round up to this.
MIN_ROUND_S = 2e-3 if CUDA else 5e-3


@dataclass(frozen=True)
class AttnShape:
    name: str
    batch: int
    q_len: int
    kv_len: int
    q_heads: int
    kv_heads: int
    head_dim: int


def device_name() -> str:
    return torch.cuda.get_device_name() if CUDA else "cpu (triton interpreted)"


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def median_seconds(fn: Callable[[], object], reps: int = 7, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def calibration_seconds() -> float:
    """A fixed mixed workload (Python dispatch + small matmuls) timed now: the unit timings are divided by.

    It moves with the machine's speed and load the way the CPU subset's figures do, so the ratio is far
    steadier across runs than raw seconds. It takes well under 0.1 s, so it is timed beside every benchmark.
    """
    a = torch.randn(96, 96, device=DEVICE)

    def work():
        x = a
        for _ in range(200):
            x = torch.tanh(x @ a) * 0.5
        return x

    return min(median_seconds(work, reps=5) for _ in range(3))


def copy_bandwidth() -> float:
    """Bytes/s of a device copy (read + write), the memory-bound ceiling measured in this run."""
    n = (1 << 26) if CUDA else (1 << 22)
    src = torch.empty(n, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    return 2 * n / median_seconds(lambda: dst.copy_(src), reps=10)


def matmul_rate() -> float:
    """FLOP/s of a square bf16 (GPU) / fp32 (CPU) matmul, the compute ceiling measured in this run."""
    n = 8192 if CUDA else 512
    a = torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16 if CUDA else torch.float32)
    return 2 * n**3 / median_seconds(lambda: a @ a, reps=10)


def backend_specs(operator: str) -> list[str]:
    """The backend spec of each backend usable on this machine that implements `operator`: its name, which puts
    every operator on it (a partial backend such as triton-gemm is only asked for the operators it has).

    Every qvl row of the benchmarks comes from here, so a newly registered backend gets its rows without an edit."""
    from qvl.backends import all_backends

    return [b.name for b in all_backends() if not b.unavailable_reasons() and operator in b.impls]


def backend_ops(operator: str) -> dict[str, object]:
    """{spec: Ops} for `backend_specs(operator)`, as strict plans: a call the backend cannot run is an error."""
    from qvl.backends import Ops, resolve_plan

    return {spec: Ops(resolve_plan(spec)) for spec in backend_specs(operator)}


def on_triton(name: str) -> str:
    """The spec of an all-triton model with every operator partial backend `name` implements on it instead, e.g.
    "triton,mlp=triton-gemm,linear=triton-gemm"."""
    from qvl.backends import OPERATORS, get_backend

    return "triton," + ",".join(f"{op}={name}" for op in OPERATORS if op in get_backend(name).impls)


def model_specs(partial: bool = FULL) -> list[str]:
    """Whole-model backend specs for the end-to-end figures: each usable backend that implements every operator,
    and (`partial`) each partial one (triton-gemm: the projections) on top of triton (`on_triton`).

    On the CPU the partial ones are left out of the timed suite by default: the interpreted GEMM takes ~10 s a
    model call at the tiny preset and says nothing about speed; its launch counts are still tracked."""
    from qvl.backends import all_backends

    usable = [b for b in all_backends() if not b.unavailable_reasons()]
    specs = [b.name for b in usable if b.covers_all_operators]
    if partial and "triton" in specs:
        specs += [on_triton(b.name) for b in usable if not b.covers_all_operators]
    return specs


def forward_backward(fn: Callable, *inputs: torch.Tensor) -> Callable[[], None]:
    """One training step of an operator: fn on leaf copies of `inputs` (the float ones require grad), then the
    backward of its outputs (each scaled by a fixed random tensor, so no gradient is trivially structured).
    The gradients are dropped after each call, so every call allocates them as a training step does."""
    leaves = [t.detach().requires_grad_(t.is_floating_point()) for t in inputs]
    grad_outputs: list[torch.Tensor] = []

    def step() -> None:
        out = fn(*leaves)
        outs = [o for o in (out if isinstance(out, tuple) else (out,)) if o is not None and o.requires_grad]
        if not grad_outputs:
            grad_outputs.extend(torch.randn_like(o) for o in outs)
        torch.autograd.backward(outs, grad_outputs)
        for t in leaves:
            t.grad = None

    return step


def optional(module: str):
    """Import an optional peer package; None if it is missing or broken."""
    import importlib

    try:
        return importlib.import_module(module)
    except Exception:
        return None


def compiled(fn):
    """torch.compile of `fn` on the GPU (the peer users reach for); None on the CPU subset."""
    return torch.compile(fn) if CUDA else None
