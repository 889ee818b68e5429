"""A static, preallocated KV cache (gpt-fast style): fixed shapes, so decode steps can be captured."""

from __future__ import annotations

import torch


class StaticKVCache:
    """K and V for every layer: (layers, B, max_len, Hkv, D), written by the `cache` operator.

    All rows share one write position (`length`); left padding is handled by the attention mask.
    """

    def __init__(self, num_layers: int, batch: int, max_len: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (num_layers, batch, max_len, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[i], self.v[i]

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep row rows[i] as row i (beam search: each beam continues from the beam it was chosen from).
        In place, so the buffers keep their addresses (a captured decode step still reads them)."""
        self.k.copy_(self.k.index_select(1, rows))
        self.v.copy_(self.v.index_select(1, rows))

    def reset(self) -> None:
        self.length = 0
