"""The Qwen2 text decoder with M-RoPE: GQA attention with qkv bias, SwiGLU MLP, pre-norm residual blocks.

Under tensor parallelism (`parallel` a `TensorParallel`) each rank builds its layers with its own sizes
(`LocalSizes`): its query and KV heads, its share of the MLP's width and of the vocabulary. Attention and the MLP
are then Megatron's pair, a column-parallel projection in (each rank its heads or inner rows) and a row-parallel
one out, whose partial outputs are summed over the ranks (`from_ranks`). At tp 1 both collectives are the identity.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed import ProcessGroup

from ..backends import CausalMask, Ops, Rotary
from ..backends.interface import needs_grad
from ..config import TextConfig
from ..parallel.comm import gather, replicated_rows, to_ranks
from ..parallel.group import TensorParallel
from ..parallel.shard import LocalSizes
from .layers import RMSNorm, SwiGLUMLP, VocabEmbedding, checkpointed, row_parallel_linear


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig, sizes: LocalSizes, parallel: TensorParallel | None = None,
                 kv_replicas: ProcessGroup | None = None):
        """`kv_replicas`: the ranks that hold this rank's KV head too (when tp exceeds the KV heads)."""
        super().__init__()
        self.num_heads, self.num_kv_heads = sizes.heads, sizes.kv_heads
        self.head_dim = cfg.head_dim
        self.parallel, self.kv_replicas = parallel, kv_replicas
        self.qkv_proj = nn.Linear(cfg.hidden_size, (self.num_heads + 2 * self.num_kv_heads) * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, ops: Ops, x: torch.Tensor, positions: torch.Tensor, rotary: Rotary, mask: CausalMask,
                kv_cache: tuple[torch.Tensor, torch.Tensor] | None, start: int | torch.Tensor,
                attentions: list | None = None) -> torch.Tensor:
        """`start`: the cache slot of x's first token. As a 0-dim tensor on the device (a decode step for
        CUDA-graph capture) attention runs over the whole cache and `mask.kv_len` says how much is written.
        `attentions`, a list, receives the softmax weights (B, heads, Lq, Lk)."""
        b, n, _ = x.shape
        kv_rows = self.num_heads * self.head_dim  # the k and v rows follow the query heads' rows
        qkv = ops.linear(to_ranks(x, self.parallel), replicated_rows(self.qkv_proj.weight, kv_rows, self.kv_replicas),
                         replicated_rows(self.qkv_proj.bias, kv_rows, self.kv_replicas))
        q, k, v = qkv.split(
            [self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, self.num_kv_heads * self.head_dim], -1)
        q = q.view(b, n, self.num_heads, self.head_dim)
        k = k.view(b, n, self.num_kv_heads, self.head_dim)
        v = v.view(b, n, self.num_kv_heads, self.head_dim)
        if kv_cache is None:
            q, k = ops.rope(q, k, positions, rotary)
        elif needs_grad(q, k, v):
            # The cache operator's writes are not differentiated: rotate here, keep a detached copy in the
            # cache, and attend over the cached past (a constant) followed by the new keys and values.
            q, k = ops.rope(q, k, positions, rotary)
            k_cache, v_cache = kv_cache
            k_cache[:, start:start + n] = k.detach()
            v_cache[:, start:start + n] = v.detach()
            k, v = torch.cat([k_cache[:, :start], k], 1), torch.cat([v_cache[:, :start], v], 1)
        else:
            k_cache, v_cache = kv_cache
            q = ops.cache(q, k, v, positions, rotary, k_cache, v_cache, start)
            if isinstance(start, torch.Tensor):  # the whole cache: mask.kv_len says how much is written
                k, v = k_cache, v_cache
            else:
                k, v = k_cache[:, : start + n], v_cache[:, : start + n]
        if attentions is None:
            out = ops.attention(q, k, v, mask)
        else:
            out, weights = ops.attention(q, k, v, mask, weights=True)
            attentions.append(gather(weights, 1, self.parallel))  # every rank's heads, in order
        return row_parallel_linear(ops, out.reshape(b, n, -1), self.o_proj, self.parallel)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, sizes: LocalSizes, parallel: TensorParallel | None = None,
                 kv_replicas: ProcessGroup | None = None):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, sizes, parallel, kv_replicas)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLUMLP(cfg.hidden_size, sizes.intermediate, bias=False, parallel=parallel)

    def forward(self, ops, hidden, residual, positions, rotary, mask, kv_cache, start, attentions=None):
        """`hidden` is the previous sublayer's output, `residual` the stream before it (None at layer 0).

        The residual add is fused into the norm that follows it: norm(hidden, residual) returns the
        normalized sum and the sum itself, the new residual stream.
        """
        x, residual = self.input_layernorm.add_and_norm(ops, hidden, residual)
        hidden = self.self_attn(ops, x, positions, rotary, mask, kv_cache, start, attentions)
        x, residual = self.post_attention_layernorm.add_and_norm(ops, hidden, residual)
        return self.mlp(ops, x), residual


class TextDecoder(nn.Module):
    def __init__(self, cfg: TextConfig, sizes: LocalSizes, parallel: TensorParallel | None = None):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = VocabEmbedding(cfg.hidden_size, sizes, parallel)
        replicas = None if parallel is None else parallel.replicas(cfg.num_key_value_heads)
        self.layers = nn.ModuleList(DecoderLayer(cfg, sizes, parallel, replicas) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.gradient_checkpointing = False

    def forward(self, ops: Ops, embeds: torch.Tensor, positions: torch.Tensor, rotary: Rotary, mask: CausalMask,
                cache=None, start: int | torch.Tensor = 0, hidden_states: list | None = None,
                attentions: list | None = None) -> torch.Tensor:
        """The final normed hidden states. `hidden_states`, a list, receives what transformers returns as
        hidden_states: the embeddings, the stream after each layer but the last, and the output; `attentions`
        each layer's attention weights."""
        hidden, residual = embeds, None
        for i, layer in enumerate(self.layers):
            if hidden_states is not None:
                hidden_states.append(hidden if residual is None else hidden + residual)
            kv = None if cache is None else cache.layer(i)
            hidden, residual = checkpointed(self, layer)(ops, hidden, residual, positions, rotary, mask, kv, start,
                                                         attentions)
        out, _ = self.norm.add_and_norm(ops, hidden, residual)
        if hidden_states is not None:
            hidden_states.append(out)
        return out
