"""The memory plan of tensor parallelism: what one rank holds and the longest context that fits its device.

qvl checks memory where it allocates (`qvl.memory.ensure_fits`): the weights must fit USABLE_SHARE of the device's
free memory, and a KV cache USABLE_SHARE of what the weights leave. The plan applies the same two checks to the
memory it is given, so its longest context is the longest cache qvl will allocate there. What stays free is the
headroom for activations (prefill, the vision tower), the allocator and the CUDA context, which the plan does not
estimate. The KV cache is the static one `generate` sizes up front (a continuation that grows it copies it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

import torch

from ..config import Qwen25VLConfig
from ..dtypes import FLOAT_DTYPES, dtype_name
from ..errors import ConfigError
from ..memory import USABLE_SHARE, format_bytes
from ..model.cache import StaticKVCache
from .shard import _check_int, check_degree, local_heads, rank_bytes

# Size suffixes --memory takes: SI (GB = 10^9 bytes, as GPU makers quote) and binary (GiB = 2^30 bytes).
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """'141GiB' -> 151397597184, '80GB' -> 80000000000, '1000' -> 1000 (decimals allowed: '1.5TiB')."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*", text) if len(text) <= 40 else None
    if m is None or m[2].lower() not in _UNITS:
        raise ConfigError(f"cannot read {text!r} as a size: write e.g. 141GiB, 80GB or a number of bytes "
                          "(units: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)")
    n = int(Fraction(m[1]) * _UNITS[m[2].lower()])
    if not 1 <= n < 2**63:
        raise ConfigError(f"a size must be between 1 byte and 8 EiB, got {text!r}")
    return n


@dataclass(frozen=True)
class MemoryPlan:
    """One rank's memory at degree `tp`: its weights, its KV cache per token, and the longest context that fits."""

    tp: int
    dtype: torch.dtype
    batch: int
    memory_bytes: int  # one rank's device memory
    weight_bytes: int  # the parameters the rank holds
    vision_bytes: int  # of which the vision tower's (whole when it runs data-parallel)
    kv_bytes_per_token: int  # K and V of one position: every layer, the rank's KV heads, all `batch` rows
    room: int  # positions per row whose cache fits in what the weights leave (0 when they do not fit)
    max_context: int  # room capped at max_position_embeddings: the longest context
    note: str  # why max_context is what it is

    @property
    def cache_bytes(self) -> int:
        return self.max_context * self.kv_bytes_per_token

    @property
    def weights_fit(self) -> bool:
        return self.weight_bytes <= USABLE_SHARE * self.memory_bytes

    @property
    def free_bytes(self) -> int:
        """What stays free with the weights and the longest cache allocated."""
        return self.memory_bytes - self.weight_bytes - self.cache_bytes


def memory_plan(cfg: Qwen25VLConfig, dtype: torch.dtype, tp: int, memory_bytes: int, batch: int = 1,
                vision: str = "data") -> MemoryPlan:
    """The plan of one rank of `tp` with `memory_bytes` of device memory, for `batch` rows of one length; the
    vision tower whole on each rank ("data") or split ("tensor")."""
    check_degree(cfg, tp, vision)
    _check_int(memory_bytes, "memory_bytes", 1)
    _check_int(batch, "batch", 1)
    if dtype not in FLOAT_DTYPES:
        raise ConfigError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    t = cfg.text
    weights = rank_bytes(cfg, dtype, tp, vision=vision)
    per_token = StaticKVCache.bytes_needed(t.num_hidden_layers, batch, 1, local_heads(cfg, tp)[1], t.head_dim, dtype)
    usable = USABLE_SHARE * memory_bytes
    if weights > usable:
        room, note = 0, f"the weights alone need {format_bytes(weights)} of {format_bytes(usable)} usable"
    else:
        room = int(USABLE_SHARE * (memory_bytes - weights) // per_token)  # ensure_fits on what the weights leave
        note = "no room for one position's cache" if room == 0 else "the cache fills the memory left"
    tokens = min(room, t.max_position_embeddings)
    if room > t.max_position_embeddings:
        note = f"max_position_embeddings (room for {room:,})"
    vision_bytes = rank_bytes(cfg, dtype, tp, tower="vision", vision=vision)
    return MemoryPlan(tp, dtype, batch, memory_bytes, weights, vision_bytes, per_token, room, tokens, note)


def format_plan(rows: list[MemoryPlan | tuple[int, str]]) -> str:
    """A text table, one row per degree; a (tp, reason) row is a degree that cannot split the model."""
    head = ["tp", "weights/rank", "vision/rank", "KV/token/rank", "longest context", "KV cache/rank", "left free",
            "note"]
    table = [head]
    for row in rows:
        if isinstance(row, tuple):
            table.append([str(row[0]), "-", "-", "-", "-", "-", "-", row[1]])
            continue
        fits = row.weights_fit
        table.append([str(row.tp), format_bytes(row.weight_bytes), format_bytes(row.vision_bytes),
                      format_bytes(row.kv_bytes_per_token), f"{row.max_context:,}",
                      format_bytes(row.cache_bytes) if fits else "-", format_bytes(row.free_bytes) if fits else "-",
                      row.note])
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in table)


def plan_notes(dtype: torch.dtype, vision: str = "data") -> str:
    """What the table's numbers include, printed under it."""
    tower = "whole on each (it runs data-parallel)" if vision == "data" else "split like the decoder"
    return (f"Weights in {dtype_name(dtype)}: the decoder split over the ranks (KV heads replicated when tp exceeds "
            f"them), the vision tower {tower}. The weights must fit "
            f"{USABLE_SHARE:.0%} of the memory and the KV cache {USABLE_SHARE:.0%} of what they leave (qvl.memory); "
            "what stays free is for activations, the allocator and the CUDA context.")
