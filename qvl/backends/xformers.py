"""The `xformers` backend: xFormers' operators behind the operator interface, where xFormers has one.

    attention  xformers.ops.memory_efficient_attention_forward, one call per operator call:
               - BlockDiagonalMask (vision windows, full-attention frames): xFormers' BlockDiagonalMask built
                 from the segment lengths, so all windows go in one call;
               - causal without padding (prefill, or decode against a cache slice): the batch as it is, with
                 LowerTriangularFromBottomRightMask (bottom-right aligned like qvl's CausalMask);
               - causal with left padding (prefill or decode): the batch packed into one sequence, queries
                 in blocks of Lq, keys read in place through a strided view of the rows (the cache is never
                 copied), as a BlockDiagonalCausalWithOffsetGappyKeysMask whose key block b starts after
                 row b's padding. Query rows that see no key are zeroed explicitly.
               GQA uses xFormers' 5-D layout (B, M, G, H, K): K/V expanded over H with stride 0, not copied.
    norm       xformers.ops.rmsnorm.rms_norm, and rms_norm_add for the fused residual add (Triton kernels).
    mlp        xformers.ops.swiglu with the packed [gate; up] weight, so xFormers' dispatcher picks its
               packed fused SwiGLU kernel where the installed release has one (0.0.35 has none: it runs its
               'eager' op, F.linear + silu). GELU (the vision patch merger): unsupported, xFormers has none.
    rope       xformers.ops.rope_padded (Triton) where one position per token applies: text with uniform
    cache      M-RoPE streams. The cache operator lets it place roped K and V into the cache directly.

rope_padded's math, read from its kernel: pair j couples dims j and j + D/2 with ``adjacents=False``
(qvl's rotate-half), its frequency is theta^(-2j/D) computed in float32 (qvl: inv_freq = theta^(-2j/D)),
the angle is seqpos * frequency / linear_scale (linear_scale = 1, no dynamic scaling), and ``seqpos``
gives every query its own absolute position, independent of where it is written in the cache. That is
qvl's formula; only the float32 rounding of the frequency differs (xFormers computes pow(theta, -2j/D)
where qvl computes 1 / theta^(2j/D): a few ulps). theta is recovered from `Rotary.inv_freq`, and a
frequency table that is not such a ladder is refused rather than approximated.

Availability: the whole backend needs xFormers installed and a CUDA device. Without its compiled extension
xFormers' attention dispatcher refuses every CUDA input ("xFormers wasn't build with CUDA support"), so
attention is then unsupported with xFormers' own explanation, while rms_norm, rope_padded (Triton) and
swiglu still run. Per-call kernel support of memory_efficient_attention (dtype, head dim, bias type) is
asked of xFormers' own dispatcher with a tiny probe in the exact layout and bias type the call would use:
e.g. float32 with padding has no kernel (only flash takes gappy keys, and flash has no float32).
"""

from __future__ import annotations

import functools
import importlib
import logging
import math
import os
import re
import types
import weakref
from dataclasses import dataclass

import torch

from .interface import BlockDiagonalMask, CausalMask, Rotary
from .registry import Backend, BackendUnsupportedError, CallInfo, OpImpl

# --- what is installed and what loads -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Status:
    """Why parts of xFormers cannot run here; None fields are fine."""

    version: str = ""
    missing: str | None = None  # xformers not installed, or its Python package failed to import
    extension: str | None = None  # its compiled extension did not load: xFormers' own explanation
    cuda: str | None = None  # no CUDA device
    triton: str | None = None  # xFormers' Triton kernels (rms_norm, rope_padded) are disabled


def _one_line(text: str) -> str:
    return re.sub(r"\s+", " ", str(text)).strip()


def _import_xformers() -> tuple[types.SimpleNamespace | None, str | None]:
    """Import the pieces of xFormers this backend uses; (None, reason) when that fails.

    xFormers logs a multi-line warning when its extension does not load; it is silenced during the import
    because the same explanation becomes this backend's reason (see `_extension_problem`).
    """
    xf_log = logging.getLogger("xformers")
    level = xf_log.level
    xf_log.setLevel(logging.ERROR)
    try:
        xformers = importlib.import_module("xformers")
        xops = importlib.import_module("xformers.ops")
        mods = types.SimpleNamespace(
            xformers=xformers, ops=xops,
            fmha=importlib.import_module("xformers.ops.fmha"),
            attn_bias=importlib.import_module("xformers.ops.fmha.attn_bias"),
            rmsnorm=importlib.import_module("xformers.ops.rmsnorm"),
        )
    except ModuleNotFoundError as e:
        if e.name == "xformers":
            return None, "xformers is not installed (pip install xformers)"
        return None, f"xformers failed to import: {type(e).__name__}: {e}"
    except Exception as e:  # a broken install must become a reason, never an import error of qvl
        return None, f"xformers failed to import: {type(e).__name__}: {_one_line(e)}"
    finally:
        xf_log.setLevel(level)
    return mods, None


def _extension_problem(mods: types.SimpleNamespace) -> str | None:
    """xFormers' own explanation when its compiled extension (xformers/_C) did not load, else None."""
    xformers = mods.xformers
    cpp_lib = getattr(xformers, "_cpp_lib", None)
    exc = getattr(cpp_lib, "_cpp_library_load_exception", None)
    if exc is None:
        if getattr(xformers, "_has_cpp_library", True):
            return None
        return "xformers' compiled extension did not load (xformers._has_cpp_library is False)"
    detail = _one_line(exc)
    cause = exc.__cause__
    if cause is not None and _one_line(cause) not in detail:
        detail += f" [{type(cause).__name__}: {_one_line(cause)}]"
    return f"xformers' compiled extension did not load: {detail}"


def _cuda_problem() -> str | None:
    if torch.cuda.is_available():
        return None
    cpu_only = torch.version.cuda is None and torch.version.hip is None
    why = f"torch {torch.__version__} is built without CUDA" if cpu_only else "torch sees no GPU"
    return f"no CUDA device ({why}): xformers' kernels run on GPUs only"


def _triton_problem(mods: types.SimpleNamespace, cuda: str | None) -> str | None:
    """Why xformers._is_triton_available() is False (it gates rms_norm and rope_padded), else None."""
    if os.environ.get("XFORMERS_ENABLE_TRITON", "0") == "1":
        return None
    if cuda is not None:
        return cuda
    if os.environ.get("XFORMERS_FORCE_DISABLE_TRITON", "0") == "1":
        return "XFORMERS_FORCE_DISABLE_TRITON=1 disables xformers' Triton kernels (rms_norm, rope_padded)"
    capability = torch.cuda.get_device_capability()
    if capability < (8, 0):
        return (f"xformers enables its Triton kernels (rms_norm, rope_padded) only on compute capability >= 8.0; "
                f"this GPU has {capability[0]}.{capability[1]}")
    try:
        importlib.import_module("triton")
    except Exception as e:
        return f"xformers' Triton kernels (rms_norm, rope_padded) need triton, which failed to import: {e}"
    check = getattr(mods.xformers, "_is_triton_available", None)
    if check is not None and not check():
        return "xformers._is_triton_available() is False: its Triton kernels (rms_norm, rope_padded) are disabled"
    return None


def load() -> tuple[Status, types.SimpleNamespace | None]:
    """Import xFormers and work out what of it can run on this machine."""
    mods, missing = _import_xformers()
    if mods is None:
        return Status(missing=missing), None
    cuda = _cuda_problem()
    return Status(version=str(getattr(mods.xformers, "__version__", "?")), extension=_extension_problem(mods),
                  cuda=cuda, triton=_triton_problem(mods, cuda)), mods


STATUS, XF = load()


def _availability() -> list[str]:
    """Reasons no operator of this backend can run here."""
    if STATUS.missing:
        return [STATUS.missing]
    if STATUS.cuda:  # nothing runs; the extension's state is worth knowing all the same
        return [STATUS.cuda] + ([STATUS.extension] if STATUS.extension else [])
    return []


def _note() -> str:
    """Shown by `qvl backends` next to 'ok' when only some operators are off."""
    off = []
    if STATUS.extension:
        off.append("attention off: compiled extension not loaded")
    if STATUS.triton:
        off.append("norm/rope/cache off: Triton kernels disabled")
    return "; ".join(off)


# --- attention: qvl masks -> xFormers layouts and biases ----------------------------------------------------------


@dataclass
class AttentionCall:
    """One memory_efficient_attention call: tensors in xFormers' layout, the bias, how to map back."""

    query: torch.Tensor  # (B', Mq, Hq, K) or (B', Mq, G, H, K)
    key: torch.Tensor  # same rank; with GQA, expanded over H with stride 0
    value: torch.Tensor
    bias: object  # an xformers.ops.fmha.attn_bias.AttentionBias
    out_shape: tuple[int, ...]  # (B, Lq, Hq, D)
    empty_rows: torch.Tensor | None = None  # (B, Lq) bool: queries that see no key, zeroed afterwards

    def finish(self, out: torch.Tensor) -> torch.Tensor:
        out = out.reshape(self.out_shape)
        if self.empty_rows is not None:
            out.masked_fill_(self.empty_rows[:, :, None, None], 0)  # out is the kernel's fresh output
        return out


def _pitch(x: torch.Tensor) -> int | None:
    """Tokens between the starts of consecutive rows of (B, L, ...) x, if rows are evenly strided and apart."""
    if x.shape[0] == 1:
        return x.shape[1]
    s0, s1 = x.stride(0), x.stride(1)
    if s1 <= 0 or s0 % s1 or s0 // s1 < x.shape[1]:
        return None
    return s0 // s1


def _packed(x: torch.Tensor, pitch: int, length: int) -> torch.Tensor:
    """(1, length, ...) view of (B, L, ...) x's memory where row b's token l sits at b * pitch + l."""
    return x.as_strided((1, length, *x.shape[2:]), (x.stride(0), x.stride(1), *x.stride()[2:]), x.storage_offset())


def _within_storage(x: torch.Tensor, shape, stride) -> bool:
    last = x.storage_offset() + sum((n - 1) * s for n, s in zip(shape, stride))
    return (last + 1) * x.element_size() <= x.untyped_storage().nbytes()


def _gqa_layout(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """4-D (B, M, H, K) without GQA; 5-D (B, M, G=Hkv, H=group, K) with it, K/V expanded with stride 0."""
    hq, hkv = q.shape[2], k.shape[2]
    if hq == hkv:
        return q, k, v
    group = hq // hkv
    q5 = q.unflatten(2, (hkv, group))
    k5 = k.unsqueeze(3).expand(*k.shape[:3], group, k.shape[3])
    v5 = v.unsqueeze(3).expand(*v.shape[:3], group, v.shape[3])
    return q5, k5, v5


# Biases built for a mask are kept with the mask object: the model passes one mask to every layer of a
# forward (or decode step), so the host sync that reading a CausalMask's pad needs happens once, not per layer
# (a BlockDiagonalMask holds its lengths on the host: no sync at all).
_BIASES: "weakref.WeakKeyDictionary[object, dict]" = weakref.WeakKeyDictionary()


def _cached(mask, key, build):
    per_mask = _BIASES.setdefault(mask, {})
    if key not in per_mask:
        per_mask[key] = build()
    return per_mask[key]


def _block_diagonal_bias(mask: BlockDiagonalMask, device: torch.device):
    return XF.attn_bias.BlockDiagonalMask.from_seqlens(list(mask.seqlens), device=device)


def _gappy_causal_bias(pad: list[int], lq: int, lk: int, pitch: int, device: torch.device):
    """Row b: queries [b*Lq, (b+1)*Lq); keys [b*pitch + pad_b, b*pitch + Lk), bottom-right causal inside.
    pad values within [0, Lk]."""
    batch = len(pad)
    starts = [b * pitch + p for b, p in enumerate(pad)]
    lens = [lk - p for p in pad]
    total = (batch - 1) * pitch + lk
    return XF.attn_bias.BlockDiagonalCausalWithOffsetGappyKeysMask.from_seqlens(
        q_seqlen=[lq] * batch, kv_seqstarts=starts + [total], kv_seqlen=lens, device=device)


def prepare_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask) -> AttentionCall:
    """Translate qvl's attention inputs into one memory_efficient_attention call (no K/V copies)."""
    b, lq, hq, d = q.shape
    lk = k.shape[1]
    out_shape = (b, lq, hq, d)
    if isinstance(mask, BlockDiagonalMask):  # B == 1, Lq == Lk: one packed sequence of segments
        bias = _cached(mask, ("block_diagonal", q.device), lambda: _block_diagonal_bias(mask, q.device))
        return AttentionCall(*_gqa_layout(q, k, v), bias, out_shape)
    if not isinstance(mask, CausalMask):
        raise BackendUnsupportedError(f"attention: xformers backend got an unknown mask {type(mask).__name__}")
    if mask.pad is None:  # the batch as it is; K/V may be strided slices of the cache
        return AttentionCall(*_gqa_layout(q, k, v), XF.attn_bias.LowerTriangularFromBottomRightMask(), out_shape)

    # Left padding: pack the batch into one sequence; keys stay in place, read through a strided view.
    pitch = _pitch(k)
    if pitch is None or pitch != _pitch(v) or k.stride()[1:] != v.stride()[1:]:
        k, v = k.contiguous(), v.contiguous()  # unusual strides only; the model's K/V never get here
        pitch = lk
    total = (b - 1) * pitch + lk
    kp, vp = _packed(k, pitch, total), _packed(v, pitch, total)
    qp = q.reshape(1, b * lq, hq, d)

    def build():
        pad = [min(max(int(p), 0), lk) for p in mask.pad.tolist()]  # any value, as the eager mask reads it
        bias = _gappy_causal_bias(pad, lq, lk, pitch, q.device)
        # query i of row b sees keys pad_b <= j <= Lk - Lq + i: none when i < pad_b - (Lk - Lq)
        first_seen = [p - (lk - lq) for p in pad]
        empty = None
        if any(f > 0 for f in first_seen):
            empty = torch.arange(lq, device=q.device)[None, :] < torch.tensor(first_seen, device=q.device)[:, None]
        return bias, empty

    bias, empty = _cached(mask, ("causal", b, lq, lk, pitch, q.device, mask.pad._version), build)
    return AttentionCall(*_gqa_layout(qp, kp, vp), bias, out_shape, empty)


def memory_efficient_attention(call: AttentionCall, scale: float) -> torch.Tensor:
    try:
        out = XF.ops.memory_efficient_attention_forward(call.query, call.key, call.value, attn_bias=call.bias,
                                                        scale=scale)
    except NotImplementedError as e:  # no kernel for these exact inputs (the support probe missed it)
        raise BackendUnsupportedError(f"attention: {_dispatch_summary(str(e))}") from e
    return call.finish(out)


def _dispatch_summary(message: str) -> str:
    """xFormers' 'No operator found' message without the inputs dump, on one line."""
    kernels = message[message.find("`", message.find("\n")):] if "\n`" in message else message
    return "memory_efficient_attention has no kernel for these inputs: " + _one_line(kernels)


def _probe_masks(call: CallInfo, device) -> object:
    if call.get("mask") == "block_diagonal":
        return BlockDiagonalMask.from_seqlens([2, 2], device=device)
    return CausalMask(torch.tensor([1, 0], device=device) if call.get("padded") else None)


@functools.lru_cache(maxsize=None)
def _probe_attention(call: CallInfo) -> tuple[str, ...]:
    """Ask xFormers' dispatcher whether a kernel takes this kind of call, in the exact layout and bias type
    `prepare_attention` would produce, with tiny tensors on the device."""
    try:
        dispatch = importlib.import_module("xformers.ops.fmha.dispatch")
        common = importlib.import_module("xformers.ops.fmha.common")
        device = torch.device(call.device)
        mask = _probe_masks(call, device)
        batch = 1 if isinstance(mask, BlockDiagonalMask) else 2
        d, group = int(call.get("head_dim")), int(call.get("gqa") or 1)
        q = torch.zeros(batch, 4, group, d, device=device, dtype=call.dtype)
        kv = torch.zeros(batch, 4, 1, d, device=device, dtype=call.dtype)
        probe = prepare_attention(q, kv, kv, mask)
        inp = common.Inputs(query=probe.query, key=probe.key, value=probe.value, attn_bias=probe.bias, p=0.0,
                            scale=d**-0.5)
        inp.validate_inputs()
        dispatch._dispatch_fw(inp, False)
    except NotImplementedError as e:
        return (_dispatch_summary(str(e)),)
    except Exception as e:  # the probe itself broke (xFormers API moved?): let the real call decide
        logging.getLogger("qvl.backends").debug("xformers attention probe failed: %s", e)
    return ()


# --- rope and cache: rope_padded ----------------------------------------------------------------------------------

NON_UNIFORM_REASON = ("position streams differ (sections {sections}): rope_padded takes one position per token, "
                      "so multimodal M-RoPE with distinct streams and the vision tower's 2-D RoPE cannot be expressed")

_THETAS: "weakref.WeakKeyDictionary[Rotary, float | str]" = weakref.WeakKeyDictionary()


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
    return XF.attn_bias.BlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens(
        q_seqlen=[length] * batch, kv_padding=padding, kv_seqlen=[kv_len] * batch, device=device)


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, L, H, D) -> (1, B*L, H, D), a view when the memory allows it; heads contiguous in the last dim."""
    x = x.reshape(1, x.shape[0] * x.shape[1], *x.shape[2:])
    return x if x.stride(-1) == 1 else x.contiguous()


def _seqpos(positions: torch.Tensor) -> torch.Tensor:
    """One absolute position per query token, (B*L,): the first stream (all streams are equal)."""
    return positions[0].reshape(-1).contiguous()


def rope_padded(xq, xk, xv, cache_k, cache_v, bias, theta: float, seqpos: torch.Tensor) -> torch.Tensor:
    return XF.ops.rope_padded(xq, xk, xv, cache_k, cache_v, bias, theta=theta, linear_scale=1.0,
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
    pitch = _pitch(k_cache)
    if pitch is not None and pitch == _pitch(v_cache) and k_cache.stride()[1:] == v_cache.stride()[1:]:
        shape = (1, b * pitch, hkv, d)
        stride = (k_cache.stride(0), *k_cache.stride()[1:])
        if _within_storage(k_cache, shape, stride) and _within_storage(v_cache, shape, stride):
            ck, cv = _packed(k_cache, pitch, b * pitch), _packed(v_cache, pitch, b * pitch)
            out_q = rope_padded(xq, xk, xv, ck, cv, _rope_bias(b, n, pitch, start + n, q.device), theta, seqpos)
            return out_q.view(b, n, hq, d)
    # A cache whose rows cannot be addressed as one sequence: rope into a buffer, then copy the slots.
    tk = torch.empty((1, b * n, hkv, d), dtype=k_cache.dtype, device=k.device)
    tv = torch.empty((1, b * n, hkv, d), dtype=v_cache.dtype, device=v.device)
    out_q = rope_padded(xq, xk, xv, tk, tv, _rope_bias(b, n, n, n, q.device), theta, seqpos)
    k_cache[:, start:start + n] = tk.view(b, n, hkv, d)
    v_cache[:, start:start + n] = tv.view(b, n, hkv, d)
    return out_q.view(b, n, hq, d)


# --- the operator implementations ---------------------------------------------------------------------------------


class _XformersOp(OpImpl):
    devices = frozenset({"cuda"})


class _TritonKernelOp(_XformersOp):
    """rms_norm and rope_padded are xFormers' Triton kernels: gated by xformers._is_triton_available()."""

    def not_supported_reasons(self, call: CallInfo) -> list[str]:
        reasons = super().not_supported_reasons(call)
        if STATUS.triton and not STATUS.cuda:
            reasons.append(STATUS.triton)
        return reasons


class XformersAttention(_XformersOp):
    operator = "attention"
    masks = frozenset({"causal", "block_diagonal"})

    def not_supported_reasons(self, call: CallInfo) -> list[str]:
        reasons = super().not_supported_reasons(call)
        if reasons or STATUS.cuda:
            return reasons
        if STATUS.extension:  # xFormers' fmha refuses CUDA inputs when its build metadata did not load
            return [f"memory_efficient_attention needs the compiled extension: {STATUS.extension}"]
        return list(_probe_attention(call))

    def __call__(self, q, k, v, mask, scale):
        return memory_efficient_attention(prepare_attention(q, k, v, mask), scale)


class XformersRope(_TritonKernelOp):
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


class XformersNorm(_TritonKernelOp):
    operator = "norm"

    def __call__(self, x, weight, eps, residual=None):
        dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
        if torch.promote_types(weight.dtype, dtype) != dtype:
            raise BackendUnsupportedError(
                f"norm: xformers' rms_norm writes its output in the input dtype {dtype}, but qvl's norm with a "
                f"{weight.dtype} weight returns {torch.promote_types(weight.dtype, dtype)}")
        w = weight.contiguous()
        if residual is None:
            return XF.rmsnorm.rms_norm(x.contiguous(), w, eps)
        # rms_norm_add(s, r) adds r into s in place and normalizes the sum: s starts as a copy of x, so the
        # caller's tensors stay untouched and s ends as the new residual stream x + residual.
        s = x.to(dtype=dtype, memory_format=torch.contiguous_format, copy=True)
        y = XF.rmsnorm.rms_norm_add(s, residual.to(dtype).contiguous(), w, eps)
        return y, s


GELU_REASON = "activation gelu not supported: xformers has no GELU MLP operator (its fused MLP is SwiGLU only)"


class XformersMLP(_XformersOp):
    operator = "mlp"
    activations = frozenset({"swiglu"})

    def not_supported_reasons(self, call: CallInfo) -> list[str]:
        reasons = super().not_supported_reasons(call)
        return [GELU_REASON if r.startswith("activation gelu") else r for r in reasons]

    def __call__(self, x, w_in, b_in, w_out, b_out, activation):
        if activation != "swiglu":
            raise BackendUnsupportedError(f"mlp: {GELU_REASON}")
        inner = w_in.shape[0] // 2
        # [gate; up] as two views of one storage: xFormers sees packed weights and may take its packed kernel.
        w1, w2 = w_in.unflatten(0, (2, inner)).unbind(0)
        b1, b2 = (None, None) if b_in is None else b_in.unflatten(0, (2, inner)).unbind(0)
        return XF.ops.swiglu(x, w1, b1, w2, b2, w_out, b_out)


def swiglu_op_name(dtype: torch.dtype = torch.bfloat16, bias: bool = False) -> str:
    """The SwiGLU implementation xFormers' dispatcher picks for packed weights (0.0.35: 'eager', F.linear)."""
    try:
        dispatch = XF.ops.SwiGLUOpDispatch(device="cuda", dtype=dtype, dtype_autocast_gpu=dtype, packed_weights=True,
                                           bias_enabled=bias)
        return str(dispatch.op.NAME)
    except Exception:
        return "?"


def _description() -> str:
    if XF is None:
        return "xFormers operators (not installed)"
    swiglu = swiglu_op_name()
    text = (f"xFormers {STATUS.version}: memory_efficient_attention, rms_norm/rms_norm_add, rope_padded (RoPE + cache "
            f"write), swiglu (dispatched to xFormers' '{swiglu}' SwiGLU op"
            + (": F.linear + silu, this release has no fused SwiGLU kernel)" if swiglu == "eager" else ")"))
    return text  # why something is off (e.g. the compiled extension) is in the availability reasons


def make_backend() -> Backend:
    return Backend(
        "xformers",
        {"attention": XformersAttention(), "rope": XformersRope(), "norm": XformersNorm(), "mlp": XformersMLP(),
         "cache": XformersCache()},
        description=_description(),
        priority=10,
        availability=_availability,
        note=_note,
    )


BACKEND = make_backend()
