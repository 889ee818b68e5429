"""The `xformers` backend: xFormers' operators behind the operator interface, where xFormers has one.

    attention  memory_efficient_attention_forward, masks as xFormers' bias objects      (attention.py)
    norm       rms_norm, rms_norm_add for the fused residual add                        (norm.py)
    mlp        swiglu on the packed [gate; up] weight; GELU unsupported                 (mlp.py)
    linear     torch matmul: xFormers has no projection operator                        (mlp.py)
    rope       rope_padded where one position per token applies (uniform M-RoPE)        (rope.py)
    cache      rope_padded writing roped K and V into the cache in the same launch      (rope.py)

What of xFormers is installed and runs here, and why not, is worked out once in installed.py (`installed.STATUS`,
`installed.XF`); layout.py addresses a batch's rows as one packed sequence. Only xFormers' public API is used,
except for the reason its compiled extension did not load (`installed.extension_problem`).
Registered lazily (qvl/backends/__init__.py): importing this package defines `BACKEND`.
"""

from __future__ import annotations

from ..registry import Backend
from . import installed
from .attention import AttentionCall, XformersAttention, forward_ops, prepare_attention, probe_attention
from .mlp import GELU_REASON, XformersLinear, XformersMLP, swiglu_op_name
from .norm import XformersNorm
from .rope import NON_UNIFORM_REASON, XformersCache, XformersRope, rope_theta

__all__ = [
    "BACKEND", "GELU_REASON", "NON_UNIFORM_REASON", "AttentionCall", "XformersAttention", "XformersCache",
    "XformersLinear", "XformersMLP", "XformersNorm", "XformersRope", "forward_ops", "installed", "make_backend",
    "prepare_attention", "probe_attention", "rope_theta", "swiglu_op_name",
]


def _description() -> str:
    """What runs on what; why something is off (e.g. the compiled extension) is in the availability reasons."""
    if installed.XF is None:
        return "xFormers operators (not installed)"
    swiglu = swiglu_op_name()
    return (f"xFormers {installed.STATUS.version}: memory_efficient_attention, rms_norm/rms_norm_add, rope_padded "
            f"(RoPE + cache write), torch matmul (projections), swiglu (dispatched to xFormers' '{swiglu}' SwiGLU op"
            + (": F.linear + silu, this release has no fused SwiGLU kernel)" if swiglu == "eager" else ")"))


def make_backend() -> Backend:
    return Backend(
        "xformers",
        {"attention": XformersAttention(), "rope": XformersRope(), "norm": XformersNorm(), "mlp": XformersMLP(),
         "cache": XformersCache(), "linear": XformersLinear()},
        description=_description(),
        priority=10,
        availability=installed.availability,
        note=installed.note,
    )


BACKEND = make_backend()
