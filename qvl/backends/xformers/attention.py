"""attention -> xformers.ops.memory_efficient_attention_forward, one call per operator call.

qvl's masks become xFormers' layouts and bias objects (`prepare_attention`):
- BlockDiagonalMask (vision windows, full-attention frames): xFormers' BlockDiagonalMask built from the segment
  lengths, so all windows go in one call;
- causal without padding (prefill, or decode against a cache slice): the batch as it is, with
  LowerTriangularFromBottomRightMask (bottom-right aligned like qvl's CausalMask);
- causal with left padding (prefill or decode): the batch packed into one sequence, queries in blocks of Lq,
  keys read in place through a strided view of the rows (the cache is never copied), as a
  BlockDiagonalCausalWithOffsetGappyKeysMask whose key block b starts after row b's padding. Query rows that
  see no key are zeroed explicitly.
GQA uses xFormers' 5-D layout (B, M, G, H, K): K/V expanded over H with stride 0, not copied.

Per-call kernel support (dtype, head dim, bias type) is asked of xFormers' forward kernels through their public
`not_supported_reasons(Inputs)`, on a tiny probe in the exact layout and bias type the call would use
(`probe_attention`): e.g. float32 with padding has no kernel (only flash takes gappy keys, and flash has no
float32).
"""

from __future__ import annotations

import functools
import logging
import weakref
from dataclasses import dataclass

import torch

from ..interface import BlockDiagonalMask, CausalMask, needs_grad
from ..registry import BackendUnsupportedError, CallInfo
from . import installed, layout
from .base import XformersOp

NO_KERNEL = "memory_efficient_attention has no kernel for these inputs: "
NO_BACKWARD_KERNEL = "no backward: memory_efficient_attention has no backward kernel for these inputs: "


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
            if out.requires_grad:  # autograd keeps the kernel's output for its backward: not in place
                return out.masked_fill(self.empty_rows[:, :, None, None], 0)
            out.masked_fill_(self.empty_rows[:, :, None, None], 0)  # out is the kernel's fresh output
        return out


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
_BIASES: weakref.WeakKeyDictionary[object, dict] = weakref.WeakKeyDictionary()


def _cached(mask, key, build):
    per_mask = _BIASES.setdefault(mask, {})
    if key not in per_mask:
        per_mask[key] = build()
    return per_mask[key]


def _block_diagonal_bias(mask: BlockDiagonalMask, device: torch.device):
    return installed.XF.attn_bias.BlockDiagonalMask.from_seqlens(list(mask.seqlens), device=device)


def _gappy_causal_bias(pad: list[int], lq: int, lk: int, pitch: int, device: torch.device):
    """Row b: queries [b*Lq, (b+1)*Lq); keys [b*pitch + pad_b, b*pitch + Lk), bottom-right causal inside.
    pad values within [0, Lk]."""
    batch = len(pad)
    starts = [b * pitch + p for b, p in enumerate(pad)]
    lens = [lk - p for p in pad]
    total = (batch - 1) * pitch + lk
    return installed.XF.attn_bias.BlockDiagonalCausalWithOffsetGappyKeysMask.from_seqlens(
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
        bias = installed.XF.attn_bias.LowerTriangularFromBottomRightMask()
        return AttentionCall(*_gqa_layout(q, k, v), bias, out_shape)

    # Left padding: pack the batch into one sequence; keys stay in place, read through a strided view.
    pitch = layout.same_rows(k, v)
    if pitch is None:
        k, v = k.contiguous(), v.contiguous()  # unusual strides only; the model's K/V never get here
        pitch = lk
    total = (b - 1) * pitch + lk
    kp, vp = layout.packed(k, pitch, total), layout.packed(v, pitch, total)
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
    """xFormers' forward-only entry point for inference; its autograd one when gradients are needed."""
    ops = installed.XF.ops
    grad = needs_grad(call.query, call.key, call.value)
    attend = ops.memory_efficient_attention if grad else ops.memory_efficient_attention_forward
    try:
        out = attend(call.query, call.key, call.value, attn_bias=call.bias, scale=scale)
    except NotImplementedError as e:  # no kernel for these exact inputs (the support probe missed it)
        raise BackendUnsupportedError(f"attention: {_dispatch_summary(str(e))}") from e
    return call.finish(out)


def _dispatch_summary(message: str) -> str:
    """xFormers' 'No operator found' message without the inputs dump, on one line."""
    kernels = message[message.find("`", message.find("\n")):] if "\n`" in message else message
    return NO_KERNEL + installed.one_line(kernels)


# --- the support probe: xFormers' forward kernels asked through their public not_supported_reasons ------------


def forward_ops(kind: str = "FwOp") -> list[type]:
    """The forward kernel classes memory_efficient_attention_forward chooses among, in its order of preference:
    flash3, flash, cutlass with a CUDA build of torch, ck otherwise (ROCm); with kind="BwOp" the backward kernel
    classes memory_efficient_attention's autograd chooses among, in the same order. A class the installed
    release lacks is left out.

    (For GQA decode with long keys xFormers also tries its split-KV Triton kernel first; the probe never has
    that shape, and flash and cutlass stay on the list there too.)
    """
    fmha = installed.XF.fmha
    names = ("flash3", "flash", "cutlass") if torch.version.cuda else ("ck",)
    found = (getattr(getattr(fmha, name, None), kind, None) for name in names)
    return [op for op in found if op is not None]


def _refusals_summary(refusals: list[tuple[type, list[str]]], what: str = NO_KERNEL) -> str:
    """One line naming each kernel and its reasons."""
    return what + " | ".join(
        f"`{getattr(op, 'NAME', op.__name__)}` is not supported because: "
        + "; ".join(installed.one_line(r) for r in reasons) for op, reasons in refusals)


def _probe_mask(call: CallInfo, device) -> object:
    if call.get("mask") == "block_diagonal":
        return BlockDiagonalMask.from_seqlens([2, 2], device=device)
    return CausalMask(torch.tensor([1, 0], device=device) if call.get("padded") else None)


@functools.cache
def probe_attention(call: CallInfo) -> tuple[str, ...]:
    """Whether a forward kernel of xFormers takes this kind of call (and, for a call that needs gradients, a
    backward kernel too), asked with tiny tensors on the device in the exact layout and bias type
    `prepare_attention` would produce: () when one does, else the one-line summary of every kernel's reasons."""
    try:
        device = torch.device(call.device)
        mask = _probe_mask(call, device)
        batch = 1 if isinstance(mask, BlockDiagonalMask) else 2
        d, group = int(call.get("head_dim")), int(call.get("gqa") or 1)
        q = torch.zeros(batch, 4, group, d, device=device, dtype=call.dtype)
        kv = torch.zeros(batch, 4, 1, d, device=device, dtype=call.dtype)
        probe = prepare_attention(q, kv, kv, mask)
        inputs = installed.XF.fmha.Inputs(query=probe.query, key=probe.key, value=probe.value,
                                          attn_bias=probe.bias, p=0.0, scale=d**-0.5)
        inputs.validate_inputs()
        refusals = [(op, list(op.not_supported_reasons(inputs))) for op in forward_ops()]
        backward = [(op, list(op.not_supported_reasons(inputs))) for op in forward_ops("BwOp")] if call.get(
            "grad") else []
    except Exception as e:  # the probe itself broke (xFormers API moved?): let the real call decide
        logging.getLogger("qvl.backends").debug("xformers attention probe failed: %s", e)
        return ()
    if refusals and all(reasons for _, reasons in refusals):
        return (_refusals_summary(refusals),)
    if backward and all(reasons for _, reasons in backward):
        return (_refusals_summary(backward, NO_BACKWARD_KERNEL),)
    return ()


class XformersAttention(XformersOp):
    operator = "attention"
    masks = frozenset({"causal", "block_diagonal"})
    backward = True  # memory_efficient_attention's own backward kernels

    def not_supported_reasons(self, call: CallInfo) -> list[str]:
        reasons = super().not_supported_reasons(call)
        status = installed.STATUS
        if reasons or status.cuda:
            return reasons
        if status.extension:  # xFormers' fmha refuses CUDA inputs when its build metadata did not load
            return [f"memory_efficient_attention needs the compiled extension: {status.extension}"]
        return list(probe_attention(call))

    def __call__(self, q, k, v, mask, scale):
        return memory_efficient_attention(prepare_attention(q, k, v, mask), scale)
