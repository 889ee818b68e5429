"""Checks of the model's inputs, each in one place: token ids, labels, pixels, positions, cache slots, and the
plain numbers generation takes (`check_int`, `check_number`).

Each raises `InputError` naming the argument, and for a bad value the value and where it is. They run before
anything is sized from the input.
"""

from __future__ import annotations

import math
import numbers

import torch

from ..backends.interface import IGNORE_INDEX, is_integer
from ..errors import InputError

# Positions and ids above this would wrap in the int32 index arithmetic of the kernels.
INT32_LIMIT = 2**31
# torch.Generator.manual_seed's range (inclusive): the one rule for every seed qvl takes.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
SEED_RANGE = "[-2**63, 2**64)"


def is_seed(value) -> bool:
    """`value` is an int (not a bool) that torch.Generator.manual_seed takes."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and SEED_MIN <= value <= SEED_MAX


def _describe(t) -> str:
    return f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__


def check_int(value, name: str, low: int | None = None, high: int | None = None, *, optional: bool = False,
              note: str = "") -> None:
    """`value` is an int (not a bool) in [low, high] (None: no bound), or None when `optional`. `note` follows
    the rule in the message (what a special value means)."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InputError(f"{name} must be an integer{' or None' if optional else ''}{note}, got {value!r:.60}")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f" >= {low}" if high is None else f" <= {high}" if low is None else f" in [{low}, {high}]"
        raise InputError(f"{name} must be an integer{bounds}{note}, got {value}")


def check_number(value, name: str, low: float | None = None, high: float | None = None, *, low_open: bool = False,
                 optional: bool = False, note: str = "") -> None:
    """`value` is a finite real number (not a bool) in [low, high] ((low, high] with `low_open`; None: no bound),
    or None when `optional`. `note` follows the rule in the message."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputError(f"{name} must be a number{' or None' if optional else ''}{note}, got {value!r:.60}")
    try:
        x = float(value)
    except OverflowError:  # an int past float's range
        x = math.inf if value > 0 else -math.inf
    below = low is not None and (x <= low if low_open else x < low)
    if not math.isfinite(x) or below or (high is not None and x > high):
        rule = "" if low is None and high is None else (
            f" {'>' if low_open else '>='} {low:g}" if high is None else f" <= {high:g}" if low is None
            else f" in {'(' if low_open else '['}{low:g}, {high:g}]")
        rule = ("a finite number" + rule) if not math.isfinite(x) or not rule else rule.lstrip()
        raise InputError(f"{name} must be {rule}{note}, got {value!r}")


def check_token_shape(ids, name: str, shape: tuple[int, int] | None = None) -> tuple[int, int]:
    """(batch, length) of a (batch, length) integer tensor (of `shape` when given) with a row and a token."""
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or not is_integer(ids):
        raise InputError(f"{name} must be a (batch, length) integer tensor, got {_describe(ids)}")
    if shape is not None and tuple(ids.shape) != tuple(shape):
        raise InputError(f"{name} must have the shape of input_ids {tuple(shape)}, got {tuple(ids.shape)}")
    if ids.shape[0] == 0:
        raise InputError(f"{name} has no rows (an empty batch): {tuple(ids.shape)}")
    if ids.shape[1] == 0:
        raise InputError(f"{name} is empty: {tuple(ids.shape)}, no tokens")
    return ids.shape[0], ids.shape[1]


def check_has_values(t: torch.Tensor, name: str) -> None:
    """A tensor whose values can be read: not on the meta device (shapes only)."""
    if t.device.type == "meta":
        raise InputError(f"{name}: on the meta device, which holds shapes but no values ({_describe(t)})")


def first_non_finite(values: torch.Tensor) -> tuple[int, float] | None:
    """(row, value) of the first NaN or infinity in `values` (rows, columns), None when every value is finite. One
    reduction first, no value-sized mask: the float64 sum of float32 (or narrower) values cannot overflow, so it
    is finite exactly when every value is (float64 values near its limit are looked at row by row)."""
    values = values.detach()
    if math.isfinite(float(values.sum(dtype=torch.float64))):
        return None
    bad = ~torch.isfinite(values).all(-1)
    if not bool(bad.any()):
        return None
    row = int(bad.nonzero()[0])
    return row, values[row][~torch.isfinite(values[row])][0].item()


def check_token_ids(ids, vocab_size: int, name: str, shape: tuple[int, int] | None = None,
                    ignore: int | None = None) -> torch.Tensor:
    """A (batch, length) integer tensor of vocabulary ids (or `ignore`), of `shape` when given. One read of
    its range; the first bad value is named with its position (int64 values past int32 included: they are
    compared before any narrowing cast could wrap them into the vocabulary)."""
    check_token_shape(ids, name, shape)
    check_has_values(ids, name)
    wide = ids if ids.dtype == torch.int64 else ids.long()  # uint8 >= 1024 would compare a wrapped bound
    bad = (wide < 0) | (wide >= vocab_size)
    if ignore is not None:
        bad &= wide != ignore
    if bool(bad.any()):
        b, i = (int(x) for x in bad.nonzero()[0])
        other = "" if ignore is None else f" other than {ignore}"
        raise InputError(f"{name} hold ids outside the vocabulary [0, {vocab_size}){other}: {int(wide[b, i])} at "
                         f"batch row {b}, position {i}")
    return ids


def next_token_targets(labels, shape: tuple[int, int], vocab_size: int, device) -> torch.Tensor:
    """labels (B, L) -> the target of each position, labels[:, i + 1], with IGNORE_INDEX after the last."""
    labels = check_token_ids(labels, vocab_size, "labels", shape, ignore=IGNORE_INDEX)
    labels = labels.to(device=device, dtype=torch.long)
    return torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def check_pixels(pixels, grid: torch.Tensor, patch_dim: int, kind: str) -> None:
    """Flattened patches: one (patch_dim,) finite float row per patch of the grids. The row count is summed in
    Python integers, so huge grids cannot wrap around to match."""
    rows = sum(t * h * w for t, h, w in grid.tolist())
    if (not isinstance(pixels, torch.Tensor) or tuple(pixels.shape) != (rows, patch_dim)
            or not pixels.is_floating_point()):
        raise InputError(f"{kind} pixels must be ({rows}, {patch_dim}) for grids {grid.tolist()}, floating point; "
                         f"got {_describe(pixels)}")
    check_has_values(pixels, f"{kind} pixels")
    found = first_non_finite(pixels)
    if found is not None:
        raise InputError(f"{kind} pixels hold {found[1]} (not finite) in patch row {found[0]} of {rows}: pixel values "
                         "must be finite numbers")


def check_position_ids(position_ids, batch: int, length: int) -> torch.Tensor:
    """(3, B, L) M-RoPE positions, or (B, L) for all three streams, each in [0, 2**31); returned as (3, B, L)
    long."""
    if not isinstance(position_ids, torch.Tensor) or not is_integer(position_ids) or (
            tuple(position_ids.shape) not in ((3, batch, length), (batch, length))):
        raise InputError(f"position_ids must be a (3, {batch}, {length}) or ({batch}, {length}) integer tensor, got "
                         f"{_describe(position_ids)}")
    low, high = (int(x) for x in torch.stack([position_ids.min(), position_ids.max()]).tolist())
    if low < 0 or high >= INT32_LIMIT:
        raise InputError(f"position_ids must be in [0, 2**31), got values from {low} to {high}")
    if position_ids.dim() == 2:
        position_ids = position_ids.unsqueeze(0).expand(3, -1, -1)
    return position_ids.long()


def check_cache_position(cache_position, cached: int, length: int | None = None) -> int:
    """The new tokens' cache slots, (L,) consecutive (one per new token when `length` is given), starting at or
    before the `cached` length: the start."""
    if (not isinstance(cache_position, torch.Tensor) or cache_position.dim() != 1 or not is_integer(cache_position)
            or cache_position.numel() == 0):
        raise InputError("cache_position must be a non-empty (length,) integer tensor, got "
                         f"{_describe(cache_position)}")
    if length is not None and cache_position.numel() != length:
        raise InputError(f"cache_position holds {cache_position.numel()} slots for {length} new tokens")
    slots = cache_position.cpu().long()
    start = int(slots[0])
    if not torch.equal(slots, torch.arange(start, start + slots.numel())):
        raise InputError(f"cache_position must be consecutive slots, got {cache_position.tolist()}")
    if not 0 <= start <= cached:
        raise InputError(f"cache_position starts at {start}, but the cache holds {cached} tokens: a continuation "
                         "starts at or before its end")
    return start


def check_rope_deltas(rope_deltas, batch: int) -> torch.Tensor:
    """transformers' rope deltas: (B, 1) integers (position = unpadded count + delta), inside int32."""
    if (not isinstance(rope_deltas, torch.Tensor) or not is_integer(rope_deltas)
            or tuple(rope_deltas.shape) != (batch, 1)):
        raise InputError(f"rope_deltas must be a ({batch}, 1) integer tensor, got {_describe(rope_deltas)}")
    if bool((rope_deltas.abs() >= INT32_LIMIT).any()):
        raise InputError(f"rope_deltas must lie inside (-2**31, 2**31), got {rope_deltas.flatten().tolist()}")
    return rope_deltas


def keep_positions(hidden: torch.Tensor, logits_to_keep) -> torch.Tensor:
    """transformers' logits_to_keep: 0 keeps all positions, an int n the last n, a 1-D index tensor those."""
    if isinstance(logits_to_keep, torch.Tensor):
        if logits_to_keep.dim() != 1 or not is_integer(logits_to_keep):
            raise InputError(f"logits_to_keep must be an int or a 1-D integer tensor, got {_describe(logits_to_keep)}")
        n = hidden.shape[1]
        if logits_to_keep.numel() and bool(((logits_to_keep < -n) | (logits_to_keep >= n)).any()):
            raise InputError(f"logits_to_keep indexes positions {logits_to_keep.tolist()} of a sequence of {n}")
        return hidden[:, logits_to_keep.to(hidden.device)]
    if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, int) or logits_to_keep < 0:
        raise InputError(f"logits_to_keep must be an int >= 0 or a 1-D integer tensor, got {logits_to_keep!r}")
    return hidden if logits_to_keep == 0 else hidden[:, -logits_to_keep:]
