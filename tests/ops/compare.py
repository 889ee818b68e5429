"""Shared comparison helpers for kernel tests: import as `from tests.ops.compare import ...`."""

import torch

# Relative-norm tolerance per dtype: ||out - ref|| / ||ref||, with ref computed by the eager backend
# from the same (rounded) inputs.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DTYPES = list(TOLERANCE)
# The same measure for gradients against eager autograd: a backward kernel accumulates in float32 where eager
# rounds every intermediate to the storage dtype, so half-precision gradients differ by more than outputs do.
GRAD_TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.float(), ref.float()
    denom = ref.norm().clamp_min(1e-30)
    return ((out - ref).norm() / denom).item()


def assert_close_rel(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, factor: float = 1.0,
                     tolerance: dict = TOLERANCE, what: str = "") -> None:
    """||out - ref|| / ||ref|| within tolerance[dtype] * factor; `what` names the compared tensor in the message."""
    where = f"{what}: " if what else ""
    assert out.shape == ref.shape, f"{where}shape {tuple(out.shape)} vs reference {tuple(ref.shape)}"
    assert out.dtype == ref.dtype, f"{where}dtype {out.dtype} vs reference {ref.dtype}"
    err = rel_err(out, ref)
    limit = tolerance[dtype] * factor
    assert err <= limit, f"{where}relative error {err:.3e} > {limit:.1e} ({dtype})"


def assert_grads_close(grads, ref_grads, names, dtype: torch.dtype, factor: float = 1.0) -> None:
    """Each gradient against eager autograd's (GRAD_TOLERANCE), named in the message."""
    for name, grad, ref in zip(names, grads, ref_grads, strict=True):
        assert (grad is None) == (ref is None), f"{name}: gradient {grad is not None} vs reference {ref is not None}"
        if ref is not None:
            assert_close_rel(grad, ref, dtype, factor, tolerance=GRAD_TOLERANCE, what=f"grad of {name}")
