"""The LM head fused with cross-entropy (the `loss` operator), without ever holding the (N, V) logits.

For hidden (N, H), weight (V, H), targets (N,) and a divisor d (the count of counted tokens when None):

    logits = hidden weight^T                      (in hidden's dtype, rounded as F.linear rounds)
    loss   = sum over counted rows of (logsumexp(logits_row) - logits_row[target]) / d     (float32 math)
    dloss/dlogits = (softmax(logits_row) - onehot(target)) / d     (0 for rows whose target is IGNORE_INDEX)

The tokens are walked in chunks of rows. For each chunk, a torch matmul makes the chunk's logits; one Triton
program per row then reads its row twice in vocabulary blocks (the online max and sum of exp, then the softmax)
and overwrites the logits with their gradient in hidden's dtype; two more matmuls turn that into the chunk's
share of the gradients of hidden and weight. All of it runs in the forward (Liger-Kernel's fused linear
cross-entropy): the gradients are ready when the loss is, and backward only scales them by its grad_output.
Only one chunk of logits exists at a time; the price is a (V, H) gradient of the weight held from forward to
backward, and, across several chunks, a float32 accumulator for it.

The divisor stays on the device (a 0-dim float32 tensor the kernel reads): counting the targets never
synchronizes with the host. Target values are not range-checked (that would synchronize): an id outside
[0, V) other than IGNORE_INDEX reads no memory, and its row counts logsumexp alone.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backends.interface import IGNORE_INDEX, needs_grad
from . import INTERPRETED, cdiv, next_power_of_2
from .common import to_storage

# The most logits one chunk holds (elements): 2^27 is 256 MiB in bf16, about 880 rows of Qwen2.5-VL's 151,936-word
# vocabulary. Large enough that each chunk's matmuls fill the GPU and few chunks add into the float32 gradient of
# the weight (each addition is a pass over V x H floats); small next to the (V, H) gradients held anyway.
CHUNK_LOGITS = 1 << 27
# Vocabulary block of the per-row kernel: 16 floats per thread at 8 warps. Small under the interpreter, so tests
# with vocabularies of a few hundred words cross several blocks and a masked tail (the interpreter's time grows
# with the number of blocks: the tiny preset's 1024 words take 8).
BLOCK_V = 128 if INTERPRETED else 4096
NUM_WARPS = 8


@triton.jit
def _cross_entropy_rows_kernel(
    logits_ptr, logits_row_stride, targets_ptr, targets_stride, losses_ptr, divisor_ptr,
    vocab,
    IGNORE: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    NUM_BLOCKS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One row of logits: losses[row] = logsumexp - logits[target] (0 when ignored); with COMPUTE_GRAD, the row is
    overwritten with (softmax - onehot(target)) / divisor, in the logits' dtype (zeros when ignored)."""
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride exceeds 2^31 for a chunk of 151,936-word rows
    logits_row = logits_ptr + row * logits_row_stride
    STORE_DTYPE: tl.constexpr = logits_ptr.dtype.element_ty
    offs = tl.arange(0, BLOCK)
    target = tl.load(targets_ptr + row * targets_stride).to(tl.int32)
    counted = target != IGNORE

    # Pass 1: the running max and the sum of exp against it. Every block holds at least one real logit, so the
    # max is finite after the first block and exp(row_max - new_max) never sees -inf - -inf.
    row_max = -float("inf")
    row_sum = 0.0
    for block in range(NUM_BLOCKS):  # a constexpr trip count: see qvl.kernels.WHILE_LOOP
        cols = block * BLOCK + offs
        x = tl.load(logits_row + cols, mask=cols < vocab, other=-float("inf")).to(tl.float32)
        new_max = tl.maximum(row_max, tl.max(x, axis=0))
        row_sum = row_sum * tl.exp(row_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
        row_max = new_max
    lse = row_max + tl.log(row_sum)

    in_vocab = counted & (target >= 0) & (target < vocab)
    target_logit = tl.load(logits_row + target, mask=in_vocab, other=0.0).to(tl.float32)
    tl.store(losses_ptr + row, tl.where(counted, lse - target_logit, 0.0))

    if COMPUTE_GRAD:
        # Pass 2: the gradient, written over the logits it is computed from (each element is read before written).
        scale = tl.where(counted, 1.0 / tl.load(divisor_ptr).to(tl.float32), 0.0)
        for block in range(NUM_BLOCKS):
            cols = block * BLOCK + offs
            mask = cols < vocab
            x = tl.load(logits_row + cols, mask=mask, other=0.0).to(tl.float32)
            grad = tl.exp(x - lse) - tl.where(cols == target, 1.0, 0.0)
            tl.store(logits_row + cols, to_storage(grad * scale, STORE_DTYPE), mask=mask)


def _chunk_rows(vocab: int) -> int:
    return max(1, CHUNK_LOGITS // max(vocab, 1))


def _row_losses(logits: torch.Tensor, targets: torch.Tensor, losses: torch.Tensor, divisor: torch.Tensor,
                compute_grad: bool) -> None:
    """The kernel over a chunk of logits (rows, V): row losses into `losses`; with compute_grad, the logits become
    their gradient."""
    vocab = logits.shape[1]
    block = min(BLOCK_V, next_power_of_2(vocab))
    _cross_entropy_rows_kernel[(logits.shape[0],)](
        logits, logits.stride(0), targets, targets.stride(0), losses, divisor,
        vocab,
        IGNORE=IGNORE_INDEX, COMPUTE_GRAD=compute_grad, NUM_BLOCKS=cdiv(vocab, block), BLOCK=block,
        num_warps=NUM_WARPS,
    )


def _divisor_tensor(targets: torch.Tensor, divisor, device: torch.device) -> torch.Tensor:
    """The divisor as a 0-dim float32 tensor on the device, made without reading anything back to the host."""
    if divisor is None:
        return (targets != IGNORE_INDEX).sum().clamp(min=1).to(torch.float32)
    if isinstance(divisor, torch.Tensor):
        return divisor.detach().reshape(()).to(device=device, dtype=torch.float32)
    return torch.full((), float(divisor), dtype=torch.float32, device=device)


def _fused_pass(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, divisor: torch.Tensor,
                grad_hidden_needed: bool, grad_weight_needed: bool):
    """(loss, grad of hidden or None, grad of weight or None), for grad_output 1, chunk by chunk."""
    n, vocab = hidden.shape[0], weight.shape[0]
    compute_grad = grad_hidden_needed or grad_weight_needed
    losses = torch.empty(n, dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty_like(hidden, memory_format=torch.contiguous_format) if grad_hidden_needed else None
    rows = _chunk_rows(vocab)
    single_chunk = n <= rows
    # One chunk: one matmul, rounded once as eager's. Several: their products summed in float32.
    grad_weight = None
    if grad_weight_needed and not single_chunk:
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    for start in range(0, n, rows):
        end = min(start + rows, n)
        hidden_chunk = hidden[start:end]
        logits = torch.mm(hidden_chunk, weight.t())
        _row_losses(logits, targets[start:end], losses[start:end], divisor, compute_grad)
        if grad_hidden_needed:
            torch.mm(logits, weight, out=grad_hidden[start:end])
        if grad_weight_needed:
            grad_weight = _add_weight_grad(grad_weight, logits, hidden_chunk)
    if grad_weight_needed:
        grad_weight = torch.zeros_like(weight) if grad_weight is None else grad_weight.to(weight.dtype)
    return losses.sum() / divisor, grad_hidden, grad_weight


def _add_weight_grad(total: torch.Tensor | None, grad_logits: torch.Tensor, hidden_chunk: torch.Tensor):
    """total + grad_logits^T hidden_chunk, the product made in the inputs' dtype (tensor cores for 16-bit) and
    summed into the float32 total; with no total yet (a single chunk), the product itself."""
    if total is None:
        return torch.mm(grad_logits.t(), hidden_chunk)
    if grad_logits.dtype == torch.float32:
        return total.addmm_(grad_logits.t(), hidden_chunk)
    return total.add_(torch.mm(grad_logits.t(), hidden_chunk))


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, divisor):
        loss, grad_hidden, grad_weight = _fused_pass(hidden, weight, targets, divisor, ctx.needs_input_grad[0],
                                                     ctx.needs_input_grad[1])
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        # Always multiplied: testing grad_output == 1 would read it back to the host.
        return (grad_hidden * grad_output if grad_hidden is not None else None,
                grad_weight * grad_output if grad_weight is not None else None, None, None)


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               divisor: float | torch.Tensor | None = None) -> torch.Tensor:
    """The loss (0-dim float32) of the `loss` operator; see the module docstring for the math.

    hidden (N, H) and weight (V, H) of one float dtype, any strides; targets (N,) integer, IGNORE_INDEX not
    counted; divisor: None (the count of counted targets, at least 1), a number, or a one-element tensor.
    Differentiable in hidden and weight; with autograd off or neither requiring grad, only the loss is computed.
    The inputs are those `check_loss_inputs` (qvl.backends.interface) accepts: not checked again here.
    """
    divisor = _divisor_tensor(targets, divisor, hidden.device)
    if needs_grad(hidden, weight):
        return _FusedLinearCrossEntropy.apply(hidden, weight, targets, divisor)
    loss, _, _ = _fused_pass(hidden, weight, targets, divisor, False, False)
    return loss
