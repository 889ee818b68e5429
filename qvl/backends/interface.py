"""The operator interface every backend implements.

Seven operators, one signature each. The model calls them through `qvl.backends.Ops` and never knows
which backend runs them. Layouts are token-major, as the projections produce them:

    q: (B, Lq, Hq, D)    k, v: (B, Lk, Hkv, D)    Hq % Hkv == 0 (GQA; K/V are never repeated)

attention(q, k, v, mask, scale, weights=False) -> (B, Lq, Hq, D)
    softmax(q k^T * scale + mask) v, with `mask` one of the structured masks below. With weights=True (a call
    described so; only backends declaring `OpImpl.returns_weights`): (output, softmax weights (B, Hq, Lq, Lk)).
rope(q, k, positions, rotary) -> (q', k')
    Rotary embedding with several position streams (M-RoPE): see `Rotary`.
norm(x, weight, eps, residual=None, bias=None) -> y | (y, x + residual)
    Over the last dim, in float32, y in promote_types(weight.dtype, x.dtype). The bias chooses the kind:
    bias None:   RMSNorm (the decoder, Qwen2.5-VL's vision tower):
                 y = weight * (x / sqrt(mean(x^2) + eps)).to(x.dtype)
    bias given:  LayerNorm (Qwen2-VL's vision tower, torch's F.layer_norm), one rounding at the end:
                 y = ((x - mean(x)) / sqrt(var(x) + eps) * weight + bias).to(y's dtype)   (var: biased)
    With `residual`, first s = x + residual (in x.dtype), then y = norm(s); returns (y, s).
mlp(x, w_in, b_in, w_out, b_out, activation) -> (..., H_out)
    activation "swiglu":     w_in stacks [gate; up] (2I, H);  out = (silu(x Wg^T) * (x Wu^T)) Wo^T + b_out.
    activation "gelu":       w_in is (I, H);  out = gelu(x Wi^T + b_in) Wo^T + b_out  (erf GELU).
    activation "quick_gelu": w_in is (I, H);  out = quick_gelu(x Wi^T + b_in) Wo^T + b_out, with
                             quick_gelu(h) = h * sigmoid(1.702 h)  (Qwen2-VL's vision blocks).
cache(q, k, v, positions, rotary, k_cache, v_cache, start) -> q'
    Rotate q and k, write rotated k and v into the static cache at [:, start:start + L]; return rotated q.
    Caches are (B, max_len, Hkv, D).
loss(hidden, weight, targets, divisor=None) -> (loss, logits | None)
    The LM head fused with cross-entropy: logits = hidden weight^T (N, V) in hidden's dtype, then
    loss = sum over counted tokens of -log_softmax(float32(logits))[target] / divisor, where targets (N,) hold
    a vocabulary id or IGNORE_INDEX (not counted), and divisor is the count of counted tokens when None (a
    mean; a sum over nothing divided by no count is 0, not NaN). The loss is a 0-dim float32 tensor. A backend
    may return the logits it made, or None when they never existed in full (a chunked kernel).
linear(x, weight, bias=None) -> (..., N)
    x weight^T + bias, as F.linear: x (..., K), weight (N, K) as nn.Linear stores it, bias (N,) or None, all in
    one dtype; the product accumulated in float32 (float64 stays) and rounded once to x's dtype. Every
    projection outside the MLP: the decoder's qkv and o_proj, the LM head's logits, the vision tower's patch
    embedding, qkv and proj. At decode they read about a fifth of the 3b model's weight bytes (the MLP the rest).

Gradients. Every operator is differentiable through its outputs on the backends that declare
`OpImpl.backward`; a call made with autograd recording and an input that requires grad is described with
`grad=True`, and backends without a backward refuse it with the reason "no backward" (or the registry's
fallback takes it). The cache operator's writes into the static cache are not differentiated.

Lengths on the device. A decode step replayed from a CUDA graph cannot take the cache length as a Python
number: `start` may be a 0-dim integer tensor, and attention may run over the whole static cache with
`CausalMask.kv_len` (a 0-dim tensor) saying how many keys are there. Backends declare whether they accept
this (`OpImpl.device_lengths`); values held on the device are not range-checked (that would synchronize).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

OPERATORS: tuple[str, ...] = ("attention", "rope", "norm", "mlp", "cache", "loss", "linear")
ACTIVATIONS: tuple[str, ...] = ("swiglu", "gelu", "quick_gelu")
# The slope of QuickGELU, x * sigmoid(QUICK_GELU_SLOPE * x): a sigmoid approximation of GELU.
QUICK_GELU_SLOPE = 1.702
# A target the loss does not count: transformers' and torch's ignore_index (prompt tokens, padding, images).
IGNORE_INDEX = -100


@dataclass(frozen=True, eq=False)
class CausalMask:
    """Causal attention aligned to the bottom right, with optional left padding.

    Query i of Lq sits at key position Lk - Lq + i and sees keys j with pad[b] <= j <= Lk - Lq + i.
    `pad` (B,) integer counts the padding tokens at the left of each sequence (None: no padding); a value
    below 0 means none, one past the keys hides them all. Query rows that see no key produce zeros.
    `kv_len` (a 0-dim integer tensor on the device, or None): how many of the Lk keys are present, when k and
    v are a whole static cache whose later slots are not written yet; it then takes Lk's place above
    (query i at kv_len - Lq + i) and keys at or past it are never seen. Clamped to Lk.
    Neither is range-checked: their values stay on the device (reading them would synchronize).
    """

    pad: torch.Tensor | None = None
    kv_len: torch.Tensor | None = None
    kind: str = field(default="causal", init=False)

    def dense(self, batch: int, lq: int, lk: int, device=None) -> torch.Tensor:
        """(B, Lq, Lk) boolean: True where attention is allowed. The eager backend's mask."""
        present = lk if self.kv_len is None else self.kv_len.to(device).clamp(max=lk)
        qpos = torch.arange(lq, device=device)[:, None] + (present - lq)
        kpos = torch.arange(lk, device=device)[None, :]
        allowed = (kpos <= qpos).expand(batch, lq, lk)
        if self.pad is not None:
            allowed = allowed & (kpos[None] >= self.pad.to(device).view(-1, 1, 1))
        return allowed


@dataclass(frozen=True, eq=False)
class BlockDiagonalMask:
    """Non-causal attention inside segments of one packed sequence (B == 1).

    Segment s covers tokens cu_seqlens[s]:cu_seqlens[s+1]; these are the vision tower's windows (or whole
    frames in its full-attention layers): one call covers all of them. The lengths are kept twice: on the
    device for kernels, and on the host for everything the host needs (input checks, grid sizes, xformers'
    bias), so no call reads cu_seqlens back: on a GPU each such read would wait for all queued work, once
    per vision block.
    """

    cu_seqlens: torch.Tensor  # (S + 1,) int32 on the device, starts at 0
    seqlens: tuple[int, ...]  # the same segment lengths, on the host
    kind: str = field(default="block_diagonal", init=False)

    @staticmethod
    def from_seqlens(seqlens: list[int], device=None) -> BlockDiagonalMask:
        seqlens = tuple(int(n) for n in seqlens)
        if any(n < 0 for n in seqlens):
            raise ValueError(f"BlockDiagonalMask: segment lengths must be >= 0, got {list(seqlens)}")
        cu = torch.tensor([0, *seqlens], dtype=torch.int64).cumsum(0).to(device=device, dtype=torch.int32)
        return BlockDiagonalMask(cu, seqlens)

    @functools.cached_property
    def max_seqlen(self) -> int:
        return max(self.seqlens, default=0)

    @functools.cached_property
    def num_tokens(self) -> int:
        return sum(self.seqlens)

    def dense(self, batch: int, lq: int, lk: int, device=None) -> torch.Tensor:
        seg = torch.bucketize(torch.arange(lk, device=device), self.cu_seqlens.to(device).long(), right=True)
        return (seg[:, None] == seg[None, :]).expand(batch, lq, lk)


AttentionMask = CausalMask | BlockDiagonalMask


@dataclass(frozen=True, eq=False)
class Rotary:
    """Rotary embedding over several position streams.

    `inv_freq` (D/2,) float32 holds the frequency of each rotated pair; `sections` says how many consecutive
    pairs each stream owns, in order, so pair j is rotated by angle positions[stream(j)] * inv_freq[j]:

        text M-RoPE:   streams (t, h, w), sections e.g. (16, 24, 24), inv_freq = theta^(-2j/D)
        vision 2-D:    streams (h, w),    sections (D/4, D/4), inv_freq restarts per stream

    Pair j couples dims j and j + D/2 (rotate-half convention):
        x'[j]       = x[j] cos - x[j + D/2] sin
        x'[j + D/2] = x[j + D/2] cos + x[j] sin
    `uniform_streams` is True when the caller knows all streams hold the same positions (plain text),
    which lets 1-D rotary kernels apply.
    """

    inv_freq: torch.Tensor
    sections: tuple[int, ...]
    uniform_streams: bool = False
    # (D/2,) int32 on inv_freq's device: the position stream each rotated pair follows. Built with the Rotary,
    # so no layer copies host data to the device (on a GPU such a copy waits for all queued work).
    stream_of_pair: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self):
        table = torch.repeat_interleave(torch.arange(len(self.sections)), torch.tensor(self.sections))
        object.__setattr__(self, "stream_of_pair", table.to(device=self.inv_freq.device, dtype=torch.int32))


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Autograd records this call and one of the tensors requires grad: the call needs a backward."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def check_device_scalar(where: str, name: str, value: torch.Tensor, device: torch.device) -> None:
    """A length read from device memory (for CUDA-graph capture) must be one integer on `device`."""
    if value.dim() != 0 or not is_integer(value) or value.device != device:
        raise ValueError(f"{where}: {name} must be a 0-dim integer tensor on {device}; got "
                         f"{tuple(value.shape)} {value.dtype} on {value.device}")


def check_pad(where: str, name: str, pad: torch.Tensor, batch: int) -> None:
    """Left padding per sequence: a (batch,) integer tensor. Its values are not read (that would synchronize
    with the device); backends clamp them to [0, number of keys], which is what the mask means for any value."""
    if tuple(pad.shape) != (batch,) or not is_integer(pad):
        raise ValueError(f"{where}: {name} must be a ({batch},) integer tensor, got {tuple(pad.shape)} {pad.dtype}")


def is_integer(t: torch.Tensor) -> bool:
    return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


def check_attention_inputs(q, k, v, mask) -> None:
    """Caller mistakes (shapes, devices, dtypes): ValueError, kept apart from backend support."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention: q, k, v must be (B, L, H, D); got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"attention: k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"attention: batch or head dim of q {tuple(q.shape)} and k {tuple(k.shape)} differ")
    if k.shape[2] == 0 or q.shape[2] % k.shape[2]:
        raise ValueError(f"attention: {q.shape[2]} query heads is not a multiple of {k.shape[2]} kv heads")
    if not (q.device == k.device == v.device) or not (q.dtype == k.dtype == v.dtype):
        raise ValueError("attention: q, k, v must share device and dtype")
    if isinstance(mask, BlockDiagonalMask):
        if q.shape[0] != 1 or q.shape[1] != k.shape[1]:
            raise ValueError("attention: a BlockDiagonalMask needs B == 1 and Lq == Lk (one packed sequence)")
        if mask.num_tokens != q.shape[1]:
            raise ValueError(f"attention: the mask's segments hold {mask.num_tokens} tokens, but the sequence has "
                             f"{q.shape[1]}")
        cu_seqlens = mask.cu_seqlens
        if tuple(cu_seqlens.shape) != (len(mask.seqlens) + 1,) or not is_integer(cu_seqlens):
            raise ValueError(f"attention: BlockDiagonalMask.cu_seqlens must be (S + 1,) = ({len(mask.seqlens) + 1},) "
                             f"integer, got {tuple(cu_seqlens.shape)} {cu_seqlens.dtype}")
    elif isinstance(mask, CausalMask):
        if q.shape[1] > k.shape[1]:
            raise ValueError(f"attention: causal attention with more queries ({q.shape[1]}) than keys ({k.shape[1]})")
        if mask.pad is not None:
            check_pad("attention", "CausalMask.pad", mask.pad, q.shape[0])
        if mask.kv_len is not None:
            check_device_scalar("attention", "CausalMask.kv_len", mask.kv_len, q.device)
    else:
        raise ValueError(f"attention: mask must be a CausalMask or BlockDiagonalMask, got {type(mask).__name__}")


def check_rope_inputs(q, k, positions, rotary) -> None:
    if q.dim() != 4 or k.dim() != 4 or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"rope: q {tuple(q.shape)} and k {tuple(k.shape)} must be (B, L, H, D) with equal B, L, D")
    d = q.shape[3]
    if d % 2 or sum(rotary.sections) * 2 != d or rotary.inv_freq.numel() * 2 != d:
        raise ValueError(f"rope: head dim {d} does not match sections {rotary.sections} / inv_freq "
                         f"({rotary.inv_freq.numel()} pairs)")
    if positions.shape != (len(rotary.sections), q.shape[0], q.shape[1]):
        raise ValueError(f"rope: positions must be ({len(rotary.sections)}, B, L) = "
                         f"({len(rotary.sections)}, {q.shape[0]}, {q.shape[1]}); got {tuple(positions.shape)}")
    if not is_integer(positions):
        raise ValueError(f"rope: positions must be an integer tensor, got {positions.dtype}")
    if q.dtype != k.dtype:
        raise ValueError(f"rope: q and k dtypes differ: {q.dtype} vs {k.dtype}")
    if len({t.device for t in (q, k, positions, rotary.inv_freq, rotary.stream_of_pair)}) != 1:
        raise ValueError("rope: q, k, positions and the rotary's inv_freq must be on one device")


def check_norm_inputs(x, weight, residual, bias=None) -> None:
    if weight.dim() != 1 or x.shape[-1] != weight.shape[0]:
        raise ValueError(f"norm: weight {tuple(weight.shape)} does not match hidden size {x.shape[-1]}")
    if weight.device != x.device:
        raise ValueError(f"norm: weight on {weight.device}, x on {x.device}")
    if bias is not None and (bias.shape != weight.shape or bias.dtype != weight.dtype):
        raise ValueError(f"norm: bias {tuple(bias.shape)} {bias.dtype} must match weight {tuple(weight.shape)} "
                         f"{weight.dtype}")
    if bias is not None and bias.device != x.device:
        raise ValueError(f"norm: bias on {bias.device}, x on {x.device}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"norm: residual {tuple(residual.shape)} {residual.dtype} and x {tuple(x.shape)} {x.dtype} "
                         "differ (the sum is kept in x's dtype)")
    if residual is not None and residual.device != x.device:
        raise ValueError(f"norm: residual on {residual.device}, x on {x.device}")


def check_mlp_inputs(x, w_in, w_out, activation, b_in=None, b_out=None) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"mlp: unknown activation {activation!r}; valid options are {', '.join(ACTIVATIONS)}")
    if x.dim() == 0 or w_in.dim() != 2 or w_out.dim() != 2:
        raise ValueError(f"mlp: x (..., H), w_in and w_out (N, K) expected; got {tuple(x.shape)}, "
                         f"{tuple(w_in.shape)}, {tuple(w_out.shape)}")
    if w_in.shape[1] != x.shape[-1]:
        raise ValueError(f"mlp: w_in {tuple(w_in.shape)} does not take hidden size {x.shape[-1]}")
    if activation == "swiglu" and w_in.shape[0] % 2:
        raise ValueError(f"mlp: swiglu needs w_in = [W_gate; W_up] with an even row count, got {tuple(w_in.shape)}")
    inner = w_in.shape[0] // 2 if activation == "swiglu" else w_in.shape[0]
    if w_out.shape[1] != inner:
        raise ValueError(f"mlp: w_out {tuple(w_out.shape)} does not match w_in {tuple(w_in.shape)} for {activation}")
    for name, b, w in (("b_in", b_in, w_in), ("b_out", b_out, w_out)):
        if b is not None and tuple(b.shape) != (w.shape[0],):
            raise ValueError(f"mlp: {name} {tuple(b.shape)} must be ({w.shape[0]},)")
    dtypes = [t.dtype for t in (x, w_in, w_out, b_in, b_out) if t is not None]
    if len(set(dtypes)) != 1:
        raise ValueError(f"mlp: x, w_in, w_out (and the biases) must share a dtype; got "
                         f"{', '.join(str(d) for d in dtypes)}")


def check_cache_inputs(q, k, v, positions, rotary, k_cache, v_cache, start) -> None:
    check_rope_inputs(q, k, positions, rotary)
    if k.shape != v.shape:
        raise ValueError(f"cache: k {tuple(k.shape)} and v {tuple(v.shape)} differ")
    if k_cache.shape != v_cache.shape or k_cache.shape[0] != k.shape[0] or k_cache.shape[2:] != k.shape[2:]:
        raise ValueError(f"cache: cache {tuple(k_cache.shape)} does not hold k {tuple(k.shape)}")
    if not (k.dtype == v.dtype == k_cache.dtype == v_cache.dtype):
        raise ValueError(f"cache: k, v and the caches must share a dtype; got {k.dtype}, {v.dtype}, "
                         f"{k_cache.dtype}, {v_cache.dtype}")
    if len({t.device for t in (q, v, k_cache, v_cache)}) != 1:
        raise ValueError("cache: q, k, v and the caches must be on one device")
    if isinstance(start, torch.Tensor):
        check_device_scalar("cache", "start", start, k_cache.device)
    elif not 0 <= start <= k_cache.shape[1] - k.shape[1]:
        raise ValueError(f"cache: writing {k.shape[1]} tokens at {start} overflows the cache of "
                         f"{k_cache.shape[1]} positions; build the cache with a larger max_len")



def check_linear_inputs(x, weight, bias) -> None:
    if x.dim() == 0 or weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear: x (..., K) and weight (N, K) expected; got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"linear: bias {tuple(bias.shape)} must be ({weight.shape[0]},)")
    if x.dtype != weight.dtype or (bias is not None and bias.dtype != x.dtype):
        raise ValueError(f"linear: x, weight (and bias) must share a dtype; got {x.dtype}, {weight.dtype}"
                         + ("" if bias is None else f", {bias.dtype}"))
    if weight.device != x.device or (bias is not None and bias.device != x.device):
        raise ValueError("linear: x, weight and bias must be on one device")


def check_loss_inputs(hidden, weight, targets, divisor) -> None:
    """Shapes, dtypes and devices; the target values are the caller's to check (reading them synchronizes)."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"loss: hidden (N, H) and weight (V, H) expected; got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if tuple(targets.shape) != (hidden.shape[0],) or not is_integer(targets):
        raise ValueError(f"loss: targets must be a ({hidden.shape[0]},) integer tensor, got {tuple(targets.shape)} "
                         f"{targets.dtype}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"loss: hidden and weight dtypes differ: {hidden.dtype} vs {weight.dtype}")
    if len({t.device for t in (hidden, weight, targets)}) != 1:
        raise ValueError("loss: hidden, weight and targets must be on one device")
    if isinstance(divisor, torch.Tensor):
        if divisor.numel() != 1:
            raise ValueError(f"loss: divisor must be a number or a one-element tensor, got {tuple(divisor.shape)}")
    elif divisor is not None and not divisor > 0:
        raise ValueError(f"loss: divisor must be > 0, got {divisor}")


def divide_loss(total: torch.Tensor, targets: torch.Tensor, divisor) -> torch.Tensor:
    """The summed loss `total` over `divisor`, or over the count of counted targets when None (a batch with none
    counted gives 0, not 0 / 0)."""
    if divisor is None:
        divisor = (targets != IGNORE_INDEX).sum().clamp(min=1)
    elif isinstance(divisor, torch.Tensor):
        divisor = divisor.reshape(()).to(device=total.device, dtype=total.dtype)
    return total / divisor
