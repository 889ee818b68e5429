"""A batch of rows (B, L, ...) addressed as one packed sequence (1, N, ...) of xFormers' varlen layouts.

Attention reads a left-padded batch's K/V and rope_padded writes into the KV cache through such views: row b's
token l sits at b * pitch + l, where pitch is the distance between row starts in tokens. Nothing is copied.
"""

from __future__ import annotations

import torch


def pitch(x: torch.Tensor) -> int | None:
    """Tokens between the starts of consecutive rows of (B, L, ...) x, if rows are evenly strided and apart."""
    if x.shape[0] == 1:
        return x.shape[1]
    s0, s1 = x.stride(0), x.stride(1)
    if s1 <= 0 or s0 % s1 or s0 // s1 < x.shape[1]:
        return None
    return s0 // s1


def same_rows(a: torch.Tensor, b: torch.Tensor) -> int | None:
    """The pitch a and b share when both can be packed the same way, else None."""
    p = pitch(a)
    if p is None or p != pitch(b) or a.stride()[1:] != b.stride()[1:]:
        return None
    return p


def packed(x: torch.Tensor, row_pitch: int, length: int) -> torch.Tensor:
    """(1, length, ...) view of (B, L, ...) x's memory where row b's token l sits at b * row_pitch + l.

    The token stride is the row stride over the pitch: with L == 1, x.stride(1) may be anything (a size-1 dim's
    stride carries no meaning; .contiguous() leaves it as it is).
    """
    token = x.stride(0) // row_pitch if x.shape[0] > 1 else x.stride(1)
    return x.as_strided((1, length, *x.shape[2:]), (x.stride(0), token, *x.stride()[2:]), x.storage_offset())


def within_storage(x: torch.Tensor, shape, stride) -> bool:
    """Whether a view of x's storage with this shape and stride stays inside the storage."""
    last = x.storage_offset() + sum((n - 1) * s for n, s in zip(shape, stride, strict=True))
    return (last + 1) * x.element_size() <= x.untyped_storage().nbytes()
