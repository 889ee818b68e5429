"""The operator registry: spec parsing, selection precedence, swapping, support errors, fallbacks,
lazily registered backends that fail to import, `auto`, and duplicate registration.

Registry state is module-global; the `test_backends` fixture registers a few backends that wrap the eager
implementations and removes everything registered during the test afterwards.
"""

from __future__ import annotations

import collections
import importlib
import sys
import types

import pytest
import torch

import qvl
from qvl.backends import (
    ENV_VAR,
    OPERATORS,
    Backend,
    BackendPlan,
    BackendUnsupportedError,
    CallInfo,
    OpImpl,
    Ops,
    availability_table,
    backend_names,
    get_backend,
    parse_spec,
    register_backend,
    register_lazy_backend,
    registry,
    resolve_plan,
    use_backends,
)
from qvl.backends.registry import Dispatcher

# Far above any real backend's priority, so `auto` tests do not depend on what else is registered.
TOP = 1_000_000


# --- fixtures ----------------------------------------------------------------------------------------------------


class EagerWrapper(OpImpl):
    """Runs the eager implementation of `operator` and counts the calls."""

    def __init__(self, operator: str, calls: collections.Counter):
        self.operator = operator
        self.inner = get_backend("eager").impls[operator]
        self.calls = calls

    def __call__(self, *args, **kwargs):
        self.calls[self.operator] += 1
        return self.inner(*args, **kwargs)


class Float64Only(EagerWrapper):
    dtypes = frozenset({torch.float64})


def _wrapping_backend(name: str, impl_cls=EagerWrapper, priority: int = 0, operators=OPERATORS):
    calls = collections.Counter()
    backend = Backend(name, {op: impl_cls(op, calls) for op in operators}, description=f"test {name}",
                      priority=priority)
    return backend, calls


@pytest.fixture(autouse=True)
def clean_registry(monkeypatch):
    """No QVL_BACKENDS from the outside; undo every registration a test makes."""
    monkeypatch.delenv(ENV_VAR, raising=False)
    before_backends, before_lazy = dict(registry._BACKENDS), dict(registry._LAZY)
    yield
    for name in set(registry._BACKENDS) - set(before_backends):
        del registry._BACKENDS[name]
    for name in set(registry._LAZY) - set(before_lazy):
        del registry._LAZY[name]
    # a lazy entry that was loaded during the test moved into _BACKENDS: put it back as it was
    for name, entry in before_lazy.items():
        registry._LAZY.setdefault(name, entry)
        if name not in before_backends:
            registry._BACKENDS.pop(name, None)


@pytest.fixture
def test_backends():
    """test_a and test_b wrap eager (all operators); test_f64 wraps eager but declares float64 only."""
    a, a_calls = _wrapping_backend("test_a", priority=TOP - 1)
    b, b_calls = _wrapping_backend("test_b", priority=TOP - 2)
    f64, f64_calls = _wrapping_backend("test_f64", Float64Only, priority=TOP)
    for backend in (a, b, f64):
        register_backend(backend)
    return types.SimpleNamespace(a=a_calls, b=b_calls, f64=f64_calls)


@pytest.fixture
def tiny():
    return qvl.from_config("tiny", seed=0).requires_grad_(False)  # inference: calls describe no grad


def _text_ids():
    return torch.tensor([[5, 17, 300, 42, 9, 1000, 3]])


def _image_inputs():
    ids = torch.tensor([[5, 1003] + [1001] * 6 + [1004, 7, 8]])
    gen = torch.Generator().manual_seed(0)
    return dict(input_ids=ids, pixel_values=torch.randn(24, 1176, generator=gen),
                image_grid_thw=torch.tensor([[1, 4, 6]]))


def _all(name: str) -> dict[str, str]:
    return {op: name for op in OPERATORS}


# --- spec parsing ------------------------------------------------------------------------------------------------


def test_single_name_applies_to_every_operator():
    assert parse_spec("eager") == _all("eager")
    assert parse_spec(" eager ") == _all("eager")
    assert parse_spec("auto") == _all("auto")


def test_per_operator_string():
    assert parse_spec("attention=eager,norm=eager") == {"attention": "eager", "norm": "eager"}
    assert parse_spec(" attention = eager , norm=eager, ") == {"attention": "eager", "norm": "eager"}


def test_mapping_spec():
    assert parse_spec({"attention": "eager", "mlp": "auto"}) == {"attention": "eager", "mlp": "auto"}


def test_empty_specs_mean_nothing_chosen():
    assert parse_spec(None) == {}
    assert parse_spec("") == {}
    assert parse_spec({}) == {}


def test_plan_round_trips_through_parse_spec():
    plan = resolve_plan({"norm": "eager"})
    assert parse_spec(plan) == plan.as_dict()
    assert resolve_plan(plan) == plan


@pytest.mark.parametrize("spec", ["bogus=eager", "attention=eager,bogus=eager", {"bogus": "eager"}])
def test_unknown_operator_lists_valid_operators(spec):
    with pytest.raises(ValueError, match="unknown operator 'bogus'") as e:
        parse_spec(spec)
    msg = str(e.value)
    assert "valid options are" in msg
    for op in OPERATORS:
        assert op in msg


@pytest.mark.parametrize("spec", ["nope", "attention=nope", {"norm": "nope"}])
def test_unknown_backend_lists_valid_backends(spec, test_backends):
    with pytest.raises(ValueError, match="unknown backend 'nope'") as e:
        parse_spec(spec)
    msg = str(e.value)
    assert "valid options are" in msg
    for name in ("eager", "test_a", "test_b", "test_f64", "auto"):
        assert name in msg


def test_bare_name_then_overrides(test_backends):
    """"triton,mlp=triton-gemm": a bare backend name sets every operator, the pairs after it override."""
    assert parse_spec("test_a, norm=test_b") == {op: ("test_b" if op == "norm" else "test_a") for op in OPERATORS}


def test_malformed_specs():
    with pytest.raises(ValueError, match="'norm' is not operator=backend"):
        parse_spec("attention=eager,norm")
    with pytest.raises(ValueError, match="may only come first"):
        parse_spec("eager,norm=eager,test_a")
    with pytest.raises(ValueError, match="expected a backend name"):
        parse_spec(42)


def test_backend_with_unknown_operator_is_refused():
    with pytest.raises(ValueError, match="unknown operators.*'softmax'.*valid options are"):
        Backend("test_bad", {"softmax": EagerWrapper("norm", collections.Counter())})


# --- precedence --------------------------------------------------------------------------------------------------


def test_default_is_eager():
    plan = resolve_plan()
    assert plan.as_dict() == _all("eager")
    assert plan.fallback is None


def test_env_var_single_name_and_per_operator(monkeypatch, test_backends):
    monkeypatch.setenv(ENV_VAR, "test_a")
    assert resolve_plan().as_dict() == _all("test_a")
    monkeypatch.setenv(ENV_VAR, "attention=test_a,norm=test_b")
    assert resolve_plan().as_dict() == {**_all("eager"), "attention": "test_a", "norm": "test_b"}


def test_bad_env_var_names_the_variable(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "attention=nope")
    # where the bad name came from matters: the user may not know the variable is set
    with pytest.raises(ValueError, match=f"environment variable {ENV_VAR}.*unknown backend 'nope'"):
        resolve_plan()
    monkeypatch.setenv(ENV_VAR, "bogus=eager")
    with pytest.raises(ValueError, match=f"environment variable {ENV_VAR}: unknown operator 'bogus'"):
        resolve_plan()


def test_precedence_explicit_over_scopes_over_env_over_eager_per_operator(monkeypatch, test_backends):
    monkeypatch.setenv(ENV_VAR, "attention=test_a,norm=test_a,mlp=test_a,rope=test_a")
    with use_backends("norm=test_b,mlp=test_b,rope=test_b"):
        with use_backends({"mlp": "test_f64", "rope": "test_f64"}):
            plan = resolve_plan({"rope": "eager"})
        outer_only = resolve_plan()
    after = resolve_plan()
    assert plan.as_dict() == {
        "attention": "test_a",  # env var
        "norm": "test_b",  # outer scope
        "mlp": "test_f64",  # innermost scope
        "rope": "eager",  # explicit beats every scope
        "cache": "eager",  # nobody chose: the default
        "loss": "eager",
        "linear": "eager",
    }
    unchosen = {"cache": "eager", "loss": "eager", "linear": "eager"}
    assert outer_only.as_dict() == {"attention": "test_a", "norm": "test_b", "mlp": "test_b", "rope": "test_b",
                                    **unchosen}
    assert after.as_dict() == {**_all("test_a"), **unchosen}


def test_explicit_single_name_beats_scope_for_every_operator(test_backends):
    with use_backends("test_a"):
        assert resolve_plan("test_b").as_dict() == _all("test_b")
        assert resolve_plan().as_dict() == _all("test_a")


def test_scope_is_restored_after_an_exception(test_backends):
    with pytest.raises(RuntimeError):
        with use_backends("test_a"):
            raise RuntimeError("boom")
    assert resolve_plan().as_dict() == _all("eager")


def test_use_backends_validates_its_spec_immediately():
    with pytest.raises(ValueError, match="use_backends: unknown operator 'bogus'"):
        with use_backends("bogus=eager"):
            pass  # pragma: no cover


def test_model_takes_the_scope_active_when_built(test_backends):
    with use_backends("test_a"):
        model = qvl.from_config("tiny", seed=0)
        explicit = qvl.from_config("tiny", seed=0, backends={"norm": "test_b"})
    assert model.plan.as_dict() == _all("test_a")
    assert explicit.plan.as_dict() == {**_all("test_a"), "norm": "test_b"}
    with torch.no_grad():
        model(_text_ids())  # the plan stays with the model after the scope ends
    assert test_backends.a["attention"] > 0 and test_backends.a["norm"] > 0
    # a plan resolved later (outside the scope) goes back to the default
    model.set_backends()
    assert model.plan.as_dict() == _all("eager")


# --- swapping backends on a loaded model -------------------------------------------------------------------------


def test_set_backends_swaps_operators_without_touching_weights(tiny, test_backends):
    inputs = _image_inputs()
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    ptrs = {k: v.data_ptr() for k, v in tiny.state_dict().items()}
    expected = tiny(**inputs).logits
    assert tiny.plan.as_dict() == _all("eager")

    returned = tiny.set_backends("test_a")
    assert returned is tiny
    assert tiny.plan.as_dict() == _all("test_a")
    after = tiny.state_dict()
    assert after.keys() == before.keys()
    for k in before:
        assert torch.equal(after[k], before[k]), k
        assert after[k].data_ptr() == ptrs[k], k  # same storage: nothing was copied or reloaded
    out = tiny(**inputs).logits
    assert torch.equal(out, expected)
    # every operator really ran on test_a (vision tower and decoder)
    assert {"attention", "rope", "norm", "mlp"} <= set(test_backends.a)
    assert sum(test_backends.b.values()) == 0

    tiny.set_backends({"attention": "test_b"})
    assert tiny.plan.as_dict() == {**_all("eager"), "attention": "test_b"}
    assert torch.equal(tiny(**inputs).logits, expected)
    assert test_backends.b["attention"] > 0


def test_generate_uses_the_cache_operator_of_the_plan(tiny, test_backends):
    ids = _text_ids()
    expected = tiny.generate(ids, max_new_tokens=3)
    tiny.set_backends("test_a")
    assert torch.equal(tiny.generate(ids, max_new_tokens=3), expected)
    assert test_backends.a["cache"] > 0


# --- unsupported calls and fallbacks -----------------------------------------------------------------------------


def test_a_call_that_needs_gradients_needs_a_backend_with_a_backward(tiny, test_backends):
    """test_a's wrappers declare no backward: inference runs on them, training is refused with the reason, or
    routed to the fallback and recorded."""
    ids = _text_ids()
    tiny.requires_grad_(True).set_backends({"norm": "test_a"})
    with torch.no_grad():
        tiny(ids)
    assert test_backends.a["norm"] > 0
    with pytest.raises(BackendUnsupportedError, match="norm: backend 'test_a' cannot run this call .*grad=True"
                       r"(.|\n)*no backward \(this call needs gradients\)"):
        tiny(ids, labels=ids)
    tiny.set_backends({"norm": "test_a"}, fallback="eager")
    tiny(ids, labels=ids).loss.backward()
    assert tiny.model.norm.weight.grad is not None
    assert {(fb.operator, fb.used) for fb in tiny.fallbacks} == {("norm", "eager")}
    assert all("no backward" in fb.reasons[0] and "grad=True" in fb.call for fb in tiny.fallbacks)


def test_explicit_choice_that_cannot_run_raises_with_operator_backend_and_reason(tiny, test_backends):
    tiny.set_backends({"mlp": "test_f64"})
    with pytest.raises(BackendUnsupportedError) as e:
        tiny(_text_ids())
    msg = str(e.value)
    assert msg.startswith("mlp:")
    assert "'test_f64'" in msg
    assert "dtype float32 not supported" in msg and "float64" in msg
    assert "fallback" in msg  # tells the user how to route such calls
    assert sum(test_backends.f64.values()) == 0


def test_fallback_runs_the_call_and_records_it(tiny, test_backends):
    inputs = _image_inputs()
    expected = tiny(**inputs).logits
    tiny.set_backends({"mlp": "test_f64", "norm": "test_a"}, fallback="eager")
    assert tiny.plan.fallback == "eager"
    assert "fallback=eager" in str(tiny.plan)
    out = tiny(**inputs).logits
    assert torch.equal(out, expected)
    assert sum(test_backends.f64.values()) == 0
    assert test_backends.a["norm"] > 0
    fallbacks = tiny.fallbacks
    assert fallbacks, "no fallback was recorded"
    for fb in fallbacks:
        assert (fb.operator, fb.requested, fb.used) == ("mlp", "test_f64", "eager")
        assert any("dtype float32 not supported" in r for r in fb.reasons)
        assert "float32" in fb.call
        assert "mlp: test_f64 -> eager" in str(fb)
    # one record per distinct call signature (vision swiglu with bias, merger gelu, decoder swiglu), not per call
    assert len(fallbacks) == len({fb.call for fb in fallbacks})
    n = len(fallbacks)
    tiny(**inputs)
    assert len(tiny.fallbacks) == n


def test_fallback_is_not_taken_when_the_choice_supports_the_call(test_backends):
    ops = Ops(resolve_plan("test_f64", fallback="eager"))
    x = torch.randn(2, 8, dtype=torch.float64)
    w = torch.ones(8, dtype=torch.float64)
    ops.norm(x, w, 1e-6)
    assert test_backends.f64["norm"] == 1
    assert ops.fallbacks == []


def test_fallback_that_cannot_run_either_raises(test_backends):
    ops = Ops(resolve_plan("test_a", fallback="test_f64"))
    bad = CallInfo("norm", "tpu", torch.float32)  # no backend runs on this device
    with pytest.raises(BackendUnsupportedError, match="no backend can run this call") as e:
        ops._dispatch.select(bad)
    assert "test_a" in str(e.value) and "test_f64" in str(e.value) and "device tpu" in str(e.value)


def test_unknown_fallback_backend_is_a_value_error():
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        resolve_plan(fallback="nope")


def test_availability_table_with_probes_shows_call_level_reasons(test_backends):
    probes = {"norm": CallInfo("norm", "cpu", torch.float32)}
    rows = {row["operator"]: row for row in availability_table(probes)}
    assert set(rows) == set(OPERATORS)
    assert rows["norm"]["eager"] == "ok"
    assert rows["norm"]["test_a"] == "ok"
    assert "dtype float32 not supported" in rows["norm"]["test_f64"]
    assert rows["attention"]["test_f64"] == "ok"  # no probe for attention: only backend-wide status


# --- lazily registered backends that fail to import --------------------------------------------------------------


@pytest.fixture
def raising_module(tmp_path, monkeypatch):
    name = "qvl_test_backend_raises_at_import"
    (tmp_path / f"{name}.py").write_text(
        "raise RuntimeError('compiled extension is broken: undefined symbol _Z3foov')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_missing_module_shows_up_as_unavailable_with_the_import_error():
    register_lazy_backend("broken", "qvl_no_such_module")
    assert "qvl_no_such_module" not in sys.modules  # registration imports nothing
    assert "broken" in backend_names()
    rows = availability_table()
    for row in rows:
        assert "could not load qvl_no_such_module" in row["broken"]
        assert "ModuleNotFoundError" in row["broken"]
        assert row["eager"] == "ok"
    # qvl keeps working: importing, building and running a model on the default plan
    importlib.import_module("qvl")
    model = qvl.from_config("tiny", seed=0)
    model(_text_ids())
    assert get_backend("broken").unavailable_reasons()


def test_module_raising_at_import_shows_up_as_unavailable(raising_module):
    register_lazy_backend("raises", raising_module)
    rows = availability_table()
    for row in rows:
        assert "RuntimeError" in row["raises"]
        assert "compiled extension is broken" in row["raises"]
    assert raising_module not in sys.modules


@pytest.mark.parametrize("module", ["qvl_no_such_module", "raising"])
def test_explicit_unavailable_backend_raises_at_plan_resolution(module, raising_module):
    module = raising_module if module == "raising" else module
    register_lazy_backend("broken", module)
    with pytest.raises(BackendUnsupportedError, match="backend 'broken' is unavailable") as e:
        resolve_plan({"attention": "broken"})
    assert str(e.value).startswith("attention:")
    assert f"could not load {module}" in str(e.value)
    with pytest.raises(BackendUnsupportedError, match="could not load"):
        qvl.from_config("tiny", seed=0, backends="broken")
    with use_backends("norm=broken"):  # a scoped choice is checked the same way
        with pytest.raises(BackendUnsupportedError, match="norm: backend 'broken'"):
            resolve_plan()


def test_unavailable_backend_with_fallback_falls_back(tiny, raising_module):
    register_lazy_backend("broken", raising_module)
    expected = tiny(**_image_inputs()).logits
    tiny.set_backends({"attention": "broken", "norm": "broken"}, fallback="eager")
    assert torch.equal(tiny(**_image_inputs()).logits, expected)
    ops = {fb.operator for fb in tiny.fallbacks}
    assert ops == {"attention", "norm"}
    for fb in tiny.fallbacks:
        assert fb.requested == "broken" and fb.used == "eager"
        assert any("could not load" in r and "RuntimeError" in r for r in fb.reasons)


def test_lazy_backend_that_loads(tmp_path, monkeypatch):
    name = "qvl_test_backend_lazy_ok"
    (tmp_path / f"{name}.py").write_text(
        "from qvl.backends import Backend, get_backend\n"
        "BACKEND = Backend('lazy_ok', {'norm': get_backend('eager').impls['norm']}, priority=-5)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        register_lazy_backend("lazy_ok", name)
        assert name not in sys.modules
        backend = get_backend("lazy_ok")
        assert name in sys.modules
        assert backend.unavailable_reasons() == []
        rows = {row["operator"]: row for row in availability_table()}
        assert rows["norm"]["lazy_ok"] == "ok"
        assert rows["attention"]["lazy_ok"] == "no attention implementation"
        assert resolve_plan("norm=lazy_ok")["norm"] == "lazy_ok"
    finally:
        sys.modules.pop(name, None)


def test_lazy_module_whose_backend_has_another_name_is_unavailable(tmp_path, monkeypatch):
    name = "qvl_test_backend_misnamed"
    (tmp_path / f"{name}.py").write_text(
        "from qvl.backends import Backend\nBACKEND = Backend('other_name', {})\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        register_lazy_backend("misnamed", name)
        reasons = get_backend("misnamed").unavailable_reasons()
        assert len(reasons) == 1 and "'other_name'" in reasons[0] and "'misnamed'" in reasons[0]
    finally:
        sys.modules.pop(name, None)


def test_failing_availability_probe_does_not_break_the_registry():
    def probe():
        raise OSError("driver not found")

    register_backend(Backend("test_probe", {"norm": EagerWrapper("norm", collections.Counter())},
                             availability=probe))
    reasons = get_backend("test_probe").unavailable_reasons()
    assert reasons == ["availability check failed: OSError: driver not found"]
    rows = {row["operator"]: row for row in availability_table()}
    assert "driver not found" in rows["norm"]["test_probe"]


# --- auto --------------------------------------------------------------------------------------------------------


def test_auto_picks_the_highest_priority_backend_that_supports_the_call(test_backends):
    ops = Ops(resolve_plan("auto"))
    x32, w32 = torch.randn(3, 8), torch.ones(8)
    x64, w64 = x32.double(), w32.double()
    ops.norm(x64, w64, 1e-6)  # test_f64 (priority TOP) supports float64
    assert test_backends.f64["norm"] == 1
    ops.norm(x32, w32, 1e-6)  # test_f64 refuses float32: next is test_a (TOP - 1)
    assert test_backends.a["norm"] == 1
    assert test_backends.f64["norm"] == 1
    assert sum(test_backends.b.values()) == 0
    assert ops.fallbacks == []  # auto is a choice, not a fallback


def test_auto_walks_past_unavailable_and_incomplete_backends(test_backends, raising_module):
    register_lazy_backend("broken_top", raising_module, priority=TOP + 10)
    partial, partial_calls = _wrapping_backend("test_partial", priority=TOP + 5, operators=("attention",))
    register_backend(partial)
    ops = Ops(resolve_plan({"norm": "auto", "attention": "auto"}))
    ops.norm(torch.randn(3, 8), torch.ones(8), 1e-6)  # broken_top: unavailable; test_partial: no norm
    assert test_backends.a["norm"] == 1
    q = torch.randn(1, 4, 2, 8)
    from qvl.backends import CausalMask
    ops.attention(q, q, q, CausalMask())
    assert partial_calls["attention"] == 1


def test_auto_with_nothing_that_fits_lists_every_backend(test_backends):
    dispatcher = Dispatcher(resolve_plan("auto"))
    with pytest.raises(BackendUnsupportedError, match="norm: no backend can run this call") as e:
        dispatcher.select(CallInfo("norm", "tpu", torch.float32))
    msg = str(e.value)
    for name in ("eager", "test_a", "test_b", "test_f64"):
        assert f"  {name}: " in msg
    assert "device tpu not supported" in msg


def test_auto_model_matches_eager(tiny, test_backends):
    expected = tiny(**_image_inputs()).logits
    tiny.set_backends("auto")
    assert tiny.plan.as_dict() == _all("auto")
    assert torch.equal(tiny(**_image_inputs()).logits, expected)
    assert test_backends.a["attention"] > 0  # test_f64 refused the float32 calls
    assert sum(test_backends.f64.values()) == 0


# --- registration ------------------------------------------------------------------------------------------------


def test_duplicate_registration_raises(test_backends):
    with pytest.raises(ValueError, match="'eager' is already registered"):
        register_backend(Backend("eager", {}))
    with pytest.raises(ValueError, match="'test_a' is already registered"):
        register_backend(_wrapping_backend("test_a")[0])
    with pytest.raises(ValueError, match="'auto' is already registered \\(or reserved\\)"):
        register_backend(Backend("auto", {}))
    with pytest.raises(ValueError, match="'eager' is already registered"):
        register_lazy_backend("eager", "qvl_no_such_module")
    register_lazy_backend("test_lazy", "qvl_no_such_module")
    with pytest.raises(ValueError, match="'test_lazy' is already registered"):
        register_lazy_backend("test_lazy", "qvl_no_such_module")
    with pytest.raises(ValueError, match="'auto' is already registered"):
        register_lazy_backend("auto", "qvl_no_such_module")
    # the originals are untouched
    assert get_backend("eager").impls["norm"] is registry._BACKENDS["eager"].impls["norm"]
    assert isinstance(get_backend("test_a").impls["norm"], EagerWrapper)


def test_fixture_cleanup_leaves_only_the_builtin_backends():
    assert not any(n.startswith("test_") or n in ("broken", "raises", "lazy_ok", "misnamed", "broken_top")
                   for n in backend_names())


def test_plan_is_hashable_and_printable():
    plan = resolve_plan({"norm": "eager"}, fallback="eager")
    assert isinstance(plan, BackendPlan)
    assert hash(plan) == hash(resolve_plan({"norm": "eager"}, fallback="eager"))
    assert str(plan).startswith("attention=eager,rope=eager,norm=eager,mlp=eager,cache=eager")
    assert plan["norm"] == "eager"


def test_backends_table_marks_operators_a_partial_backend_lacks(capsys):
    """`qvl backends`: '-' where a backend has no implementation (available or not), reasons elsewhere."""
    from qvl.cli import main

    eager_norm = get_backend("eager").impls["norm"]
    register_backend(Backend("test_partial", {"norm": eager_norm}))
    register_backend(Backend("test_partial_off", {"norm": eager_norm}, availability=lambda: ["no test device"]))
    register_backend(Backend("test_partial_fwd", {"norm": EagerWrapper("norm", collections.Counter())}))
    assert main(["backends"]) == 0
    lines = capsys.readouterr().out.splitlines()

    names, starts = lines[0].split(), []
    for name in names:  # the table is padded to fixed widths: cut each row at the header's columns
        starts.append(lines[0].index(name, starts[-1] if starts else 0))
    rows = {line.split()[0]: {n: line[a:b].strip() for n, a, b in zip(names, starts, starts[1:] + [None], strict=True)}
            for line in lines[1:len(OPERATORS) + 1]}

    def column(name):
        return {op: rows[op][name] for op in OPERATORS}

    partial, off = column("test_partial"), column("test_partial_off")
    assert partial["norm"] == "fwd+bwd" and all(partial[op] == "-" for op in OPERATORS if op != "norm")
    assert column("test_partial_fwd")["norm"] == "fwd only"  # no backward declared
    assert off["norm"].startswith("unavailable [") and all(off[op] == "-" for op in OPERATORS if op != "norm")
    number = off["norm"].removeprefix("unavailable ")
    assert f"{number} no test device" in lines
    assert not get_backend("test_partial").covers_all_operators and get_backend("eager").covers_all_operators
