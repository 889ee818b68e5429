"""Operator registry: one interface per operator, interchangeable backends chosen at runtime.

See `interface` for the operator signatures and `registry` for selection rules. Adding a backend:
write `OpImpl` subclasses, wrap them in a `Backend`, and `register_backend` it (or `register_lazy_backend`
for one that imports optional packages).
"""

from . import eager
from .interface import IGNORE_INDEX, OPERATORS, BlockDiagonalMask, CausalMask, Rotary
from .ops import Ops
from .registry import (
    ENV_VAR,
    Backend,
    BackendPlan,
    BackendUnsupportedError,
    CallInfo,
    Fallback,
    OpImpl,
    all_backends,
    availability_table,
    backend_names,
    get_backend,
    parse_spec,
    register_backend,
    register_lazy_backend,
    resolve_plan,
    use_backends,
)

register_backend(eager.BACKEND)
# Optional backends import their packages only when first asked for; a failure becomes a reason.
register_lazy_backend("triton", "qvl.backends.triton", priority=20)
register_lazy_backend("xformers", "qvl.backends.xformers", priority=10)
register_lazy_backend("triton-gemm", "qvl.backends.triton_gemm", priority=15)

__all__ = [
    "IGNORE_INDEX", "OPERATORS", "BlockDiagonalMask", "CausalMask", "Rotary", "Ops", "ENV_VAR", "Backend",
    "BackendPlan",
    "BackendUnsupportedError", "CallInfo", "Fallback", "OpImpl", "all_backends", "availability_table",
    "backend_names", "get_backend", "parse_spec", "register_backend", "register_lazy_backend", "resolve_plan",
    "use_backends",
]
