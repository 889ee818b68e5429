"""Triton kernels behind the `triton` backend (and `triton-gemm`: gemm.py, the GEMM with a fused activation).

Importing this package decides how kernels run: compiled on a CUDA GPU, or through the Triton
interpreter on a machine without one (`qvl._env` sets TRITON_INTERPRET=1 when qvl is imported, before
triton is).
The interpreter runs the same kernel code with numpy on the CPU: slow, but exact enough to test against
the eager backend.

Conventions for every kernel here:
- the `@triton.jit` functions and the thin launcher that prepares strides and computes the grid live
  in one file per operator; module code never imports triton;
- inputs are validated once, by the operator interface (qvl.backends.interface) and the backend's support
  data (qvl.backends.triton: dtypes, head dims); a launcher checks only the arguments the interface never
  sees (tuning knobs, an activation kernel's input);
- every load is converted to float32 before arithmetic and every store converts back (fp32
  accumulation, and the interpreter has no native bfloat16);
- `tl.dot` takes float32 operands when interpreted (`DOT_F32`), the storage dtype on the GPU.
"""

from __future__ import annotations

import functools
import os

import torch

from .._env import HAS_CUDA, TRITON_IMPORTED_TOO_EARLY  # noqa: F401  (re-exported for the backend)

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
DOT_F32 = INTERPRETED
DEVICE_TYPE = "cpu" if INTERPRETED else "cuda"
# Loops to a runtime bound (a tensor in range()) fail in the interpreter under numpy >= 2.4 (triton#9171): kernels
# with such a loop take a while loop over the same iterations when WHILE_LOOP (a constexpr) is set. Compiled, they
# keep the for loop, which Triton software-pipelines.
WHILE_LOOP = INTERPRETED

# The largest head dim the attention kernels take: one (BLOCK_M, D) float32 accumulator per program, and K/V
# tiles of D columns in shared memory, sized for it (benchmarks/sm90_compile.py compiles D = 256). The triton
# backend declares it as a support limit, so calls past it are routed or refused before any launch.
MAX_HEAD_DIM = 256
# tl.dot needs at least 16 rows, columns and reduction depth: the smallest tile, and the interpreter's tiles
# (small, so tests with tens of tokens still cross block boundaries).
MIN_DOT_SIZE = 16


# Streaming multiprocessors of an H100 / H200: what kernels sized by the SM count assume without a CUDA device (the
# interpreter, the sm_90 compile check), so CPU runs exercise the same choices as the GPU.
H100_SMS = 132


@functools.cache
def num_sms(device: torch.device) -> int:
    """The SM count of a CUDA device; H100_SMS for any other."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return H100_SMS


# Host-side integer helpers for the launchers. Not triton.cdiv / triton.next_power_of_2: since Triton 3.5
# those are constexpr functions whose host calls cost ~1.5 us each, and a decode step makes ~13 per layer.
def next_power_of_2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def input_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision: float32 inputs get exact fp32 products ("ieee"; the GPU would otherwise round
    them to TF32, ~1e-3 off); 16-bit inputs ignore it."""
    return "ieee" if dtype == torch.float32 else "tf32"
