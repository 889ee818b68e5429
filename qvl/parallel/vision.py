"""The vision tower, data-parallel: each rank encodes a contiguous run of the images and the features are
gathered in order (as vLLM runs Qwen2.5-VL's tower under tensor parallelism: the tower is small, its heads few, so
splitting the images beats splitting the layers).

Images are whole units of the tower (its attention never crosses an image), so a rank's run of them encodes to
exactly the rows one process computes for them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..config import VisionConfig
from .comm import gather_rows
from .group import TensorParallel


def image_runs(patches: list[int], tp: int) -> list[tuple[int, int]]:
    """[first, stop) image indexes per rank: contiguous runs balanced by patch count. An image goes to the rank
    whose equal share of all the patches holds its middle, so a run is its share give or take half an image at
    each end. Ranks may get none (fewer images than ranks)."""
    middles, total = [], 0
    for n in patches:
        middles.append(2 * total + n)  # twice the middle: integers throughout
        total += n
    owner = [min(tp - 1, middle * tp // (2 * total)) if total else 0 for middle in middles]
    return [(sum(o < r for o in owner), sum(o <= r for o in owner)) for r in range(tp)]


def encode_data_parallel(encode: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], pixels: torch.Tensor,
                         grid_thw: torch.Tensor, cfg: VisionConfig, parallel: TensorParallel,
                         dtype: torch.dtype) -> torch.Tensor:
    """`encode(pixels, grid_thw)` over every image, each rank encoding its run (`image_runs`); the same
    (sum t*h*w / merge^2, out_hidden_size) features, in `dtype` (what `encode` returns), on every rank."""
    patches = grid_thw.prod(-1).tolist()
    runs = image_runs(patches, parallel.size)
    merge = cfg.spatial_merge_size**2
    rows = [sum(patches[first:stop]) // merge for first, stop in runs]
    first, stop = runs[parallel.rank]
    if first < stop:
        begin = sum(patches[:first])
        mine = encode(pixels[begin: begin + sum(patches[first:stop])], grid_thw[first:stop])
    else:
        mine = torch.zeros((0, cfg.out_hidden_size), dtype=dtype, device=pixels.device)
    return gather_rows(mine, rows, parallel)
