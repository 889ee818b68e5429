"""Shared comparison helpers for kernel tests: import as `from tests.ops.compare import ...`."""

import torch

# Relative-norm tolerance per dtype: ||out - ref|| / ||ref||, with ref computed by the eager backend
# from the same (rounded) inputs.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DTYPES = list(TOLERANCE)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.float(), ref.float()
    denom = ref.norm().clamp_min(1e-30)
    return ((out - ref).norm() / denom).item()


def assert_close_rel(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, factor: float = 1.0) -> None:
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} vs reference {tuple(ref.shape)}"
    assert out.dtype == ref.dtype, f"dtype {out.dtype} vs reference {ref.dtype}"
    err = rel_err(out, ref)
    assert err <= TOLERANCE[dtype] * factor, f"relative error {err:.3e} > {TOLERANCE[dtype] * factor:.1e} ({dtype})"
