"""Tensor parallelism: what each rank holds (`shard`) and what fits a device (`plan`)."""

from .plan import MemoryPlan, format_plan, memory_plan, parse_bytes
from .shard import (
    STYLES,
    VISION_MODES,
    LocalSizes,
    RankSlice,
    assemble,
    check_degree,
    checkpoint_slices,
    local_heads,
    local_sizes,
    parameter_shapes,
    rank_bytes,
    rank_ranges,
    rank_shape,
    rank_slice,
    split_style,
    valid_degrees,
)

__all__ = ["STYLES", "VISION_MODES", "RankSlice", "assemble", "check_degree", "checkpoint_slices", "local_heads",
           "LocalSizes", "local_sizes", "parameter_shapes", "rank_bytes", "rank_ranges", "rank_shape", "rank_slice",
           "split_style", "valid_degrees", "MemoryPlan", "format_plan", "memory_plan", "parse_bytes"]
