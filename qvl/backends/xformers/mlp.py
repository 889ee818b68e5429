"""mlp -> xformers.ops.swiglu with the packed [gate; up] weight, so xFormers' dispatcher picks its packed fused
SwiGLU kernel where the installed release has one (0.0.35 has none: it runs its 'eager' op, F.linear + silu).
GELU (the vision patch merger) and QuickGELU (Qwen2-VL's vision blocks): unsupported, xFormers has neither.
linear -> torch matmul: xFormers has no projection operator of its own (its SwiGLU op's projections in 0.0.35 are
F.linear too), so a whole-model xformers plan runs its projections as PyTorch does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..registry import BackendUnsupportedError, CallInfo
from . import installed
from .base import XformersOp

_DISPLAY_NAMES = {"gelu": "GELU", "quick_gelu": "QuickGELU"}


def _unsupported_activation(activation: str) -> str:
    return (f"activation {activation} not supported: xformers has no {_DISPLAY_NAMES.get(activation, activation)} "
            "MLP operator (its fused MLP is SwiGLU only)")


GELU_REASON = _unsupported_activation("gelu")


class XformersMLP(XformersOp):
    operator = "mlp"
    activations = frozenset({"swiglu"})

    def not_supported_reasons(self, call: CallInfo) -> list[str]:
        reasons = super().not_supported_reasons(call)
        activation = call.get("activation")
        prefix = f"activation {activation} "
        return [_unsupported_activation(activation) if r.startswith(prefix) else r for r in reasons]

    def __call__(self, x, w_in, b_in, w_out, b_out, activation):
        if activation != "swiglu":
            raise BackendUnsupportedError(f"mlp: {_unsupported_activation(activation)}")
        inner = w_in.shape[0] // 2
        # [gate; up] as two views of one storage: xFormers sees packed weights and may take its packed kernel.
        w1, w2 = w_in.unflatten(0, (2, inner)).unbind(0)
        b1, b2 = (None, None) if b_in is None else b_in.unflatten(0, (2, inner)).unbind(0)
        return installed.XF.ops.swiglu(x, w1, b1, w2, b2, w_out, b_out)


class XformersLinear(XformersOp):
    operator = "linear"
    backward = True  # autograd through the matmul

    def __call__(self, x, weight, bias=None):
        return F.linear(x, weight, bias)


def swiglu_op_name(dtype: torch.dtype = torch.bfloat16, bias: bool = False) -> str:
    """The SwiGLU implementation xFormers' dispatcher picks for packed weights (0.0.35: 'eager', F.linear)."""
    try:
        dispatch = installed.XF.ops.SwiGLUOpDispatch(device="cuda", dtype=dtype, dtype_autocast_gpu=dtype,
                                                     packed_weights=True, bias_enabled=bias)
        return str(dispatch.op.NAME)
    except Exception:
        return "?"
