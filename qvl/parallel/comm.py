"""The collectives a tensor-parallel model calls, with the gradients Megatron-style parallelism needs.

Every rank runs the same layers on the same replicated activations; only the weights are split. So:

    to_ranks(x)        before a column-parallel matmul: x is used by every rank, so its gradient is the sum of
                       the ranks' partial gradients (forward: identity; backward: all-reduce)
    from_ranks(x)      after a row-parallel matmul: the ranks' partial outputs summed (forward: all-reduce;
                       backward: identity, each rank's gradient of the sum is the replicated gradient)
    gather(x, dim)     the ranks' pieces of a tensor side by side (logits over the vocabulary, attention weights
                       over heads); backward keeps this rank's piece of the gradient
    replicated_rows    a weight's rows that several ranks hold (a KV head replicated when tp exceeds the KV
                       heads): their gradients summed over those ranks
    vocab_cross_entropy  cross-entropy over logits split along the vocabulary, without gathering them

torch.distributed.nn.functional's differentiable collectives sum the gradients of replicated outputs over ranks
(right when each rank's loss differs, tp times too large here), hence these functions. With `parallel` None
(one process) each is the identity. Without autograd recording they call the in-place collectives, which a CUDA
graph captures.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..backends import IGNORE_INDEX
from .group import TensorParallel


def _all_reduce(x: torch.Tensor, parallel: TensorParallel, op=dist.ReduceOp.SUM) -> torch.Tensor:
    dist.all_reduce(x, op=op, group=parallel.group)
    return x


def _all_gather(x: torch.Tensor, dim: int, parallel: TensorParallel) -> torch.Tensor:
    pieces = [torch.empty_like(x) for _ in range(parallel.size)]
    dist.all_gather(pieces, x.contiguous(), group=parallel.group)
    return torch.cat(pieces, dim)


class _ToRanks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, parallel):
        ctx.parallel = parallel
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad.clone(memory_format=torch.contiguous_format), ctx.parallel), None


class _FromRanks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, parallel):
        return _all_reduce(x.clone(memory_format=torch.contiguous_format), parallel)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, parallel):
        ctx.dim, ctx.parallel, ctx.size = dim, parallel, x.shape[dim]
        return _all_gather(x, dim, parallel)

    @staticmethod
    def backward(ctx, grad):
        return grad.narrow(ctx.dim, ctx.parallel.rank * ctx.size, ctx.size), None, None


class _SumGradsFrom(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, first, group):
        ctx.first, ctx.group = first, group
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad[ctx.first:], group=ctx.group)
        return grad, None, None


def _records(x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad


def to_ranks(x: torch.Tensor, parallel: TensorParallel | None) -> torch.Tensor:
    """x, replicated, entering a column-parallel layer (see the module docstring)."""
    return x if parallel is None or not _records(x) else _ToRanks.apply(x, parallel)


def from_ranks(x: torch.Tensor, parallel: TensorParallel | None) -> torch.Tensor:
    """The sum over ranks of a row-parallel layer's partial output."""
    if parallel is None:
        return x
    return _FromRanks.apply(x, parallel) if _records(x) else _all_reduce(x.contiguous(), parallel)


def replicated_rows(weight: torch.Tensor, first: int, group: dist.ProcessGroup | None) -> torch.Tensor:
    """`weight`, whose rows from `first` on are replicated over `group` (a KV head several ranks hold): their
    gradient is summed over it, since each rank's is only its own query heads' share. Forward: identity."""
    return weight if group is None or not _records(weight) else _SumGradsFrom.apply(weight, first, group)


def gather(x: torch.Tensor, dim: int, parallel: TensorParallel | None) -> torch.Tensor:
    """The ranks' equal-sized pieces of a tensor, concatenated along `dim` in rank order."""
    if parallel is None:
        return x
    return _Gather.apply(x, dim % x.dim(), parallel) if _records(x) else _all_gather(x, dim % x.dim(), parallel)


class _VocabCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of (N, V / tp) logit pieces against (N,) targets over the whole vocabulary: the
    maximum, the sum of exponentials and the target's logit are each all-reduced (Megatron's vocab-parallel
    cross-entropy), so no rank holds (N, V)."""

    @staticmethod
    def forward(ctx, logits, targets, first, parallel):
        ctx.dtype = logits.dtype
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # float64 stays (gradcheck)
        top = _all_reduce(logits.amax(-1), parallel, dist.ReduceOp.MAX)
        shifted = logits - top[:, None]
        exp = shifted.exp()
        total = _all_reduce(exp.sum(-1), parallel)
        counted = targets != IGNORE_INDEX
        local = targets - first
        here = counted & (local >= 0) & (local < logits.shape[-1])
        index = torch.where(here, local, 0)
        target_logit = torch.where(here, shifted.gather(-1, index[:, None]).squeeze(-1), 0.0)
        target_logit = _all_reduce(target_logit, parallel)
        loss = torch.where(counted, total.log() - target_logit, 0.0)
        ctx.save_for_backward(exp, total, index, here, counted)
        return loss.sum()

    @staticmethod
    def backward(ctx, grad):
        exp, total, index, here, counted = ctx.saved_tensors
        probs = exp / total[:, None]
        probs.scatter_add_(-1, index[:, None], -here.to(probs.dtype)[:, None])
        probs *= (counted.to(probs.dtype) * grad)[:, None]
        return probs.to(ctx.dtype), None, None, None


def vocab_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, first: int,
                        parallel: TensorParallel) -> torch.Tensor:
    """Summed float32 cross-entropy (IGNORE_INDEX not counted) of `logits`, this rank's vocabulary columns
    starting at id `first`; the same value on every rank. Its gradient lands in the rank's logit piece only."""
    return _VocabCrossEntropy.apply(logits, targets.long(), first, parallel)


def gather_rows(x: torch.Tensor, rows: list[int], parallel: TensorParallel) -> torch.Tensor:
    """Each rank's (rows[rank], ...) tensor, concatenated in rank order, on every rank (no gradient: the ranks'
    pieces differ in length, so each is padded to the longest for the all-gather and cut back)."""
    longest = max(rows)
    padded = x.new_zeros((longest, *x.shape[1:]))
    padded[: x.shape[0]] = x
    pieces = [torch.empty_like(padded) for _ in range(parallel.size)]
    dist.all_gather(pieces, padded, group=parallel.group)
    return torch.cat([piece[:n] for piece, n in zip(pieces, rows, strict=True)])
