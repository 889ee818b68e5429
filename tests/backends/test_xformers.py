"""The xformers backend as a whole (each operator against eager is in tests/ops/test_<operator>.py).

On the CPU (CI): the translation of qvl's masks into xFormers bias objects (materialized by xFormers itself and
compared with `mask.dense`, block by block over the exact packed layout the backend passes); the whole tiny
model through the xformers paths with xFormers' kernel entry points replaced by references
(tests/ops/xformers_sim.py); the support probe on xFormers' public API; and the availability reasons (not
installed, failing import, broken compiled extension, no CUDA).

On a CUDA GPU: the tiny and 3b models with ``backends="xformers", fallback="eager"`` against eager (logits and
greedy tokens).
"""

from __future__ import annotations

import contextlib
import sys
import types

import pytest
import torch

from qvl.backends import (
    OPERATORS,
    BackendUnsupportedError,
    BlockDiagonalMask,
    CallInfo,
    CausalMask,
    Ops,
    get_backend,
    registry,
    resolve_plan,
)
from qvl.backends import xformers as xfb
from qvl.backends.xformers import installed
from qvl.demo import demo_prompt
from tests.backends import model_checks as checks
from tests.ops.xformers_sim import needs_xformers as needs_xf
from tests.ops.xformers_sim import register_simulated_backend

HAS_XF = installed.XF is not None
CUDA = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def rel_err(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12)).item()


def allowed(bias, lq, lk):
    """xFormers' own materialization of `bias` over (lq, lk): True where attention is allowed."""
    return bias.materialize((lq, lk), dtype=torch.float32) == 0


def randn(*shape, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(*shape, generator=g, device=device, dtype=torch.float32).to(dtype)


# --- the mask translation, materialized by xFormers ---------------------------------------------------------------


@needs_xf
@pytest.mark.parametrize("group", [1, 2])
def test_block_diagonal_bias_matches_mask(group):
    mask = BlockDiagonalMask.from_seqlens([3, 5, 1, 4, 0, 2])
    n = 15
    q, k = randn(1, n, 2 * group, 8), randn(1, n, 2, 8, seed=1)
    call = xfb.prepare_attention(q, k, k, mask)
    assert type(call.bias).__name__ == "BlockDiagonalMask" and call.empty_rows is None
    assert torch.equal(allowed(call.bias, call.query.shape[1], call.key.shape[1]), mask.dense(1, n, n)[0])
    if group > 1:  # 5-D (B, M, G, H, K): K expanded over H with stride 0, the same memory as k
        assert call.query.shape == (1, n, 2, group, 8) and call.key.shape == (1, n, 2, group, 8)
        assert call.key.stride(3) == 0 and call.key.data_ptr() == k.data_ptr()
    assert xfb.prepare_attention(q, k, k, mask).bias is call.bias  # built once per mask (one host sync)


@needs_xf
@pytest.mark.parametrize("lq,lk", [(6, 6), (1, 9), (3, 9)])
def test_unpadded_causal_bias_matches_mask(lq, lk):
    cache = randn(2, 12, 1, 8)
    q, k = randn(2, lq, 4, 8), cache[:, :lk]
    call = xfb.prepare_attention(q, k, k, CausalMask())
    assert type(call.bias).__name__ == "LowerTriangularFromBottomRightMask" and call.empty_rows is None
    dense = CausalMask().dense(2, lq, lk)
    for b in range(2):
        assert torch.equal(allowed(call.bias, lq, lk), dense[b])
    assert call.key.shape == (2, lk, 1, 4, 8) and call.key.stride(3) == 0 and call.key.data_ptr() == cache.data_ptr()


def _check_padded(pad, lq, lk, max_len, hq=4, hkv=2):
    """The packed layout: queries of row b at [b*Lq, (b+1)*Lq), its keys read in place at b*pitch + j."""
    batch = len(pad)
    cache = randn(batch, max_len, hkv, 8)
    k = cache[:, :lk]
    q = randn(batch, lq, hq, 8, seed=1)
    mask = CausalMask(torch.tensor(pad))
    call = xfb.prepare_attention(q, k, k, mask)
    assert type(call.bias).__name__ == "BlockDiagonalCausalWithOffsetGappyKeysMask"
    total = (batch - 1) * max_len + lk
    assert call.query.shape[:2] == (1, batch * lq) and call.key.shape[:2] == (1, total)
    assert call.key.data_ptr() == cache.data_ptr()  # the cache itself, not a copy
    got = allowed(call.bias, batch * lq, total)
    dense = mask.dense(batch, lq, lk)
    expected = torch.zeros(batch * lq, total, dtype=torch.bool)
    keys = call.key[0] if call.key.dim() == 4 else call.key[0, :, :, 0]  # (total, Hkv, K)
    for b in range(batch):
        expected[b * lq:(b + 1) * lq, b * max_len:b * max_len + lk] = dense[b]
        # and the key tensor the kernel reads at those slots is row b of the cache
        assert torch.equal(keys[b * max_len:b * max_len + lk], k[b])
    assert torch.equal(got, expected)
    empty = ~dense.any(-1)
    assert (call.empty_rows is None and not empty.any()) or torch.equal(call.empty_rows, empty)


@needs_xf
@pytest.mark.parametrize("pad,lq,lk,max_len", [
    ([0, 2, 5], 7, 7, 7),  # prefill, no cache
    ([0, 2, 5], 7, 7, 16),  # prefill into a cache
    ([3, 0], 1, 9, 16),  # decode step against the cache
    ([0, 6, 4], 3, 8, 10),  # a chunk of 3 queries: some rows see no key (pad > Lk - Lq)
    ([1], 4, 4, 4),  # batch of one
    ([-20, 3], 2, 9, 16),  # pads out of range mean what they mean to the eager mask: none...
    ([12, 2**40], 2, 9, 16),  # ...and every key
])
def test_padded_causal_bias_matches_mask(pad, lq, lk, max_len):
    _check_padded(pad, lq, lk, max_len)


@needs_xf
def test_padded_causal_bias_random_shapes():
    g = torch.Generator().manual_seed(0)
    for _ in range(12):
        batch, lk = int(torch.randint(1, 4, (1,), generator=g)), int(torch.randint(1, 10, (1,), generator=g))
        lq = int(torch.randint(1, lk + 1, (1,), generator=g))
        max_len = lk + int(torch.randint(0, 4, (1,), generator=g))
        pad = torch.randint(0, lk, (batch,), generator=g).tolist()
        _check_padded(pad, lq, lk, max_len, hq=2, hkv=int(torch.randint(1, 3, (1,), generator=g)))


@needs_xf
def test_padded_bias_cached_per_mask_and_rebuilt_when_pad_changes():
    pad = torch.tensor([0, 2])
    mask = CausalMask(pad)
    q, k = randn(2, 4, 2, 8), randn(2, 4, 2, 8)
    first = xfb.prepare_attention(q, k, k, mask).bias
    assert xfb.prepare_attention(q, k, k, mask).bias is first
    pad[1] = 3  # in place: the cached bias must not be reused
    again = xfb.prepare_attention(q, k, k, mask)
    assert again.bias is not first and torch.equal(allowed(again.bias, 8, 8)[4:, 4:], mask.dense(2, 4, 4)[1])


# --- the whole tiny model through those paths (CPU) ---------------------------------------------------------------


@pytest.fixture
def simulated(monkeypatch):
    """The xformers implementations registered on the CPU, kernels replaced by references: (name, calls)."""
    return register_simulated_backend(monkeypatch)


# every fallback the model may take, by operator: the reasons the backend declares
EXPECTED_FALLBACKS = {"rope": "one position per token", "cache": "one position per token", "mlp": "no GELU"}


def check_fallbacks(fallbacks, allowed_fallbacks):
    for fb in fallbacks:
        assert fb.operator in allowed_fallbacks, str(fb)
        assert any(allowed_fallbacks[fb.operator] in r for r in fb.reasons), str(fb)


def compare_model(model, inputs, backend, tol, new_tokens, allowed_fallbacks, exact_tokens=True):
    model.set_backends("eager")
    keep = inputs["attention_mask"].bool() if "attention_mask" in inputs else slice(None)
    ref = checks.logits(model, **inputs)[keep]
    ref_ids = model.generate(**inputs, max_new_tokens=new_tokens)
    model.set_backends(backend, fallback="eager")
    out = checks.logits(model, **inputs)[keep]
    ids = model.generate(**inputs, max_new_tokens=new_tokens)
    check_fallbacks(model.fallbacks, allowed_fallbacks)
    assert rel_err(out, ref) <= tol
    start = inputs["input_ids"].shape[1]
    if exact_tokens:
        assert ids.tolist() == ref_ids.tolist()
    else:  # bf16 may flip a near-tie later on; the first token is decided by the prefill logits
        assert ids[:, start].tolist() == ref_ids[:, start].tolist()


@needs_xf
def test_tiny_model_through_simulated_xformers(simulated):
    name, calls = simulated
    model = checks.perturbed("tiny", torch.float32, device="cpu")
    compare_model(model, demo_prompt(model.cfg), name, 1e-4, 6, EXPECTED_FALLBACKS)
    compare_model(model, checks.padded_batch(), name, 1e-4, 6, EXPECTED_FALLBACKS)
    # every operator of an inference forward ran on the xformers paths (the loss needs labels; xFormers has none)
    assert all(calls[op] > 0 for op in OPERATORS if op != "loss"), calls


@needs_xf
def test_training_through_simulated_xformers_attention(simulated):
    """Attention trains on xformers (memory_efficient_attention's autograd, through the backend's layouts and
    biases); norm, rope and mlp declare no backward and go to eager, as does the loss xFormers does not have."""
    from tests.model.test_training import assert_grads_match, loss_and_grads, training_batch

    name, calls = simulated
    model = checks.perturbed("tiny", torch.float32, device="cpu")
    batch = training_batch()
    ref_loss, ref_grads = loss_and_grads(model, batch)
    ref_grads = {n: g.clone() for n, g in ref_grads.items()}
    model.set_backends(name, fallback="eager")
    loss, grads = loss_and_grads(model, batch)
    assert calls["attention"] > 0
    assert rel_err(loss, ref_loss) <= 1e-5
    assert_grads_match(grads, ref_grads, 1e-4)
    refused = {fb.operator for fb in model.fallbacks if any("no backward" in r for r in fb.reasons)}
    assert refused == {"norm", "rope", "mlp"}
    assert not any(fb.operator == "attention" for fb in model.fallbacks)


@needs_xf
def test_cache_continuation_through_simulated_xformers(simulated):
    """A forward with use_cache, continued with past_key_values, gives one whole forward's logits on xformers'
    cache and attention (host lengths: what they take)."""
    name, calls = simulated
    model = checks.perturbed("tiny", torch.float32, device="cpu")
    inputs = checks.padded_batch()
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    model.set_backends(name, fallback="eager")
    with torch.no_grad():
        full = model(ids, mask).logits
        first = model(ids[:, :8], mask[:, :8], use_cache=True)
        rest = model(ids[:, 8:], mask, past_key_values=first.past_key_values)
    assert calls["cache"] > 0 and calls["attention"] > 0
    assert not any(fb.operator in ("cache", "attention") for fb in model.fallbacks)
    keep = mask.bool()
    assert rel_err(torch.cat([first.logits, rest.logits], 1)[keep], full[keep]) <= 1e-5


# --- availability -------------------------------------------------------------------------------------------------


def test_backend_registered_and_reasons_here():
    backend = get_backend("xformers")
    assert backend.name == "xformers" and backend.priority == 10
    reasons = backend.unavailable_reasons()
    if not HAS_XF:
        assert reasons == [installed.STATUS.missing]
    elif not CUDA:
        assert reasons[0].startswith("no CUDA device")
        if installed.STATUS.extension:
            assert reasons[1] == installed.STATUS.extension
    with pytest.raises(BackendUnsupportedError, match="unavailable") if reasons else contextlib.nullcontext():
        resolve_plan("xformers")


@needs_xf
@pytest.mark.skipif(installed.STATUS.extension is None, reason="xformers' compiled extension loads here")
def test_broken_extension_reports_xformers_explanation(capsys):
    # The real situation on CI: the wheel's _C was built for another torch/python. Its own words are reported.
    text = installed.STATUS.extension
    assert text.startswith("xformers' compiled extension did not load: ")
    assert str(installed.XF.xformers._cpp_lib._cpp_library_load_exception).split("\n")[0] in text
    from qvl.cli import cmd_backends

    cmd_backends(None)
    assert "xformers' compiled extension did not load" in capsys.readouterr().out


@needs_xf
def test_extension_explanation_from_xformers(monkeypatch):
    class Broken(Exception):
        def __str__(self):
            return "xFormers can't load C++/CUDA extensions. xFormers was built for:\n    PyTorch 9.9"

    monkeypatch.setattr(installed.XF.xformers._cpp_lib, "_cpp_library_load_exception", Broken())
    assert installed.extension_problem(installed.XF) == (
        "xformers' compiled extension did not load: xFormers can't load C++/CUDA extensions. xFormers was built "
        "for: PyTorch 9.9")
    monkeypatch.setattr(installed.XF.xformers._cpp_lib, "_cpp_library_load_exception", None)
    monkeypatch.setattr(installed.XF.xformers, "_has_cpp_library", True)
    assert installed.extension_problem(installed.XF) is None


def _reload(monkeypatch):
    """Run the import-time probing again (installed.load()) and build the backend on its outcome."""
    status, mods = installed.load()
    monkeypatch.setattr(installed, "STATUS", status)
    monkeypatch.setattr(installed, "XF", mods)
    return xfb.make_backend()


def _hide_xformers(monkeypatch):
    for name in [m for m in sys.modules if m == "xformers" or m.startswith("xformers.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "xformers", None)  # `import xformers` now fails as if not installed


def test_not_installed_is_a_reason_everywhere(monkeypatch, capsys):
    _hide_xformers(monkeypatch)
    backend = _reload(monkeypatch)
    reason = "xformers is not installed (pip install xformers)"
    assert installed.XF is None and installed.STATUS.missing == reason
    assert backend.unavailable_reasons() == [reason]
    # through the registry: `qvl backends`, an explicit choice, and a fallback
    monkeypatch.delitem(registry._LAZY, "xformers", raising=False)
    monkeypatch.setitem(registry._BACKENDS, "xformers", backend)
    from qvl.cli import cmd_backends

    cmd_backends(None)
    assert reason in capsys.readouterr().out
    with pytest.raises(BackendUnsupportedError, match="not installed"):
        resolve_plan("xformers")
    ops = Ops(resolve_plan({"attention": "xformers"}, fallback="eager"))
    q = randn(1, 4, 2, 8)
    ops.attention(q, q, q, CausalMask())
    assert ops.fallbacks and reason in ops.fallbacks[0].reasons


def test_failing_import_is_a_reason(monkeypatch):
    _hide_xformers(monkeypatch)
    monkeypatch.delitem(sys.modules, "xformers")

    class Exploding:
        def find_spec(self, name, path=None, target=None):
            if name == "xformers":
                raise RuntimeError("undefined symbol: _ZN2at4cuda")
            return None

    monkeypatch.setattr(sys, "meta_path", [Exploding()] + sys.meta_path)
    status, mods = installed.load()
    assert mods is None and status.missing == "xformers failed to import: RuntimeError: undefined symbol: _ZN2at4cuda"


@needs_xf
def test_per_operator_reasons_with_cuda_but_no_extension(monkeypatch):
    """On a GPU with a broken extension: attention is off with xFormers' words; Triton ops and swiglu run."""
    ext = "xformers' compiled extension did not load: xFormers can't load C++/CUDA extensions."
    monkeypatch.setattr(installed, "STATUS", installed.Status(version="0.0.35", extension=ext))
    backend = xfb.make_backend()
    assert backend.unavailable_reasons() == [] and "attention off" in backend.note()
    attention = CallInfo("attention", "cuda", torch.bfloat16, (("gqa", 2), ("head_dim", 128), ("mask", "causal"),
                                                                 ("padded", False)))
    assert backend.reasons(attention) == [f"memory_efficient_attention needs the compiled extension: {ext}"]
    norm = CallInfo("norm", "cuda", torch.bfloat16, (("hidden", 2048), ("residual", True)))
    mlp = CallInfo("mlp", "cuda", torch.bfloat16, (("activation", "swiglu"), ("bias", False)))
    assert backend.reasons(norm) == [] and backend.reasons(mlp) == []
    monkeypatch.setattr(installed, "STATUS",
                        installed.Status(version="0.0.35", triton="XFORMERS_FORCE_DISABLE_TRITON=1 ..."))
    backend = xfb.make_backend()
    assert backend.reasons(norm) == ["XFORMERS_FORCE_DISABLE_TRITON=1 ..."] and "norm/rope/cache off" in backend.note()


@needs_xf
def test_no_cuda_and_dtype_reasons(monkeypatch):
    monkeypatch.setattr(installed, "STATUS", installed.Status(version="0.0.35", cuda="no CUDA device (x)"))
    assert xfb.make_backend().unavailable_reasons() == ["no CUDA device (x)"]
    monkeypatch.setattr(installed, "STATUS",
                        installed.Status(version="0.0.35", cuda="no CUDA device (x)", extension="ext"))
    assert xfb.make_backend().unavailable_reasons() == ["no CUDA device (x)", "ext"]
    call = CallInfo("norm", "cpu", torch.float64, (("hidden", 8), ("residual", False)))
    reasons = xfb.XformersNorm().not_supported_reasons(call)
    assert any("device cpu not supported" in r for r in reasons) and any("dtype float64" in r for r in reasons)


@pytest.fixture
def fresh_probe():
    """probe_attention's cache emptied before and after the test (the test changes what it would answer)."""
    xfb.probe_attention.cache_clear()
    yield xfb.probe_attention
    xfb.probe_attention.cache_clear()


def probe_call(mask="causal", padded=True):
    return CallInfo("attention", "cpu", torch.float32, (("gqa", 2), ("head_dim", 64), ("mask", mask),
                                                         ("padded", padded)))


@needs_xf
@pytest.mark.parametrize("torch_build", ["this one", "cuda"])
def test_attention_probe_turns_xformers_dispatch_refusal_into_a_reason(monkeypatch, fresh_probe, torch_build):
    # On the CPU every forward kernel of xFormers refuses: the probe (same layout and bias as the real call,
    # each kernel asked through its public not_supported_reasons) must report that as one line naming every
    # kernel and its reasons rather than crash. On a GPU the same probe decides dtype/bias support.
    if torch_build == "cuda":  # the kernels a CUDA build of torch gets: flash3, flash, cutlass
        monkeypatch.setattr(torch.version, "cuda", "12.8")
    ops = xfb.forward_ops()
    assert ops  # this release exports the kernel classes the probe asks
    for mask, padded in (("causal", True), ("causal", False), ("block_diagonal", False)):
        (reason,) = fresh_probe(probe_call(mask, padded))
        assert reason.startswith("memory_efficient_attention has no kernel for these inputs: `") and "\n" not in reason
        for op in ops:
            assert f"`{op.NAME}` is not supported because: " in reason and "device=cpu" in reason


@needs_xf
def test_attention_probe_asks_the_backward_kernels_for_a_call_that_needs_gradients(monkeypatch, fresh_probe):
    """Forward kernels that take the call are not enough when it needs gradients: a backward kernel must too."""
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    backward_ops = xfb.forward_ops("BwOp")  # this release's; on the CPU every one refuses
    assert backward_ops
    takes_all = type("TakesAll", (), {"not_supported_reasons": staticmethod(lambda inputs: [])})
    monkeypatch.setattr(xfb.attention, "forward_ops", lambda kind="FwOp": [takes_all] if kind == "FwOp"
                        else backward_ops)
    assert fresh_probe(probe_call()) == ()  # inference: a forward kernel is enough
    grad = CallInfo("attention", "cpu", torch.float32, probe_call().features + (("grad", True),))
    (reason,) = fresh_probe(grad)
    assert reason.startswith("no backward: memory_efficient_attention has no backward kernel for these inputs: `")
    assert all(f"`{op.NAME}` is not supported because: " in reason for op in backward_ops)


@needs_xf
def test_attention_probe_skips_missing_kernels_and_lets_the_call_decide_when_it_breaks(monkeypatch, fresh_probe):
    fmha = installed.XF.fmha
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    # a release without flash3 and flash: the probe asks what is there
    monkeypatch.setattr(installed.XF, "fmha", types.SimpleNamespace(Inputs=fmha.Inputs, cutlass=fmha.cutlass))
    assert xfb.forward_ops() == [fmha.cutlass.FwOp]
    (reason,) = fresh_probe(probe_call())
    assert "`cutlassF" in reason and "fa2F" not in reason
    # no kernel class it knows, or no Inputs to ask with: the real call decides
    for broken in (types.SimpleNamespace(Inputs=fmha.Inputs), types.SimpleNamespace(cutlass=fmha.cutlass)):
        monkeypatch.setattr(installed.XF, "fmha", broken)
        fresh_probe.cache_clear()
        assert fresh_probe(probe_call()) == ()


# --- on a CUDA GPU ------------------------------------------------------------------------------------------------

def _gpu_allowed_fallbacks(dtype):
    allowed_fallbacks = dict(EXPECTED_FALLBACKS)
    if installed.STATUS.extension:
        allowed_fallbacks["attention"] = "compiled extension"
    elif dtype == torch.float32:
        allowed_fallbacks["attention"] = "no kernel"  # padded causal attention in float32
    return allowed_fallbacks


@needs_gpu
@needs_xf
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-3), (torch.bfloat16, 3e-2)])
def test_gpu_tiny_model_xformers_with_eager_fallback(dtype, tol):
    model = checks.perturbed("tiny", dtype, device="cuda")
    exact = dtype == torch.float32
    compare_model(model, demo_prompt(model.cfg), "xformers", tol, 10, _gpu_allowed_fallbacks(dtype), exact)
    compare_model(model, checks.padded_batch(), "xformers", tol, 10, _gpu_allowed_fallbacks(dtype), exact)


@needs_gpu
@needs_xf
@pytest.mark.xdist_group("3b")
def test_gpu_3b_bf16_xformers_with_eager_fallback():
    """The 3b preset with random bf16 weights on xformers (what it cannot run on eager), held to float32."""
    model = checks.perturbed("3b", torch.bfloat16)
    fallbacks = checks.assert_as_close_to_float32_as_eager(model, demo_prompt(model.cfg), "xformers", "eager")
    check_fallbacks(fallbacks, _gpu_allowed_fallbacks(torch.bfloat16))  # attention and norm: on xformers
