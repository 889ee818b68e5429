"""The `loss` operator (LM head fused with cross-entropy): qvl's chunked Triton kernel (qvl.kernels.cross_entropy)
against the eager reference's autograd (EagerLoss: the whole logits, then F.cross_entropy).

Tolerances. The loss is a float32 sum of per-row (logsumexp - target logit) terms; both sides read the same
logits rounded to the storage dtype, except that the chunked matmul may round a logit one ulp differently from
the full one where the GEMM blocks differently. One ulp moves a row's term by at most |logit| * 2^-8 (bf16),
2^-11 (fp16), 2^-24 (fp32), so the output tolerance of each dtype (TOLERANCE) bounds the loss with room to
spare; the measured errors are far below it (~1e-7 relative: only the float32 summation order differs here).
"""

from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qvl.kernels.cross_entropy as cross_entropy_module
from qvl.backends import IGNORE_INDEX, Ops, resolve_plan
from qvl.backends.eager import EagerLoss
from qvl.kernels import DEVICE_TYPE
from qvl.kernels.cross_entropy import fused_linear_cross_entropy
from tests.ops.compare import DTYPES, assert_close_rel, assert_grads_close

EAGER = EagerLoss()
DIVISOR_KINDS = ["none", "float", "float_tensor", "int_tensor"]


def make_inputs(n, hidden_size, vocab, dtype, seed, ignore_fraction=0.3, layout="contiguous", logit_scale=2.0):
    """hidden (n, H), weight (V, H) and targets (n,) with about `ignore_fraction` IGNORE_INDEX; logits of about
    `logit_scale` standard deviation. layout "row_strided": hidden and targets are strided views (a slice of a
    wider buffer, every other label), as the model's shifted hidden states and labels can be."""
    gen = torch.Generator().manual_seed(seed)
    if layout == "row_strided":
        hidden = torch.randn(n, hidden_size + 7, generator=gen)[:, 3:3 + hidden_size]
        targets = torch.randint(0, vocab, (2 * n,), generator=gen)[::2]
    else:
        hidden = torch.randn(n, hidden_size, generator=gen)
        targets = torch.randint(0, vocab, (n,), generator=gen)
    weight = torch.randn(vocab, hidden_size, generator=gen) * (logit_scale * hidden_size ** -0.5)
    targets[torch.rand(n, generator=gen) < ignore_fraction] = IGNORE_INDEX
    return hidden.to(DEVICE_TYPE, dtype), weight.to(DEVICE_TYPE, dtype), targets.to(DEVICE_TYPE)


def make_divisor(kind, targets, seed):
    """None (the mean over counted tokens), or a gradient-accumulation divisor (transformers' num_items_in_batch):
    a float, or a 0-dim float or integer tensor on the device."""
    counted = int((targets != IGNORE_INDEX).sum())  # host reads are fine in a test
    if kind == "none":
        return None
    if kind == "float":
        return 0.5 + (seed % 7) * 1.25
    if kind == "float_tensor":
        return torch.tensor(counted + 2.5, device=DEVICE_TYPE)
    return torch.tensor(counted + 3, device=DEVICE_TYPE)  # int64, as a count of items


def loss_and_grads(fn, hidden, weight, targets, divisor, grad_scale=1.0, need=("hidden", "weight")):
    """fn's loss and the gradients of hidden and weight (None for those not in `need`) after backward of
    loss * grad_scale, on detached clones of the inputs."""
    hidden = hidden.detach().clone().requires_grad_("hidden" in need)
    weight = weight.detach().clone().requires_grad_("weight" in need)
    loss = fn(hidden, weight, targets, divisor)
    (loss * grad_scale).backward()
    return loss.detach(), [hidden.grad, weight.grad]


def eager_loss(hidden, weight, targets, divisor):
    return EAGER(hidden, weight, targets, divisor)[0]


def assert_matches_eager(hidden, weight, targets, divisor, dtype, grad_scale=1.0, need=("hidden", "weight")):
    loss, grads = loss_and_grads(fused_linear_cross_entropy, hidden, weight, targets, divisor, grad_scale, need)
    ref_loss, ref_grads = loss_and_grads(eager_loss, hidden, weight, targets, divisor, grad_scale, need)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert_close_rel(loss, ref_loss, dtype, what="loss")
    assert_grads_close(grads, ref_grads, ["hidden", "weight"], dtype)


def chunks_of(rows, vocab):
    """The kernel module with chunks of `rows` rows (CHUNK_LOGITS is a budget of logits per chunk)."""
    return mock.patch.object(cross_entropy_module, "CHUNK_LOGITS", rows * vocab)


# --- against eager autograd -----------------------------------------------------------------------------------------


@given(
    n=st.integers(1, 40),
    hidden_size=st.integers(8, 64),
    vocab=st.integers(2, 150).map(lambda k: 2 * k + 1),  # odd, 5..301: a masked tail in the last vocabulary block
    dtype=st.sampled_from(DTYPES),
    divisor_kind=st.sampled_from(DIVISOR_KINDS),
    ignore_fraction=st.sampled_from([0.0, 0.3, 0.9]),
    chunk_rows=st.integers(1, 48),
    layout=st.sampled_from(["contiguous", "row_strided"]),
    grad_scale=st.sampled_from([1.0, 0.25, 3.0]),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=20)
def test_loss_and_grads_match_eager(n, hidden_size, vocab, dtype, divisor_kind, ignore_fraction, chunk_rows, layout,
                                    grad_scale, seed):
    hidden, weight, targets = make_inputs(n, hidden_size, vocab, dtype, seed, ignore_fraction, layout)
    divisor = make_divisor(divisor_kind, targets, seed)
    with chunks_of(chunk_rows, vocab):
        assert_matches_eager(hidden, weight, targets, divisor, dtype, grad_scale)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("divisor_kind", ["none", "int_tensor"])  # the hypothesis test draws every kind
def test_several_chunks(dtype, divisor_kind):
    """23 rows in chunks of 5 (the last one short), a 203-word vocabulary (several blocks and a tail); larger
    logits (scale 6) make a peaked softmax."""
    hidden, weight, targets = make_inputs(23, 40, 203, dtype, seed=1, logit_scale=6.0)
    with chunks_of(5, 203):
        assert_matches_eager(hidden, weight, targets, make_divisor(divisor_kind, targets, seed=1), dtype)


@pytest.mark.parametrize("need", [("hidden",), ("weight",)], ids=["hidden_only", "weight_only"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_one_input_requires_grad(need, dtype):
    """Only the gradient asked for is made; the other input's stays None."""
    hidden, weight, targets = make_inputs(19, 24, 77, dtype, seed=2)
    with chunks_of(4, 77):
        assert_matches_eager(hidden, weight, targets, None, dtype, grad_scale=2.0, need=need)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("divisor_kind", ["none", "float"])
def test_nothing_counted_gives_zero(dtype, divisor_kind):
    """Every target ignored: loss 0 and zero gradients, never 0 / 0."""
    hidden, weight, targets = make_inputs(9, 16, 45, dtype, seed=3, ignore_fraction=1.0)
    assert bool((targets == IGNORE_INDEX).all())
    with chunks_of(4, 45):
        loss, (grad_hidden, grad_weight) = loss_and_grads(fused_linear_cross_entropy, hidden, weight, targets,
                                                          make_divisor(divisor_kind, targets, seed=3))
    assert loss.item() == 0.0
    assert grad_hidden.dtype == dtype and grad_weight.dtype == dtype
    assert not grad_hidden.any() and not grad_weight.any()


def test_no_rows():
    """An empty batch: loss 0 and zero gradients, like eager's sum over nothing."""
    hidden, weight, targets = make_inputs(0, 16, 45, torch.float32, seed=4)
    loss, (grad_hidden, grad_weight) = loss_and_grads(fused_linear_cross_entropy, hidden, weight, targets, None)
    assert loss.item() == 0.0 and grad_hidden.shape == (0, 16) and not grad_weight.any()


@pytest.mark.parametrize("mode", ["no_grad", "inputs_without_grad"])
def test_inference_computes_only_the_loss(mode):
    """With autograd off, or no input requiring grad, the loss comes without a graph, and the chunk pass makes no
    gradient buffers (it is asked for neither gradient)."""
    hidden, weight, targets = make_inputs(13, 32, 99, torch.bfloat16, seed=5)
    if mode == "no_grad":
        hidden.requires_grad_()
        weight.requires_grad_()
    spy = mock.patch.object(cross_entropy_module, "_fused_pass", wraps=cross_entropy_module._fused_pass)
    with spy as fused_pass, torch.set_grad_enabled(mode != "no_grad"):
        loss = fused_linear_cross_entropy(hidden, weight, targets)
    assert loss.grad_fn is None and not loss.requires_grad
    assert [call.args[4:] for call in fused_pass.call_args_list] == [(False, False)]
    assert_close_rel(loss, eager_loss(hidden.detach(), weight.detach(), targets, None), torch.bfloat16, what="loss")


# The ways a tensor's value reaches Python: each one synchronizes with a GPU.
HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")
_ORIGINAL_READS = {name: getattr(torch.Tensor, name) for name in HOST_READS}


def _refuse_host_read(*args, **kwargs):
    raise AssertionError("a tensor was read back to the host")


def test_divisor_never_read_on_the_host():
    """The count of counted tokens and a tensor divisor stay on the device: neither the launcher nor its autograd
    Function (forward and backward) converts a tensor to a Python value. The Triton launch itself may (the
    interpreter copies its arguments to numpy; compiled, a launch passes pointers)."""
    hidden, weight, targets = make_inputs(11, 16, 37, torch.float32, seed=6)
    launch = cross_entropy_module._row_losses

    def launch_with_reads_allowed(*args):
        with mock.patch.multiple(torch.Tensor, **_ORIGINAL_READS):
            return launch(*args)

    for divisor in (None, torch.tensor(4.0, device=DEVICE_TYPE)):
        hidden_leaf, weight_leaf = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with chunks_of(3, 37), mock.patch.object(cross_entropy_module, "_row_losses", launch_with_reads_allowed), \
                mock.patch.multiple(torch.Tensor, **dict.fromkeys(HOST_READS, _refuse_host_read)):
            loss = fused_linear_cross_entropy(hidden_leaf, weight_leaf, targets, divisor)
            loss.backward()
        assert hidden_leaf.grad is not None and weight_leaf.grad is not None


# --- the eager reference itself --------------------------------------------------------------------------------------


@pytest.mark.parametrize("divisor", [None, 2.5], ids=["mean", "divisor"])
def test_eager_reference_gradcheck(divisor):
    """EagerLoss's gradients in float64 against finite differences (the reference every test above trusts).

    EagerLoss takes the cross-entropy of float32(logits), float64 ones included, so the loss carries float32
    rounding (~1e-7): gradcheck's default step (1e-6) would difference noise. A step of 1e-2 keeps both that
    noise and the truncation error near 5e-5 at most (measured over seeds); atol 5e-4 leaves a 10x margin while
    a wrong gradient (order 1e-1 here) still fails."""
    hidden, weight, targets = make_inputs(5, 4, 7, torch.float64, seed=7, ignore_fraction=0.0)
    targets[1] = IGNORE_INDEX
    hidden.requires_grad_()
    weight.requires_grad_()
    assert torch.autograd.gradcheck(lambda h, w: eager_loss(h, w, targets, divisor), (hidden, weight),
                                    eps=1e-2, atol=5e-4, rtol=1e-3)


# --- through the registry -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_backend_loss(dtype):
    """`Ops(resolve_plan("triton")).loss` runs the chunked kernel: (loss, None), the logits never made in full."""
    hidden, weight, targets = make_inputs(17, 32, 131, dtype, seed=8)
    ops = Ops(resolve_plan("triton"))

    def triton_loss(hidden, weight, targets, divisor):
        loss, logits = ops.loss(hidden, weight, targets, divisor)
        assert logits is None
        return loss

    for divisor in (None, torch.tensor(9.0, device=DEVICE_TYPE)):
        loss, grads = loss_and_grads(triton_loss, hidden, weight, targets, divisor)
        ref_loss, ref_grads = loss_and_grads(eager_loss, hidden, weight, targets, divisor)
        assert_close_rel(loss, ref_loss, dtype, what="loss")
        assert_grads_close(grads, ref_grads, ["hidden", "weight"], dtype)
        with torch.no_grad():
            loss, logits = ops.loss(hidden, weight, targets, divisor)
        assert logits is None and loss.grad_fn is None
        assert_close_rel(loss, ref_loss, dtype, what="loss under no_grad")
