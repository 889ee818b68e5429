"""The eager backend: plain PyTorch, written for clarity. Every other backend is tested against it.

Numerics follow transformers' Qwen2.5-VL: RMSNorm in float32 with the weight applied in the input dtype,
softmax in float32, rotary angles in float32; and its Qwen2-VL: LayerNorm as torch's (float32, one rounding),
QuickGELU in the input dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .interface import IGNORE_INDEX, QUICK_GELU_SLOPE, BlockDiagonalMask, CausalMask, Rotary, divide_loss
from .registry import Backend, OpImpl


class _EagerOp(OpImpl):
    backward = True  # torch autograd through every op


def rope_angles(positions: torch.Tensor, rotary: Rotary) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (B, L, D/2) float32: pair j takes stream stream_of_pair[j]'s position times inv_freq[j]."""
    stream = rotary.stream_of_pair.to(device=positions.device, dtype=torch.long)
    pos = positions.to(torch.float32).index_select(0, stream)  # (D/2, B, L): each pair's own stream
    angles = pos.permute(1, 2, 0) * rotary.inv_freq.to(device=positions.device, dtype=torch.float32)
    return angles.cos(), angles.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary on (B, L, H, D) with cos/sin (B, L, D/2), in float32, cast back to x.dtype."""
    xf = x.to(torch.float32)
    x1, x2 = xf.chunk(2, dim=-1)
    c, s = cos.unsqueeze(2), sin.unsqueeze(2)
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


class EagerRope(_EagerOp):
    operator = "rope"

    def __call__(self, q, k, positions, rotary):
        cos, sin = rope_angles(positions, rotary)
        return rotate(q, cos, sin), rotate(k, cos, sin)


class EagerCache(_EagerOp):
    operator = "cache"
    device_lengths = True

    def __call__(self, q, k, v, positions, rotary, k_cache, v_cache, start):
        cos, sin = rope_angles(positions, rotary)
        if isinstance(start, torch.Tensor):  # a slot held on the device: index, never read it back
            slots = start + torch.arange(k.shape[1], device=k_cache.device)
            k_cache.index_copy_(1, slots, rotate(k, cos, sin))
            v_cache.index_copy_(1, slots, v)
        else:
            end = start + k.shape[1]
            k_cache[:, start:end] = rotate(k, cos, sin)
            v_cache[:, start:end] = v
        return rotate(q, cos, sin)


class EagerNorm(_EagerOp):
    operator = "norm"

    def __call__(self, x, weight, eps, residual=None, bias=None):
        if residual is not None:
            x = x + residual
        y = rms_norm(x, weight, eps) if bias is None else layer_norm(x, weight, bias, eps)
        return (y, x) if residual is not None else y


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' Qwen2RMSNorm: normalized in float32, rounded to x.dtype, then scaled by the weight."""
    xf = x.to(torch.float32)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """torch's F.layer_norm (Qwen2-VL's vision LayerNorm) in float32, rounded once to the dtype weight * x has."""
    wide = torch.promote_types(torch.promote_types(x.dtype, weight.dtype), torch.float32)  # float64 stays
    y = F.layer_norm(x.to(wide), x.shape[-1:], weight.to(wide), bias.to(wide), eps)
    return y.to(torch.promote_types(weight.dtype, x.dtype))


def quick_gelu(h: torch.Tensor) -> torch.Tensor:
    """transformers' QuickGELUActivation: h * sigmoid(1.702 h), in h's dtype."""
    return h * torch.sigmoid(QUICK_GELU_SLOPE * h)


class EagerMLP(_EagerOp):
    operator = "mlp"

    def __call__(self, x, w_in, b_in, w_out, b_out, activation):
        h = F.linear(x, w_in, b_in)
        if activation == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        elif activation == "quick_gelu":
            h = quick_gelu(h)
        else:
            h = F.gelu(h)
        return F.linear(h, w_out, b_out)


class EagerAttention(_EagerOp):
    """Materializes the (Lq, Lk) score matrix: the reference, not the fast path."""

    operator = "attention"
    device_lengths = True  # CausalMask.dense builds the mask from kv_len on the device
    returns_weights = True

    def __call__(self, q, k, v, mask, scale, weights=False):
        b, lq, hq, d = q.shape
        lk, hkv = k.shape[1], k.shape[2]
        group = hq // hkv
        # (B, Hkv, group, L, D): each kv head serves `group` query heads, without copying K/V.
        qh = q.reshape(b, lq, hkv, group, d).permute(0, 2, 3, 1, 4)
        kh, vh = k.permute(0, 2, 1, 3).unsqueeze(2), v.permute(0, 2, 1, 3).unsqueeze(2)
        wide = torch.promote_types(q.dtype, torch.float32)  # float64 stays float64 (gradcheck)
        scores = torch.matmul(qh, kh.transpose(-1, -2)).to(wide) * scale
        allowed = mask.dense(b, lq, lk, device=q.device)[:, None, None]  # (B, 1, 1, Lq, Lk)
        scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        probs = torch.nan_to_num(probs, nan=0.0)  # rows with no visible key (padding queries) -> zeros
        out = torch.matmul(probs.to(v.dtype), vh)  # (B, Hkv, group, Lq, D)
        out = out.permute(0, 3, 1, 2, 4).reshape(b, lq, hq, d)
        return (out, probs.reshape(b, hq, lq, lk).to(q.dtype)) if weights else out


class EagerLoss(_EagerOp):
    """The whole (N, V) logits, then float32 cross-entropy: transformers' causal-LM loss."""

    operator = "loss"

    def __call__(self, hidden, weight, targets, divisor=None):
        logits = F.linear(hidden, weight)
        wide = logits.to(torch.promote_types(logits.dtype, torch.float32))  # float64 stays float64 (gradcheck)
        total = F.cross_entropy(wide, targets.long(), ignore_index=IGNORE_INDEX, reduction="sum")
        return divide_loss(total, targets, divisor), logits


class EagerLinear(_EagerOp):
    operator = "linear"

    def __call__(self, x, weight, bias=None):
        return F.linear(x, weight, bias)


BACKEND = Backend(
    "eager",
    {"attention": EagerAttention(), "rope": EagerRope(), "norm": EagerNorm(), "mlp": EagerMLP(),
     "cache": EagerCache(), "loss": EagerLoss(), "linear": EagerLinear()},
    description="plain PyTorch; the reference every backend is tested against",
    priority=0,
)

__all__ = ["BACKEND", "layer_norm", "quick_gelu", "rms_norm", "rope_angles", "rotate", "BlockDiagonalMask",
           "CausalMask"]
