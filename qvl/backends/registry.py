"""The backend registry: who implements which operator, what each supports, and which one runs a call.

A backend is a named set of operator implementations. Each implementation states what it supports as
data (devices, dtypes, head dims, mask kinds, ...) and answers a call with the list of reasons it cannot
run it; no reasons means supported. Caller mistakes (bad shapes) are ValueErrors raised before this.

Selection (highest precedence first, merged per operator):
  1. the explicit ``backends=`` argument (``from_pretrained``, ``from_config``, ``model.set_backends``);
  2. the innermost ``qvl.use_backends(...)`` scope active when the plan is resolved;
  3. the ``QVL_BACKENDS`` environment variable, e.g. ``attention=triton,norm=eager`` or ``triton``;
  4. ``eager``.
A spec is a backend name for every operator (``"triton"``), a per-operator string
(``"attention=triton,norm=eager"``), the two combined (``"triton,mlp=triton-gemm"``: every operator on triton
but the MLP) or a mapping (``{"attention": "triton"}``). The name ``auto`` walks the
backends by priority and takes the first that supports each call.

An explicit choice that cannot run a call raises `BackendUnsupportedError` naming the operator, the backend
and the reasons, unless the plan has a fallback (``fallback="eager"``): then the call runs on the fallback
and the event is recorded in ``Ops.fallbacks`` so reports can show it.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..dtypes import FLOAT_DTYPES, dtype_name
from ..errors import ConfigError
from .interface import OPERATORS

log = logging.getLogger("qvl.backends")

ENV_VAR = "QVL_BACKENDS"
AUTO = "auto"
DEFAULT_BACKEND = "eager"


# The reason a backend gives for a call that needs gradients it cannot compute.
NO_BACKWARD = "no backward (this call needs gradients)"
# The reason an attention backend gives when asked for its weights (output_attentions) and it never forms them.
NO_WEIGHTS = "cannot return the attention weights (its kernels never form the score matrix)"


class BackendUnsupportedError(RuntimeError):
    """A chosen backend cannot run a call (and no fallback was allowed)."""


@dataclass(frozen=True)
class CallInfo:
    """What a backend needs to know about a call to decide support. Hashable, so decisions are cached."""

    operator: str
    device: str
    dtype: torch.dtype
    features: tuple[tuple[str, Any], ...] = ()

    @staticmethod
    def of(operator: str, tensor: torch.Tensor, **features: Any) -> CallInfo:
        return CallInfo(operator, tensor.device.type, tensor.dtype, tuple(sorted(features.items())))

    def get(self, name: str, default: Any = None) -> Any:
        return dict(self.features).get(name, default)

    def describe(self) -> str:
        dtype = dtype_name(self.dtype)
        return ", ".join([self.device, dtype] + [f"{k}={v}" for k, v in self.features])


class OpImpl:
    """One backend's implementation of one operator. Subclasses set the class data and `__call__`."""

    operator: ClassVar[str]
    devices: ClassVar[frozenset[str]] = frozenset({"cpu", "cuda"})
    dtypes: ClassVar[frozenset[torch.dtype]] = FLOAT_DTYPES
    head_dims: ClassVar[Callable[[int], bool] | None] = None  # predicate over head_dim, None: any
    head_dims_text: ClassVar[str] = ""
    masks: ClassVar[frozenset[str] | None] = None  # attention mask kinds
    activations: ClassVar[frozenset[str] | None] = None  # mlp activations
    # accepts lengths held on the device (CausalMask.kv_len, a tensor cache start): see qvl.backends.interface
    device_lengths: ClassVar[bool] = False
    # its outputs carry gradients to every input that requires them (calls described with grad=True)
    backward: ClassVar[bool] = False
    # attention only: can also return the softmax weights (calls described with weights=True)
    returns_weights: ClassVar[bool] = False

    def not_supported_reasons(self, call: CallInfo) -> list[str]:
        reasons = []
        if call.device not in self.devices:
            reasons.append(f"device {call.device} not supported (supports {', '.join(sorted(self.devices))})")
        names = ", ".join(sorted(dtype_name(d) for d in self.dtypes))
        if call.dtype not in self.dtypes:
            reasons.append(f"dtype {dtype_name(call.dtype)} not supported (supports {names})")
        weight_dtype = call.get("weight_dtype")  # a norm weight in another dtype than x (x's is the default)
        if weight_dtype is not None and weight_dtype not in self.dtypes:
            reasons.append(f"weight dtype {dtype_name(weight_dtype)} not supported (supports {names})")
        head_dim = call.get("head_dim")
        if self.head_dims is not None and head_dim is not None and not self.head_dims(head_dim):
            reasons.append(f"head dim {head_dim} not supported ({self.head_dims_text})")
        mask = call.get("mask")
        if self.masks is not None and mask is not None and mask not in self.masks:
            reasons.append(f"mask kind {mask} not supported (supports {', '.join(sorted(self.masks))})")
        act = call.get("activation")
        if self.activations is not None and act is not None and act not in self.activations:
            reasons.append(f"activation {act} not supported (supports {', '.join(sorted(self.activations))})")
        if call.get("device_lengths") and not self.device_lengths:
            reasons.append("lengths held on the device (a decode step for CUDA-graph capture) not supported")
        if call.get("grad") and not self.backward:
            reasons.append(NO_BACKWARD)
        if call.get("weights") and not self.returns_weights:
            reasons.append(NO_WEIGHTS)
        return reasons

    def __call__(self, *args, **kwargs):  # pragma: no cover - interface
        raise NotImplementedError


class Backend:
    """A named set of operator implementations plus a backend-wide availability check."""

    def __init__(self, name: str, impls: dict[str, OpImpl], *, description: str = "", priority: int = 0,
                 availability: Callable[[], list[str]] | None = None, note: Callable[[], str] | None = None):
        unknown = set(impls) - set(OPERATORS)
        if unknown:
            raise ValueError(f"backend {name!r} registers unknown operators {sorted(unknown)}; "
                             f"valid options are {', '.join(OPERATORS)}")
        self.name, self.impls, self.description, self.priority = name, impls, description, priority
        self._availability, self._note = availability, note
        self._unavailable: list[str] | None = None

    @property
    def covers_all_operators(self) -> bool:
        """Implements every operator (a partial backend, e.g. triton-gemm, only overrides some)."""
        return set(OPERATORS) <= set(self.impls)

    def unavailable_reasons(self) -> list[str]:
        """Reasons the whole backend cannot run on this machine (package missing, no device); cached."""
        if self._unavailable is None:
            try:
                self._unavailable = list(self._availability()) if self._availability else []
            except Exception as e:  # a broken probe must not break the registry
                self._unavailable = [f"availability check failed: {type(e).__name__}: {e}"]
        return self._unavailable

    def note(self) -> str:
        """Extra status for `qvl backends`, e.g. 'interpreted'."""
        return self._note() if self._note and not self.unavailable_reasons() else ""

    def reasons(self, call: CallInfo) -> list[str]:
        reasons = list(self.unavailable_reasons())
        impl = self.impls.get(call.operator)
        if impl is None:
            reasons.append(f"no {call.operator} implementation")
        elif not reasons:
            reasons.extend(impl.not_supported_reasons(call))
        return reasons

    def __repr__(self) -> str:
        return f"Backend({self.name!r}, operators={sorted(self.impls)})"


# --- the registry ------------------------------------------------------------------------------------------------

_BACKENDS: dict[str, Backend] = {}
_LAZY: dict[str, tuple[str, int]] = {}  # name -> (module path, priority); imported on first use


def register_backend(backend: Backend) -> Backend:
    if backend.name == AUTO or backend.name in _BACKENDS:
        raise ValueError(f"backend {backend.name!r} is already registered (or reserved)")
    _BACKENDS[backend.name] = backend
    _LAZY.pop(backend.name, None)
    return backend


def register_lazy_backend(name: str, module: str, priority: int = 0) -> None:
    """Register a backend defined by `module.BACKEND`, imported only when first needed.

    If the import fails (package missing, compiled extension broken), the backend is registered as
    unavailable with the error as its reason: `import qvl` never breaks because of it.
    """
    if name == AUTO or name in _BACKENDS or name in _LAZY:
        raise ValueError(f"backend {name!r} is already registered (or reserved)")
    _LAZY[name] = (module, priority)


def _load_lazy(name: str) -> None:
    module, priority = _LAZY.pop(name)
    try:
        backend = importlib.import_module(module).BACKEND
        if backend.name != name:
            raise ValueError(f"{module}.BACKEND is named {backend.name!r}, expected {name!r}")
    except Exception as e:
        reason = f"could not load {module}: {type(e).__name__}: {e}"
        backend = Backend(name, {}, description=f"failed to load from {module}", priority=priority,
                          availability=lambda: [reason])
    _BACKENDS[name] = backend


def backend_names() -> list[str]:
    return sorted(set(_BACKENDS) | set(_LAZY))


def get_backend(name: str) -> Backend:
    if isinstance(name, str) and name in _LAZY:
        _load_lazy(name)
    if not isinstance(name, str) or name not in _BACKENDS:
        raise ConfigError(f"unknown backend {name!r}; valid options are: {', '.join(backend_names() + [AUTO])}")
    return _BACKENDS[name]


def all_backends() -> list[Backend]:
    return [get_backend(n) for n in backend_names()]


# --- specs and plans ---------------------------------------------------------------------------------------------

BackendSpec = "str | dict[str, str] | BackendPlan | None"


def parse_spec(spec: Any, *, source: str = "backends") -> dict[str, str]:
    """Turn a spec into {operator: backend name}; unknown operators or backends, or an operator given twice,
    raise `ConfigError` (a ValueError)."""
    if spec is None or spec == "":
        return {}
    if isinstance(spec, BackendPlan):
        return dict(spec.choices)
    if isinstance(spec, str):
        items = [p.strip() for p in spec.split(",") if p.strip()]
        mapping, given = {}, set()
        for i, item in enumerate(items):
            op, sep, name = item.partition("=")
            if sep:
                if op.strip() in given:  # which one was meant? (a bare name first is overridden on purpose)
                    raise ConfigError(f"{source}: operator {op.strip()!r} is given twice in {spec!r}")
                given.add(op.strip())
                mapping[op.strip()] = name.strip()
            elif i == 0:  # a bare name first: every operator, then the overrides that follow
                mapping = {o: item for o in OPERATORS}
            else:
                raise ConfigError(f"{source}: {item!r} is not operator=backend (a bare backend name, for every "
                                  f"operator, may only come first) in {spec!r}")
    elif isinstance(spec, dict):
        mapping = {str(k): str(v) for k, v in spec.items()}
    else:
        raise ConfigError(f"{source}: expected a backend name, 'op=backend,...' string or mapping, "
                          f"got {type(spec).__name__}")
    for op, name in mapping.items():
        if op not in OPERATORS:
            raise ConfigError(f"{source}: unknown operator {op!r}; valid options are: {', '.join(OPERATORS)}")
        if name != AUTO:
            try:
                get_backend(name)
            except ValueError as e:
                raise ConfigError(f"{source}: {e}") from None
    return mapping


_SCOPE: contextvars.ContextVar[tuple[dict[str, str], ...]] = contextvars.ContextVar("qvl_backends_scope", default=())


@contextlib.contextmanager
def use_backends(spec: Any) -> Iterator[None]:
    """Scoped default for plans resolved inside the block (models built or `set_backends` called there)."""
    mapping = parse_spec(spec, source="use_backends")
    token = _SCOPE.set(_SCOPE.get() + (mapping,))
    try:
        yield
    finally:
        _SCOPE.reset(token)


@dataclass(frozen=True)
class BackendPlan:
    """The resolved choice per operator, plus the fallback policy. Hashable; logged with every result."""

    choices: tuple[tuple[str, str], ...]
    fallback: str | None = None

    def __getitem__(self, operator: str) -> str:
        return dict(self.choices)[operator]

    def as_dict(self) -> dict[str, str]:
        return dict(self.choices)

    def __str__(self) -> str:
        s = ",".join(f"{op}={name}" for op, name in self.choices)
        return s + (f" (fallback={self.fallback})" if self.fallback else "")


def resolve_plan(spec: Any = None, *, fallback: str | None = None) -> BackendPlan:
    """Merge explicit spec > use_backends scopes (innermost first) > QVL_BACKENDS > eager, per operator."""
    merged = {op: DEFAULT_BACKEND for op in OPERATORS}
    merged.update(parse_spec(os.environ.get(ENV_VAR), source=f"environment variable {ENV_VAR}"))
    for scope in _SCOPE.get():
        merged.update(scope)
    merged.update(parse_spec(spec))
    if fallback is not None:
        try:
            get_backend(fallback)
        except ValueError as e:
            raise ConfigError(f"fallback: {e}") from None
    plan = BackendPlan(tuple((op, merged[op]) for op in OPERATORS), fallback)
    if fallback is None:  # an explicit choice that cannot run at all fails now, not at the first call
        for op, name in plan.choices:
            if name != AUTO and (reasons := get_backend(name).unavailable_reasons()):
                raise BackendUnsupportedError(f"{op}: backend {name!r} is unavailable on this machine: "
                                              + "; ".join(reasons))
    return plan


# --- dispatch ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fallback:
    operator: str
    requested: str
    used: str
    call: str
    reasons: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.operator}: {self.requested} -> {self.used} ({self.call}): {'; '.join(self.reasons)}"


class Dispatcher:
    """Picks the implementation for each call under a plan, caching the decision per call signature."""

    def __init__(self, plan: BackendPlan):
        self.plan = plan
        self._decisions: dict[CallInfo, OpImpl] = {}
        self.fallbacks: list[Fallback] = []

    def select(self, call: CallInfo) -> OpImpl:
        impl = self._decisions.get(call)
        if impl is None:
            impl = self._decisions[call] = self._decide(call)
        return impl

    def _decide(self, call: CallInfo) -> OpImpl:
        requested = self.plan[call.operator]
        if requested == AUTO:
            candidates = sorted(all_backends(), key=lambda b: -b.priority)
            for backend in candidates:
                if not backend.reasons(call):
                    log.info("qvl: %s (%s) -> auto picked %s", call.operator, call.describe(), backend.name)
                    return backend.impls[call.operator]
            raise BackendUnsupportedError(_nothing_fits(call, candidates))
        backend = get_backend(requested)
        reasons = backend.reasons(call)
        if not reasons:
            return backend.impls[call.operator]
        if self.plan.fallback is None:
            raise BackendUnsupportedError(
                f"{call.operator}: backend {requested!r} cannot run this call ({call.describe()}):\n  - "
                + "\n  - ".join(reasons)
                + "\nPass fallback='eager' (or another backend) to route such calls, or choose another backend.")
        fb = get_backend(self.plan.fallback)
        fb_reasons = fb.reasons(call)
        if fb_reasons:
            raise BackendUnsupportedError(_nothing_fits(call, [backend, fb]))
        record = Fallback(call.operator, requested, fb.name, call.describe(), tuple(reasons))
        self.fallbacks.append(record)
        log.warning("qvl fallback: %s", record)
        return fb.impls[call.operator]


def _nothing_fits(call: CallInfo, backends: list[Backend]) -> str:
    lines = [f"{call.operator}: no backend can run this call ({call.describe()}):"]
    for b in backends:
        lines.append(f"  {b.name}: " + "; ".join(b.reasons(call)))
    return "\n".join(lines)


def availability_table(probes: dict[str, CallInfo] | None = None) -> list[dict[str, str]]:
    """Rows of operator x backend status for this machine: 'ok', 'ok (note)' or the reasons."""
    rows = []
    for op in OPERATORS:
        row = {"operator": op}
        for backend in all_backends():
            reasons = list(backend.unavailable_reasons())
            if not reasons and op not in backend.impls:
                reasons = [f"no {op} implementation"]
            if not reasons and probes and op in probes:
                reasons = backend.reasons(probes[op])
            note = backend.note()
            row[backend.name] = "; ".join(reasons) if reasons else ("ok" + (f" ({note})" if note else ""))
        rows.append(row)
    return rows
