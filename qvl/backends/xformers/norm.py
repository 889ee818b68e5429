"""norm -> xformers.ops.rmsnorm.rms_norm, and rms_norm_add for the fused residual add (Triton kernels)."""

from __future__ import annotations

import torch

from ..registry import BackendUnsupportedError
from . import installed
from .base import TritonKernelOp


class XformersNorm(TritonKernelOp):
    operator = "norm"

    def __call__(self, x, weight, eps, residual=None):
        dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
        if torch.promote_types(weight.dtype, dtype) != dtype:
            raise BackendUnsupportedError(
                f"norm: xformers' rms_norm writes its output in the input dtype {dtype}, but qvl's norm with a "
                f"{weight.dtype} weight returns {torch.promote_types(weight.dtype, dtype)}")
        w = weight.contiguous()
        rmsnorm = installed.XF.rmsnorm
        if residual is None:
            return rmsnorm.rms_norm(x.contiguous(), w, eps)
        # rms_norm_add(s, r) adds r into s in place and normalizes the sum: s starts as a copy of x, so the
        # caller's tensors stay untouched and s ends as the new residual stream x + residual.
        s = x.to(dtype=dtype, memory_format=torch.contiguous_format, copy=True)
        y = rmsnorm.rms_norm_add(s, residual.to(dtype).contiguous(), w, eps)
        return y, s
