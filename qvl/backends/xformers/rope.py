"""rope and cache -> xformers.ops.rope_padded (a Triton kernel), where one position per token applies: text
with uniform M-RoPE streams. The cache operator lets it place roped K and V into the cache directly.

rope_padded's math, read from its kernel: pair j couples dims j and j + D/2 with ``adjacents=False``
(qvl's rotate-half), its frequency is theta^(-2j/D) computed in float32 (qvl: inv_freq = theta^(-2j/D)),
the angle is seqpos * frequency / linear_scale (linear_scale = 1, no dynamic scaling), and ``seqpos``
gives every query its own absolute position, independent of where it is written in the cache. That is
qvl's formula; only the float32 rounding of the frequency differs (xFormers computes pow(theta, -2j/D)
where qvl computes 1 / theta^(2j/D): a few ulps). theta is recovered from `Rotary.inv_freq`, and a
frequency table that is not such a ladder is refused rather than approximated.
"""

from __future__ import annotations

import functools
import math
import weakref

import torch

from ..interface import Rotary
from ..registry import BackendUnsupportedError, CallInfo
from . import installed, layout
from .base import TritonKernelOp

NON_UNIFORM_REASON = ("position streams differ (sections {sections}): rope_padded takes one position per token, "
                      "so multimodal M-RoPE with distinct streams and the vision tower's 2-D RoPE cannot be expressed")

_THETAS: weakref.WeakKeyDictionary[Rotary, float | str] = weakref.WeakKeyDictionary()


def rope_theta(inv_freq: torch.Tensor) -> float | None:
    """theta such that inv_freq[j] == theta^(-2j/D) (qvl's own float32 formula), or None if there is none."""
    f = inv_freq.detach().to("cpu", torch.float64).flatten()
    half = f.numel()
    if half == 0 or f[0].item() != 1.0 or not bool((f > 0).all()):
        return None
    dim = 2 * half
    if half == 1:
        return 10000.0  # any theta gives [1.0]
    j = torch.arange(1, half, dtype=torch.float64)
    estimate = math.exp(float((-(dim / (2 * j)) * torch.log(f[1:])).mean()))
    if not math.isfinite(estimate) or estimate <= 1.0:
        return None
    for theta in (float(round(estimate)), estimate):
        ladder = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        if torch.allclose(ladder.double(), f, rtol=1e-6, atol=0.0):
            return theta
    return None


def _theta_for(rotary: Rotary) -> float:
    theta = _THETAS.get(rotary)
    if theta is None:
        found = rope_theta(rotary.inv_freq)
        theta = found if found is not None else (
            "Rotary.inv_freq is not a theta^(-2j/D) ladder (scaled or custom frequencies): rope_padded derives "
            "its frequencies from theta alone and would not match")
        _THETAS[rotary] = theta
    if isinstance(theta, str):
        raise BackendUnsupportedError(f"rope: xformers backend cannot run this call: {theta}")
    return theta


@functools.lru_cache(maxsize=256)
def _rope_bias(batch: int, length: int, padding: int, kv_len: int, device: torch.device):
    """Queries: B blocks of `length`; cache: B blocks of `padding` slots with `kv_len` used. rope_padded writes
    query i of block b at slot b * padding + kv_len - length + i."""
    return installed.XF.attn_bias.BlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens(
        q_seqlen=[length] * batch, kv_padding=padding, kv_seqlen=[kv_len] * batch, device=device)


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, L, H, D) -> (1, B*L, H, D), a view when the memory allows it; heads contiguous in the last dim."""
    x = x.reshape(1, x.shape[0] * x.shape[1], *x.shape[2:])
    return x if x.stride(-1) == 1 else x.contiguous()


def _seqpos(positions: torch.Tensor) -> torch.Tensor:
    """One absolute position per query token, (B*L,): the first stream (all streams are equal)."""
    return positions[0].reshape(-1).contiguous()


def rope_padded(xq, xk, xv, cache_k, cache_v, bias, theta: float, seqpos: torch.Tensor) -> torch.Tensor:
    return installed.XF.ops.rope_padded(xq, xk, xv, cache_k, cache_v, bias, theta=theta, linear_scale=1.0,
                                        use_dynamic_scaling=False, seqpos=seqpos, adjacents=False)


def _check_uniform(rotary: Rotary, operator: str) -> None:
    if not rotary.uniform_streams:  # the registry routes these away; a direct call must not compute wrongly
        raise BackendUnsupportedError(f"{operator}: xformers backend cannot run this call: "
                                      + NON_UNIFORM_REASON.format(sections=rotary.sections))


def rope(q, k, positions, rotary):
    _check_uniform(rotary, "rope")
    theta = _theta_for(rotary)
    b, n, hq, d = q.shape
    hkv = k.shape[2]
    xk = _tokens(k)
    out_k = torch.empty((1, b * n, hkv, d), dtype=k.dtype, device=k.device)
    # rope_padded always copies V into a cache; here there is no V: it reads K again and writes into a
    # discarded one-row scratch (stride 0), so no V-sized buffer is allocated.
    scratch = torch.empty((1, 1, 1, d), dtype=k.dtype, device=k.device).expand(1, b * n, hkv, d)
    out_q = rope_padded(_tokens(q), xk, xk, out_k, scratch, _rope_bias(b, n, n, n, q.device), theta,
                        _seqpos(positions))
    return out_q.view(b, n, hq, d), out_k.view(b, n, hkv, d)


def rope_and_cache(q, k, v, positions, rotary, k_cache, v_cache, start):
    _check_uniform(rotary, "cache")
    theta = _theta_for(rotary)
    b, n, hq, d = q.shape
    hkv = k.shape[2]
    xq, xk, xv, seqpos = _tokens(q), _tokens(k), _tokens(v), _seqpos(positions)
    pitch = layout.same_rows(k_cache, v_cache)
    if pitch is not None:
        shape = (1, b * pitch, hkv, d)
        stride = (k_cache.stride(0), *k_cache.stride()[1:])
        if layout.within_storage(k_cache, shape, stride) and layout.within_storage(v_cache, shape, stride):
            ck, cv = layout.packed(k_cache, pitch, b * pitch), layout.packed(v_cache, pitch, b * pitch)
            out_q = rope_padded(xq, xk, xv, ck, cv, _rope_bias(b, n, pitch, start + n, q.device), theta, seqpos)
            return out_q.view(b, n, hq, d)
    # A cache whose rows cannot be addressed as one sequence: rope into a buffer, then copy the slots.
    tk = torch.empty((1, b * n, hkv, d), dtype=k_cache.dtype, device=k.device)
    tv = torch.empty((1, b * n, hkv, d), dtype=v_cache.dtype, device=v.device)
    out_q = rope_padded(xq, xk, xv, tk, tv, _rope_bias(b, n, n, n, q.device), theta, seqpos)
    k_cache[:, start:start + n] = tk.view(b, n, hkv, d)
    v_cache[:, start:start + n] = tv.view(b, n, hkv, d)
    return out_q.view(b, n, hq, d)


class XformersRope(TritonKernelOp):
    operator = "rope"

    def not_supported_reasons(self, call: CallInfo) -> list[str]:
        reasons = super().not_supported_reasons(call)
        if not call.get("uniform_streams", False):
            reasons.append(NON_UNIFORM_REASON.format(sections=call.get("sections")))
        return reasons

    def __call__(self, q, k, positions, rotary):
        return rope(q, k, positions, rotary)


class XformersCache(XformersRope):
    """rope_padded rotates q and k and writes rotated k and v into the cache in one launch."""

    operator = "cache"

    def __call__(self, q, k, v, positions, rotary, k_cache, v_cache, start):
        return rope_and_cache(q, k, v, positions, rotary, k_cache, v_cache, start)
