"""A static, preallocated KV cache (gpt-fast style): fixed shapes, so decode steps can be captured."""

from __future__ import annotations

import torch

from ..dtypes import dtype_name
from ..errors import InputError
from ..memory import ensure_fits


class StaticKVCache:
    """K and V for every layer: (layers, B, max_len, Hkv, D), written by the `cache` operator.

    All rows share one write position (`length`); left padding is handled by the attention mask.
    A cache returned by `Qwen25VL.forward(..., use_cache=True)` (as `past_key_values`) also keeps what a
    continuation needs from its first forward: the rope deltas (B, 1; position = cache slot + delta) and the
    left padding (B,) or None.
    """

    def __init__(self, num_layers: int, batch: int, max_len: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        self.ensure_fits(num_layers, batch, max_len, num_kv_heads, head_dim, dtype, device)
        shape = (num_layers, batch, max_len, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0
        self.rope_deltas: torch.Tensor | None = None
        self.pad: torch.Tensor | None = None

    @staticmethod
    def bytes_needed(num_layers: int, batch: int, max_len: int, num_kv_heads: int, head_dim: int,
                     dtype: torch.dtype) -> int:
        """What K and V take together, in bytes (Python integers: no overflow however large)."""
        return 2 * num_layers * batch * max_len * num_kv_heads * head_dim * dtype.itemsize

    @classmethod
    def ensure_fits(cls, num_layers: int, batch: int, max_len: int, num_kv_heads: int, head_dim: int,
                    dtype: torch.dtype, device: torch.device | str) -> None:
        """Refuse (`ResourceError`, with the estimate) a cache that would not fit `device`'s free memory."""
        ensure_fits(f"K and V of a KV cache of {batch} rows x {max_len} tokens ({num_layers} layers, {num_kv_heads} "
                    f"KV heads of {head_dim}, {dtype_name(dtype)})",
                    cls.bytes_needed(num_layers, batch, max_len, num_kv_heads, head_dim, dtype), device)

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    def get_seq_length(self) -> int:
        """How many tokens are cached (transformers' Cache method of that name)."""
        return self.length

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[i], self.v[i]

    def ensure_capacity(self, needed: int, limit: int) -> None:
        """Room for `needed` tokens, growing to max(needed, 2 x max_len) capped at `limit` (amortized: a
        continuation one token at a time copies the cache O(log n) times). New buffers: a captured decode
        step holding the old ones must not be replayed afterwards."""
        if needed <= self.max_len:
            return
        if needed > limit:
            raise InputError(f"the cache would hold {needed} tokens, past max_position_embeddings ({limit})")
        size = min(max(needed, 2 * self.max_len), limit)
        layers, batch, _, heads, dim = self.k.shape
        self.ensure_fits(layers, batch, size, heads, dim, self.k.dtype, self.k.device)
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_zeros(*old.shape[:2], size, *old.shape[3:])
            new[:, :, : self.length] = old[:, :, : self.length]
            setattr(self, name, new)

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep row rows[i] as row i (beam search: each beam continues from the beam it was chosen from).
        In place, so the buffers keep their addresses (a captured decode step still reads them)."""
        self.k.copy_(self.k.index_select(1, rows))
        self.v.copy_(self.v.index_select(1, rows))

    def reset(self) -> None:
        self.length = 0
