"""Checks of the model's tensor inputs, each in one place: token ids, labels, pixels, positions, cache slots.

Each raises a ValueError naming the argument, and for a bad value the value and where it is. They run before
anything is sized from the input.
"""

from __future__ import annotations

import torch

from ..backends.interface import IGNORE_INDEX, is_integer


def _describe(t) -> str:
    return f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__


def check_token_ids(ids, vocab_size: int, name: str, shape: tuple[int, int] | None = None,
                    ignore: int | None = None) -> torch.Tensor:
    """A (batch, length) integer tensor of vocabulary ids (or `ignore`), of `shape` when given. One read of
    its range; the first bad value is named with its position."""
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or not is_integer(ids):
        raise ValueError(f"{name} must be a (batch, length) integer tensor, got {_describe(ids)}")
    if shape is not None and tuple(ids.shape) != tuple(shape):
        raise ValueError(f"{name} must have the shape of input_ids {tuple(shape)}, got {tuple(ids.shape)}")
    if ids.shape[1] == 0:
        raise ValueError(f"{name} is empty")
    bad = (ids < 0) | (ids >= vocab_size)
    if ignore is not None:
        bad &= ids != ignore
    if bool(bad.any()):
        b, i = (int(x) for x in bad.nonzero()[0])
        other = "" if ignore is None else f" other than {ignore}"
        raise ValueError(f"{name} hold ids outside the vocabulary [0, {vocab_size}){other}: {int(ids[b, i])} at "
                         f"batch row {b}, position {i}")
    return ids


def next_token_targets(labels, shape: tuple[int, int], vocab_size: int, device) -> torch.Tensor:
    """labels (B, L) -> the target of each position, labels[:, i + 1], with IGNORE_INDEX after the last."""
    labels = check_token_ids(labels, vocab_size, "labels", shape, ignore=IGNORE_INDEX)
    labels = labels.to(device=device, dtype=torch.long)
    return torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def check_pixels(pixels, grid: torch.Tensor, patch_dim: int, kind: str) -> None:
    """Flattened patches: one (patch_dim,) float row per patch of the grids."""
    rows = int(grid.prod(-1).sum())
    if (not isinstance(pixels, torch.Tensor) or tuple(pixels.shape) != (rows, patch_dim)
            or not pixels.is_floating_point()):
        raise ValueError(f"{kind} pixels must be ({rows}, {patch_dim}) for grids {grid.tolist()}, floating point; "
                         f"got {_describe(pixels)}")


def check_position_ids(position_ids, batch: int, length: int) -> torch.Tensor:
    """(3, B, L) M-RoPE positions, or (B, L) for all three streams; returned as (3, B, L) long."""
    if not isinstance(position_ids, torch.Tensor) or not is_integer(position_ids) or (
            tuple(position_ids.shape) not in ((3, batch, length), (batch, length))):
        raise ValueError(f"position_ids must be a (3, {batch}, {length}) or ({batch}, {length}) integer tensor, got "
                         f"{_describe(position_ids)}")
    if position_ids.dim() == 2:
        position_ids = position_ids.unsqueeze(0).expand(3, -1, -1)
    return position_ids.long()


def check_cache_position(cache_position, cached: int) -> int:
    """The new tokens' cache slots, (L,) consecutive, starting at or before the `cached` length: the start."""
    if (not isinstance(cache_position, torch.Tensor) or cache_position.dim() != 1 or not is_integer(cache_position)
            or cache_position.numel() == 0):
        raise ValueError("cache_position must be a non-empty (length,) integer tensor, got "
                         f"{_describe(cache_position)}")
    start = int(cache_position[0])
    if not torch.equal(cache_position.cpu(), torch.arange(start, start + cache_position.numel())):
        raise ValueError(f"cache_position must be consecutive slots, got {cache_position.tolist()}")
    if not 0 <= start <= cached:
        raise ValueError(f"cache_position starts at {start}, but the cache holds {cached} tokens: a continuation "
                         "starts at or before its end")
    return start


def keep_positions(hidden: torch.Tensor, logits_to_keep) -> torch.Tensor:
    """transformers' logits_to_keep: 0 keeps all positions, an int n the last n, a 1-D index tensor those."""
    if isinstance(logits_to_keep, torch.Tensor):
        if logits_to_keep.dim() != 1 or not is_integer(logits_to_keep):
            raise ValueError(f"logits_to_keep must be an int or a 1-D integer tensor, got {_describe(logits_to_keep)}")
        return hidden[:, logits_to_keep.to(hidden.device)]
    if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, int) or logits_to_keep < 0:
        raise ValueError(f"logits_to_keep must be an int >= 0 or a 1-D integer tensor, got {logits_to_keep!r}")
    return hidden if logits_to_keep == 0 else hidden[:, -logits_to_keep:]
