"""The `triton` backend: qvl's own kernels (qvl/kernels) behind every operator.

On a machine without a CUDA device the kernels run through the Triton interpreter on CPU tensors
(`qvl backends` shows the backend as interpreted); on a GPU they compile for CUDA tensors.
"""

from __future__ import annotations

import torch.nn.functional as F

from ..dtypes import FLOAT_DTYPES
from ..kernels import DEVICE_TYPE, HAS_CUDA, INTERPRETED, MAX_HEAD_DIM, TRITON_IMPORTED_TOO_EARLY
from ..kernels.activation import gelu, quick_gelu, swiglu
from ..kernels.attention import causal_attention, varlen_attention
from ..kernels.cross_entropy import fused_linear_cross_entropy
from ..kernels.decode_attention import decode_attention
from ..kernels.layer_norm import MAX_HIDDEN as LAYER_NORM_MAX_HIDDEN
from ..kernels.layer_norm import layer_norm
from ..kernels.rms_norm import rms_norm
from ..kernels.rope import rope, rope_and_cache
from .interface import needs_grad
from .registry import Backend, OpImpl

# Causal calls with at most this many queries against a longer key range are decode steps: split-KV.
DECODE_MAX_QUERIES = 8


def _head_dim_ok(d: int) -> bool:
    return d % 2 == 0 and d <= MAX_HEAD_DIM


class _TritonOp(OpImpl):
    """What every triton kernel supports, as data; the operator interface checks the rest of each call, so the
    kernels' launchers do not check their inputs again."""

    devices = frozenset({DEVICE_TYPE})
    dtypes = FLOAT_DTYPES
    head_dims = staticmethod(_head_dim_ok)
    head_dims_text = f"even and at most {MAX_HEAD_DIM}"


class TritonAttention(_TritonOp):
    operator = "attention"
    masks = frozenset({"causal", "block_diagonal"})
    device_lengths = True  # a static cache's length on the device: the split-KV kernel reads it
    backward = True  # flash-attention backward for both masks; not through the split-KV decode kernel

    def not_supported_reasons(self, call):
        reasons = super().not_supported_reasons(call)
        if call.get("grad") and call.get("device_lengths"):
            reasons.append("no backward for lengths held on the device (the split-KV decode kernel)")
        return reasons

    def __call__(self, q, k, v, mask, scale):
        if mask.kind == "block_diagonal":
            return varlen_attention(q, k, v, mask.cu_seqlens, mask.max_seqlen, scale)
        decode_shaped = q.shape[1] <= DECODE_MAX_QUERIES and k.shape[1] > q.shape[1]
        if mask.kv_len is not None or (decode_shaped and not needs_grad(q, k, v)):
            return decode_attention(q, k, v, mask.pad, scale, kv_len=mask.kv_len)
        return causal_attention(q, k, v, mask.pad, scale)


class TritonRope(_TritonOp):
    operator = "rope"
    backward = True  # the rotation by minus the angle

    def __call__(self, q, k, positions, rotary):
        return rope(q, k, positions, rotary.inv_freq, rotary.stream_of_pair)


class TritonCache(_TritonOp):
    """RoPE on q and k fused with the cache write: k is stored rotated, in the same launch."""

    operator = "cache"
    device_lengths = True  # the kernel reads a tensor start

    def __call__(self, q, k, v, positions, rotary, k_cache, v_cache, start):
        return rope_and_cache(q, k, v, positions, rotary.inv_freq, rotary.stream_of_pair, k_cache, v_cache, start)


class TritonNorm(_TritonOp):
    """RMSNorm (qvl/kernels/rms_norm.py, any width) and LayerNorm (qvl/kernels/layer_norm.py, one row in registers)."""

    operator = "norm"
    backward = True

    def not_supported_reasons(self, call):
        reasons = super().not_supported_reasons(call)
        if call.get("layer_norm") and call.get("hidden") > LAYER_NORM_MAX_HIDDEN:
            reasons.append(f"LayerNorm rows wider than {LAYER_NORM_MAX_HIDDEN} not supported (hidden "
                           f"{call.get('hidden')}: the kernel holds one row in registers)")
        return reasons

    def __call__(self, x, weight, eps, residual=None, bias=None):
        if bias is not None:
            return layer_norm(x, weight, bias, eps, residual)
        return rms_norm(x, weight, eps, residual)


class TritonMLP(_TritonOp):
    """Projections on torch matmul (cuBLAS); the activation fused over the [gate | up] projection output."""

    operator = "mlp"
    activations = frozenset({"swiglu", "gelu", "quick_gelu"})
    backward = True  # the activations' backward recomputes them from the projection output; matmuls by autograd

    def __call__(self, x, w_in, b_in, w_out, b_out, activation):
        h = F.linear(x, w_in, b_in)
        h = swiglu(h) if activation == "swiglu" else quick_gelu(h) if activation == "quick_gelu" else gelu(h)
        return F.linear(h, w_out, b_out)


class TritonLinear(_TritonOp):
    """torch matmul (cuBLAS), as this backend's MLP projections: qvl's own projection kernels (GEMM, decode GEMV)
    are the `triton-gemm` backend's, which measurement chooses between."""

    operator = "linear"
    backward = True  # autograd through the matmul

    def __call__(self, x, weight, bias=None):
        return F.linear(x, weight, bias)


class TritonLoss(_TritonOp):
    """The LM head fused with cross-entropy, chunked over tokens: the whole logits never exist (returns None)."""

    operator = "loss"
    backward = True  # the logits' gradient is made chunk by chunk in the forward, scaled in the backward

    def __call__(self, hidden, weight, targets, divisor=None):
        return fused_linear_cross_entropy(hidden, weight, targets, divisor), None


def availability() -> list[str]:
    if not HAS_CUDA and not INTERPRETED:
        return ["no CUDA device, and TRITON_INTERPRET=0 forbids the interpreter"]
    if TRITON_IMPORTED_TOO_EARLY:
        return ["no CUDA device, and triton was imported before qvl with the interpreter off: set "
                "TRITON_INTERPRET=1 before importing triton, or import qvl first"]
    return []


BACKEND = Backend(
    "triton",
    {"attention": TritonAttention(), "rope": TritonRope(), "norm": TritonNorm(), "mlp": TritonMLP(),
     "cache": TritonCache(), "loss": TritonLoss(), "linear": TritonLinear()},
    description="qvl's Triton kernels (qvl/kernels)" + (" through the Triton interpreter" if INTERPRETED else ""),
    # `auto` prefers compiled kernels over everything, but never the interpreter over eager: interpreted
    # kernels are for checking correctness on a CPU, hundreds of times slower than plain PyTorch there.
    priority=-10 if INTERPRETED else 20,
    availability=availability,
    note=lambda: "interpreted" if INTERPRETED else "",
)
