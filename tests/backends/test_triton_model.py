"""The whole model with every operator on the triton backend against eager (interpreted on CPU).

On a GPU the same tests run compiled, and the 3b preset with random bf16 weights is checked as well.
"""

import pytest
import torch

from qvl.backends import get_backend
from qvl.demo import demo_prompt
from tests.backends.model_checks import assert_as_close_to_float32_as_eager, logits, padded_batch, perturbed
from tests.ops.compare import rel_err

triton_reasons = get_backend("triton").unavailable_reasons()
pytestmark = pytest.mark.skipif(bool(triton_reasons), reason=f"triton backend unavailable: {triton_reasons}")

# Every operator on triton; and the same with every projection on the Triton GEMM instead of cuBLAS (the MLP with its
# activation fused).
SPECS = ["triton", "triton,mlp=triton-gemm,linear=triton-gemm"]


def compare(model, inputs, tol, new_tokens, spec):
    model.set_backends("eager")
    ref = logits(model, **inputs)
    ref_ids = model.generate(**inputs, max_new_tokens=new_tokens)
    model.set_backends(spec)  # strict: every operator must run where the spec says
    out = logits(model, **inputs)
    ids = model.generate(**inputs, max_new_tokens=new_tokens)
    assert not model.fallbacks
    assert rel_err(out, ref) <= tol
    return ids, ref_ids


GPU = torch.cuda.is_available()
# Interpreted, every projection of the GEMM spec is a slow kernel (minutes per case on the 2-core CI machine): on the
# CPU it runs in float32 only, over fewer tokens; its bfloat16 numerics are tests/ops' (test_gemm, test_gemv).
CASES = [(SPECS[0], torch.float32, 1e-4), (SPECS[0], torch.bfloat16, 3e-2), (SPECS[1], torch.float32, 1e-4)]
CASES += [(SPECS[1], torch.bfloat16, 3e-2)] if GPU else []


@pytest.mark.parametrize("spec,dtype,tol", CASES)
def test_tiny_image_prompt_all_triton(dtype, tol, spec):
    model = perturbed("tiny", dtype)
    inputs = demo_prompt(model.cfg)
    # bfloat16's greedy tokens may part from eager's: two tokens run its decode path strict, the logits are compared
    exact = dtype == torch.float32
    tokens = (10 if GPU or spec == SPECS[0] else 4) if exact else 2
    ids, ref_ids = compare(model, inputs, tol, new_tokens=tokens, spec=spec)
    if exact:
        assert ids.tolist() == ref_ids.tolist()


def test_tiny_left_padded_batch_all_triton():
    model = perturbed("tiny", torch.float32)
    batch = padded_batch()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    model.set_backends("eager")
    ref = logits(model, ids, attention_mask=mask)[mask.bool()]
    ref_ids = model.generate(ids, attention_mask=mask, max_new_tokens=10)
    model.set_backends("triton")
    assert rel_err(logits(model, ids, attention_mask=mask)[mask.bool()], ref) <= 1e-4
    assert model.generate(ids, attention_mask=mask, max_new_tokens=10).tolist() == ref_ids.tolist()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the 3b preset needs a CUDA GPU")
@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.xdist_group("3b")  # one worker runs the 3b tests in turn: see pyproject.toml
def test_3b_bf16_all_triton(spec):
    model = perturbed("3b", torch.bfloat16)
    fallbacks = assert_as_close_to_float32_as_eager(model, demo_prompt(model.cfg), spec)
    assert not fallbacks  # strict: every operator ran where the spec says


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernels are compiled and auto should take them")
def test_auto_prefers_eager_over_the_interpreter():
    from qvl.backends import CallInfo, Ops, get_backend, resolve_plan

    ops = Ops(resolve_plan("auto"))
    call = CallInfo.of("norm", torch.randn(2, 8), hidden=8, residual=False)
    assert ops._dispatch.select(call) is get_backend("eager").impls["norm"]
    # ...while triton itself would run it: auto chose, the interpreter was not refused.
    assert not get_backend("triton").reasons(call)
