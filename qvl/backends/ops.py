"""`Ops`: the typed entry point the model calls. Validates inputs, describes the call, dispatches."""

from __future__ import annotations

import torch

from . import interface as I
from .registry import BackendPlan, CallInfo, Dispatcher, Fallback


class Ops:
    """Operator calls under one resolved `BackendPlan`.

    Each method checks the caller's inputs (ValueError on mistakes), builds the `CallInfo` backends judge
    support by, and runs the selected implementation.
    """

    def __init__(self, plan: BackendPlan):
        self.plan = plan
        self._dispatch = Dispatcher(plan)

    @property
    def fallbacks(self) -> list[Fallback]:
        return self._dispatch.fallbacks

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: I.AttentionMask,
                  scale: float | None = None, weights: bool = False):
        """The attention output; with `weights`, (output, softmax weights (B, Hq, Lq, Lk) in q's dtype), from
        backends that form them (the call is described with weights=True)."""
        I.check_attention_inputs(q, k, v, mask)
        call = CallInfo.of("attention", q, head_dim=q.shape[-1], mask=mask.kind, gqa=q.shape[2] // k.shape[2],
                           padded=getattr(mask, "pad", None) is not None,
                           **_device_lengths(getattr(mask, "kv_len", None) is not None), **_grad(q, k, v),
                           **({"weights": True} if weights else {}))
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        if weights:
            return self._dispatch.select(call)(q, k, v, mask, scale, weights=True)
        return self._dispatch.select(call)(q, k, v, mask, scale)

    def rope(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, rotary: I.Rotary):
        I.check_rope_inputs(q, k, positions, rotary)
        call = CallInfo.of("rope", q, head_dim=q.shape[-1], sections=rotary.sections,
                           uniform_streams=rotary.uniform_streams, **_grad(q, k))
        return self._dispatch.select(call)(q, k, positions, rotary)

    def norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             bias: torch.Tensor | None = None):
        """RMSNorm, or LayerNorm when a bias is given (see qvl.backends.interface)."""
        I.check_norm_inputs(x, weight, residual, bias)
        call = CallInfo.of("norm", x, hidden=x.shape[-1], residual=residual is not None,
                           **({} if bias is None else {"layer_norm": True}),
                           **({} if weight.dtype == x.dtype else {"weight_dtype": weight.dtype}),
                           **_grad(x, weight, residual, bias))
        return self._dispatch.select(call)(x, weight, eps, residual, bias)

    def mlp(self, x: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor | None, w_out: torch.Tensor,
            b_out: torch.Tensor | None, activation: str) -> torch.Tensor:
        I.check_mlp_inputs(x, w_in, w_out, activation, b_in=b_in, b_out=b_out)
        call = CallInfo.of("mlp", x, activation=activation, bias=b_in is not None or b_out is not None,
                           **_grad(x, w_in, b_in, w_out, b_out))
        return self._dispatch.select(call)(x, w_in, b_in, w_out, b_out, activation)

    def cache(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, rotary: I.Rotary,
              k_cache: torch.Tensor, v_cache: torch.Tensor, start: int) -> torch.Tensor:
        I.check_cache_inputs(q, k, v, positions, rotary, k_cache, v_cache, start)
        call = CallInfo.of("cache", q, head_dim=q.shape[-1], sections=rotary.sections,
                           uniform_streams=rotary.uniform_streams, **_device_lengths(isinstance(start, torch.Tensor)),
                           **_grad(q, k, v))
        return self._dispatch.select(call)(q, k, v, positions, rotary, k_cache, v_cache, start)

    def loss(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
             divisor: float | torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        I.check_loss_inputs(hidden, weight, targets, divisor)
        call = CallInfo.of("loss", hidden, vocab=weight.shape[0], **_grad(hidden, weight))
        return self._dispatch.select(call)(hidden, weight, targets, divisor)

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x weight^T + bias: every projection the MLP operator does not hold (see qvl.backends.interface)."""
        I.check_linear_inputs(x, weight, bias)
        call = CallInfo.of("linear", x, **_grad(x, weight, bias))
        return self._dispatch.select(call)(x, weight, bias)


def _grad(*tensors: torch.Tensor | None) -> dict[str, bool]:
    """grad=True when autograd records this call and an input requires grad: it needs a backward. Only when
    set, so inference calls describe themselves as before."""
    return {"grad": True} if I.needs_grad(*tensors) else {}


def _device_lengths(held_on_device: bool) -> dict[str, bool]:
    """The call feature only when set, so ordinary calls describe themselves as before."""
    return {"device_lengths": True} if held_on_device else {}
