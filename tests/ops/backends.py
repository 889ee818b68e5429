"""Every registered backend of an operator as a pytest parameter, with eager as the reference.

An operator's test module parametrizes over `backend_params("norm")` (indirectly, through the `ops`
fixture in tests/ops/conftest.py) and runs the operator through `ops`, the strict plan of that backend, then
compares with `reference_ops()`, the eager plan. A newly registered backend joins every operator test without
an edit.

Backends that cannot run on this machine:
- xformers without a GPU runs its own code paths (layouts, biases, rope_padded's cache slots) on the CPU with
  xFormers' kernel entry points replaced by references (tests/ops/xformers_sim.py), as "xformers (simulated
  kernels)"; only its kernels themselves need a GPU;
- any other unavailable backend is skipped with the registry's reasons.

A call a backend declares unsupported (its registry reasons) is not a failure: `run` skips the case with those
reasons (hypothesis rejects the example instead, so a property test whose every example is unsupported fails
as unsatisfiable rather than passing quietly).
"""

from __future__ import annotations

import hypothesis
import pytest

from qvl.backends import BackendUnsupportedError, Ops, backend_names, get_backend, resolve_plan

REFERENCE = "eager"
SIMULATED_XFORMERS = "xformers"


def backend_params(operator: str, *, include_reference: bool = True) -> list:
    """pytest params, one per registered backend implementing `operator` (lazily registered ones included)."""
    names = [n for n in backend_names() if operator in get_backend(n).impls]
    return [pytest.param(n, id=n) for n in names if include_reference or n != REFERENCE]


def make_ops(name: str, monkeypatch: pytest.MonkeyPatch) -> Ops:
    """The strict plan of backend `name` on this machine; simulated xformers kernels where xFormers cannot run."""
    reasons = get_backend(name).unavailable_reasons()
    if name == SIMULATED_XFORMERS and reasons:
        from tests.ops import xformers_sim

        if xformers_sim.can_simulate():
            simulated, _calls = xformers_sim.register_simulated_backend(monkeypatch)
            return Ops(resolve_plan(simulated))
    if reasons:
        pytest.skip(f"backend {name} unavailable here: " + "; ".join(reasons))
    return Ops(resolve_plan(name))


def implementation(ops: Ops, operator: str):
    """The OpImpl that runs `operator` under this plan (its declared support: activations, device_lengths...)."""
    return get_backend(ops.plan[operator]).impls[operator]


def reference_ops() -> Ops:
    return Ops(resolve_plan(REFERENCE))


def run(ops: Ops, operator: str, *args, **kwargs):
    """ops.<operator>(...), with a call the backend declares unsupported skipped (or rejected under hypothesis)."""
    try:
        return getattr(ops, operator)(*args, **kwargs)
    except BackendUnsupportedError as e:
        if hypothesis.currently_in_test_context():
            hypothesis.reject()
        pytest.skip(f"{ops.plan[operator]} declares this call unsupported: {e}")
