"""norm -> xformers.ops.rmsnorm.rms_norm, and rms_norm_add for the fused residual add (Triton kernels).
LayerNorm (a norm call with a bias: Qwen2-VL's vision tower): unsupported, xFormers has none.
"""

from __future__ import annotations

import torch

from ...dtypes import dtype_name
from ..registry import BackendUnsupportedError, CallInfo
from . import installed
from .base import TritonKernelOp


def _widening_weight(weight_dtype: torch.dtype, dtype: torch.dtype) -> str | None:
    """Why a weight of `weight_dtype` cannot go with inputs of `dtype`, or None: qvl's norm returns the promoted
    dtype, and rms_norm writes its output in the input dtype."""
    promoted = torch.promote_types(weight_dtype, dtype)
    if promoted == dtype:
        return None
    return (f"xformers' rms_norm writes its output in the input dtype {dtype_name(dtype)}, but qvl's norm with a "
            f"{dtype_name(weight_dtype)} weight returns {dtype_name(promoted)}")


LAYER_NORM_REASON = "LayerNorm not supported: xformers has no LayerNorm operator (its norm is rms_norm only)"


class XformersNorm(TritonKernelOp):
    operator = "norm"

    def not_supported_reasons(self, call: CallInfo) -> list[str]:
        reasons = super().not_supported_reasons(call)
        if call.get("layer_norm"):
            reasons.append(LAYER_NORM_REASON)
        weight_dtype = call.get("weight_dtype")  # set only when it differs from x's
        if weight_dtype is not None and (why := _widening_weight(weight_dtype, call.dtype)):
            reasons.append(why)
        return reasons

    def __call__(self, x, weight, eps, residual=None, bias=None):
        if bias is not None:  # a direct call, not routed by the registry
            raise BackendUnsupportedError(f"norm: {LAYER_NORM_REASON}")
        dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
        if why := _widening_weight(weight.dtype, dtype):  # a direct call, not routed by the registry
            raise BackendUnsupportedError(f"norm: {why}")
        w = weight.contiguous()
        rmsnorm = installed.XF.rmsnorm
        if residual is None:
            return rmsnorm.rms_norm(x.contiguous(), w, eps)
        # rms_norm_add(s, r) adds r into s in place and normalizes the sum: s starts as a copy of x, so the
        # caller's tensors stay untouched and s ends as the new residual stream x + residual.
        s = x.to(dtype=dtype, memory_format=torch.contiguous_format, copy=True)
        y = rmsnorm.rms_norm_add(s, residual.to(dtype).contiguous(), w, eps)
        return y, s
