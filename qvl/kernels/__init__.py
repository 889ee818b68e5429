"""Triton kernels behind the `triton` backend (and `triton-gemm`: gemm.py, the GEMM with a fused activation).

Importing this package decides how kernels run: compiled on a CUDA GPU, or through the Triton
interpreter on a machine without one (`qvl._env` sets TRITON_INTERPRET=1 when qvl is imported, before
triton is).
The interpreter runs the same kernel code with numpy on the CPU: slow, but exact enough to test against
the eager backend.

Conventions for every kernel here:
- the `@triton.jit` functions and the thin launcher that validates strides and computes the grid live
  in one file per operator; module code never imports triton;
- every load is converted to float32 before arithmetic and every store converts back (fp32
  accumulation, and the interpreter has no native bfloat16);
- `tl.dot` takes float32 operands when interpreted (`DOT_F32`), the storage dtype on the GPU.
"""

from __future__ import annotations

import os

import torch

from .._env import HAS_CUDA, TRITON_IMPORTED_TOO_EARLY  # noqa: F401  (re-exported for the backend)

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
DOT_F32 = INTERPRETED
DEVICE_TYPE = "cpu" if INTERPRETED else "cuda"


# Host-side integer helpers for the launchers. Not triton.cdiv / triton.next_power_of_2: since Triton 3.5
# those are constexpr functions whose host calls cost ~1.5 us each, and a decode step makes ~13 per layer.
def next_power_of_2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def check_device_scalar(where: str, name: str, value: torch.Tensor, device: torch.device) -> None:
    """A length read from device memory (for CUDA-graph capture) must be one integer on `device`. Used by the
    kernels' launchers and by the operator interface (qvl.backends.interface), which checks the same inputs."""
    if value.dim() != 0 or not _is_integer(value) or value.device != device:
        raise ValueError(f"{where}: {name} must be a 0-dim integer tensor on {device}; got "
                         f"{tuple(value.shape)} {value.dtype} on {value.device}")


def check_pad(where: str, name: str, pad: torch.Tensor, batch: int) -> None:
    """Left padding per sequence: a (batch,) integer tensor. Its values are not read (that would synchronize
    with the device); kernels clamp them to [0, number of keys], which is what the mask means for any value."""
    if tuple(pad.shape) != (batch,) or not _is_integer(pad):
        raise ValueError(f"{where}: {name} must be a ({batch},) integer tensor, got {tuple(pad.shape)} {pad.dtype}")


def _is_integer(t: torch.Tensor) -> bool:
    return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)
