"""Parameter holders shared by both towers. They own weights; the math runs through `Ops`."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from ..parallel.comm import from_ranks, to_ranks
from ..parallel.group import TensorParallel
from ..parallel.shard import LocalSizes


class RMSNorm(nn.Module):
    """Holds an RMSNorm weight and epsilon; apply with ``ops.norm(x, norm.weight, norm.eps)`` or, after a
    residual add, ``norm.add_and_norm(ops, hidden, residual)``."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def add_and_norm(self, ops, hidden: torch.Tensor, residual: torch.Tensor | None):
        """(norm(hidden + residual), hidden + residual): a residual add fused into the norm that follows it,
        one `ops.norm` call. With residual None (before the first block) the stream is `hidden` itself."""
        if residual is None:
            return ops.norm(hidden, self.weight, self.eps), hidden
        return ops.norm(hidden, self.weight, self.eps, residual)


class LayerNorm(nn.Module):
    """Holds a LayerNorm's weight, bias and epsilon (Qwen2-VL's vision tower); applied as RMSNorm is, through
    ``ops.norm`` with the bias (which makes the norm a LayerNorm)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def add_and_norm(self, ops, hidden: torch.Tensor, residual: torch.Tensor | None):
        """(norm(hidden + residual), hidden + residual), as `RMSNorm.add_and_norm`."""
        if residual is None:
            return ops.norm(hidden, self.weight, self.eps, bias=self.bias), hidden
        return ops.norm(hidden, self.weight, self.eps, residual, bias=self.bias)


class VocabEmbedding(nn.Embedding):
    """The token embedding. Under tensor parallelism a rank holds the rows of ids [vocab_first, vocab_first +
    vocab_rows): it looks up the ids it holds, zeros for the others, and the ranks' lookups are summed. `weight` is
    then the rank's rows."""

    def __init__(self, hidden_size: int, sizes: LocalSizes, parallel: TensorParallel | None = None):
        super().__init__(sizes.vocab_rows, hidden_size)
        self.first, self.parallel = sizes.vocab_first, parallel

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.parallel is None:
            return super().forward(ids)
        local = ids - self.first
        elsewhere = (local < 0) | (local >= self.num_embeddings)
        rows = F.embedding(local.masked_fill(elsewhere, 0), self.weight).masked_fill(elsewhere[..., None], 0.0)
        return from_ranks(rows, self.parallel)


class SwiGLUMLP(nn.Module):
    """SiLU(x W_gate^T) * (x W_up^T), then the down projection; gate and up stacked in one weight [gate; up].
    The text decoder's MLP has no biases, the vision blocks' have.

    Under tensor parallelism (`parallel`) a rank holds its share of the inner width: gate/up column-parallel, down
    row-parallel, the partial outputs summed over the ranks, and the down bias (whole on every rank) added once
    after the sum."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool, parallel: TensorParallel | None = None):
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=bias)  # [gate; up]
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.parallel = parallel

    def forward(self, ops, x: torch.Tensor) -> torch.Tensor:
        return _mlp(ops, x, self.gate_up_proj, self.down_proj, "swiglu", self.parallel)


class PlainMLP(nn.Module):
    """fc2(activation(fc1(x))) with biases, the activation one of the `mlp` operator's (Qwen2-VL's vision blocks:
    "quick_gelu"). Under tensor parallelism split as `SwiGLUMLP`: fc1 column-parallel, fc2 row-parallel."""

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str,
                 parallel: TensorParallel | None = None):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, intermediate_size, bias=True)
        self.fc2 = nn.Linear(intermediate_size, hidden_size, bias=True)
        self.activation = activation
        self.parallel = parallel

    def forward(self, ops, x: torch.Tensor) -> torch.Tensor:
        return _mlp(ops, x, self.fc1, self.fc2, self.activation, self.parallel)


def _mlp(ops, x: torch.Tensor, first: nn.Linear, second: nn.Linear, activation: str,
         parallel: TensorParallel | None) -> torch.Tensor:
    """The `mlp` operator; under tensor parallelism without the second layer's bias, the ranks' outputs summed,
    then the bias (whole on every rank) added once."""
    if parallel is None:
        return ops.mlp(x, first.weight, first.bias, second.weight, second.bias, activation)
    out = ops.mlp(to_ranks(x, parallel), first.weight, first.bias, second.weight, None, activation)
    return with_bias(from_ranks(out, parallel), second.bias)


def row_parallel_linear(ops, x: torch.Tensor, layer: nn.Linear, parallel: TensorParallel | None) -> torch.Tensor:
    """`layer(x)` for a row-parallel layer, on the `linear` operator: the ranks' partial products summed, then
    the bias added once."""
    if parallel is None:
        return ops.linear(x, layer.weight, layer.bias)
    return with_bias(from_ranks(ops.linear(x, layer.weight), parallel), layer.bias)


def with_bias(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x if bias is None else x + bias


def checkpointed(stack: nn.Module, layer: nn.Module):
    """`layer`, recomputed in backward when `stack` (a tower) has gradient checkpointing on, is training and
    autograd records (non-reentrant torch.utils.checkpoint: keyword-free calls, any non-tensor arguments)."""
    if stack.gradient_checkpointing and stack.training and torch.is_grad_enabled():
        return functools.partial(torch.utils.checkpoint.checkpoint, layer, use_reentrant=False)
    return layer


def inverse_frequencies(dim: int, theta: float) -> torch.Tensor:
    """theta^(-2i/dim) for i < dim/2: the standard rotary frequency ladder, float32."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
