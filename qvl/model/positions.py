"""Position bookkeeping: vision windows, vision 2-D rotary positions, multimodal 3-D (M-RoPE) positions.

Everything here is index arithmetic on small integer tensors; no model math.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..backends.interface import is_integer
from ..config import Qwen25VLConfig
from ..errors import InputError
from .inputs import INT32_LIMIT


def check_grids(grid_thw, merge: int, what: str) -> torch.Tensor | None:
    """(N, 3) integer (t, h, w) sizes, each >= 1, h and w multiples of the merge size; None stays None."""
    if grid_thw is None:
        return None
    if not isinstance(grid_thw, torch.Tensor):
        try:
            grid_thw = torch.as_tensor(grid_thw)
        except (TypeError, ValueError, RuntimeError, OverflowError):
            raise InputError(f"{what} must be an (N, 3) integer tensor of (t, h, w), got {grid_thw!r:.80}") from None
    if grid_thw.dim() != 2 or grid_thw.shape[1] != 3:
        raise InputError(f"{what} must have shape (N, 3) holding (t, h, w) per item, got {tuple(grid_thw.shape)}")
    if not is_integer(grid_thw):
        raise InputError(f"{what} must hold integers, got {grid_thw.dtype}: {grid_thw.tolist()}")
    if (grid_thw <= 0).any():
        raise InputError(f"{what} holds a non-positive size: {grid_thw.tolist()}")
    bad = [g for g in grid_thw.tolist() if g[1] % merge or g[2] % merge]
    if bad:
        raise InputError(f"{what} {bad}: h and w must be divisible by spatial_merge_size ({merge})")
    return grid_thw.long()


def check_second_per_grid_ts(second_per_grid_ts, videos: int) -> list[float]:
    """Seconds per temporal patch of each video: one finite number > 0 per video."""
    try:
        values = torch.as_tensor(second_per_grid_ts)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        raise InputError(f"second_per_grid_ts must be numbers, one per video, got {second_per_grid_ts!r:.80}") from None
    if values.dtype == torch.bool or values.is_complex() or not (values.is_floating_point() or is_integer(values)):
        raise InputError(f"second_per_grid_ts must be real numbers, got {values.dtype}")
    spg = [float(s) for s in values.flatten().tolist()]
    if len(spg) != videos:
        raise InputError(f"second_per_grid_ts has {len(spg)} entries but video_grid_thw has {videos} videos")
    for i, s in enumerate(spg):
        if not (math.isfinite(s) and s > 0):
            raise InputError(f"second_per_grid_ts[{i}] is {s:g}: seconds per temporal patch must be a finite number "
                             "> 0")
    return spg


def vision_rope_positions(grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
    """(2, N) patch (h, w) coordinates, in the order the patches arrive: merge-block-major, frames repeated."""
    out = []
    for t, h, w in grid_thw.tolist():
        hpos, wpos = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        blocks = (h // merge, merge, w // merge, merge)  # patches of one 2x2 merge unit are adjacent
        hw = torch.stack([hpos.reshape(blocks).transpose(1, 2).flatten(),
                          wpos.reshape(blocks).transpose(1, 2).flatten()])
        out.append(hw.repeat(1, t))
    return torch.cat(out, dim=1)


def vision_window_index(grid_thw: torch.Tensor, merge: int, window_size: int, patch_size: int):
    """Partition merge units into windows of (window_size / patch_size / merge)^2 units per frame.

    Returns `window_index` (units in window order; the inverse permutation restores the original order)
    and the patch count of each non-empty window. Edge windows are smaller when the grid is not a
    multiple of the window: windows of unequal length.
    """
    units_per_side = window_size // merge // patch_size
    unit = merge * merge
    order, seqlens, offset = [], [], 0
    for t, h, w in grid_thw.tolist():
        gh, gw = h // merge, w // merge
        index = torch.arange(t * gh * gw).reshape(t, gh, gw)
        pad_h, pad_w = -gh % units_per_side, -gw % units_per_side
        padded = F.pad(index, (0, pad_w, 0, pad_h), value=-1)
        nh, nw = (gh + pad_h) // units_per_side, (gw + pad_w) // units_per_side
        windows = padded.reshape(t, nh, units_per_side, nw, units_per_side).permute(0, 1, 3, 2, 4)
        windows = windows.reshape(t * nh * nw, units_per_side * units_per_side)
        counts = (windows >= 0).sum(1)
        flat = windows.flatten()
        order.append(flat[flat >= 0] + offset)
        seqlens.extend(int(c) * unit for c in counts if c > 0)
        offset += t * gh * gw
    return torch.cat(order), seqlens


def vision_frame_seqlens(grid_thw: torch.Tensor) -> list[int]:
    """Full-attention layers attend within each frame (temporal patch) of each image or video."""
    return [h * w for t, h, w in grid_thw.tolist() for _ in range(t)]


def left_padding(attention_mask: torch.Tensor | None, shape: tuple[int, int], device=None) -> torch.Tensor | None:
    """Per-row count of left padding tokens in a (batch, tokens) mask of `shape` (the tokens, with any cached
    before them); None when there is none. Other padding layouts are refused."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.is_complex():
        raise InputError(f"attention_mask must be a {tuple(shape)} tensor of 0 and 1, got "
                         f"{type(attention_mask).__name__}")
    if device is not None:
        attention_mask = attention_mask.to(device)
    if tuple(attention_mask.shape) != tuple(shape):
        raise InputError(f"attention_mask {tuple(attention_mask.shape)} must be {tuple(shape)}: one entry per token "
                         "(cached tokens included)")
    if not ((attention_mask == 0) | (attention_mask == 1)).all():
        raise InputError("attention_mask must hold only 0 and 1")
    m = attention_mask.to(torch.long)
    pad = (m == 0).sum(1)
    expected = torch.arange(m.shape[1], device=m.device)[None, :] >= pad[:, None]
    if not torch.equal(expected, m.bool()):
        raise InputError("attention_mask must be left-padded (zeros, then ones) for every row; "
                         "qvl pads on the left for batched generation")
    if (pad == m.shape[1]).any():
        raise InputError("attention_mask has a row with no tokens")
    return pad if pad.any() else None


def mrope_positions(cfg: Qwen25VLConfig, input_ids: torch.Tensor, pad: torch.Tensor | None,
                    image_grid_thw: torch.Tensor | None, video_grid_thw: torch.Tensor | None,
                    second_per_grid_ts: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """3-D (t, h, w) positions (3, B, L) for a prompt and the per-row delta (B, 1) carried into decoding.

    Text tokens advance all three streams together. A run of image or video placeholder tokens takes
    its grid (in order of appearance across the batch): t, h and w are the merged-grid coordinates offset
    by the current position, where video t steps by second_per_grid_t * tokens_per_second (fractions kept
    until the final floor) in Qwen2.5-VL, and by 1 (the frame group's index) in Qwen2-VL, which has no
    second_per_grid_ts. Text after a vision run resumes at the largest position used + 1, as in the
    released Qwen2.5-VL. Padding positions hold 1; the delta makes decode positions start + delta.
    """
    merge = cfg.vision.spatial_merge_size
    batch, length = input_ids.shape
    grids = {cfg.image_token_id: _queue(image_grid_thw), cfg.video_token_id: _queue(video_grid_thw)}
    spg = [1.0] * (len(grids[cfg.video_token_id]))
    if second_per_grid_ts is not None and not cfg.vision.time_scaled_video:
        raise InputError(f"second_per_grid_ts is not an input of {cfg.model_type}: its video frames are placed by "
                         "their index, not in seconds")
    if second_per_grid_ts is not None:
        spg = check_second_per_grid_ts(second_per_grid_ts, len(grids[cfg.video_token_id]))
    video_no = 0
    positions = torch.ones(3, batch, length, dtype=torch.long)
    deltas = torch.zeros(batch, 1, dtype=torch.long)
    # One read back from the device; the scan below walks Python ints (indexing a tensor per token would
    # cost a microsecond or more each: milliseconds on a long prompt).
    rows = input_ids.tolist()
    pads = [0] * batch if pad is None else pad.tolist()
    vision_ids = (cfg.image_token_id, cfg.video_token_id)
    for b in range(batch):
        start = pads[b]
        ids = rows[b][start:]
        pieces, nxt, i, n = [], 0, 0, len(ids)
        while i < n:
            if ids[i] not in vision_ids:
                j = i
                while j < n and ids[j] not in vision_ids:
                    j += 1
                pieces.append(torch.arange(nxt, nxt + j - i).expand(3, -1))
                nxt += j - i
                i = j
                continue
            tok = ids[i]
            kind = "image" if tok == cfg.image_token_id else "video"
            if not grids[tok]:
                raise InputError(f"row {b} has more {kind} placeholder runs than {kind}_grid_thw entries")
            t, h, w = grids[tok].pop(0)
            gh, gw = h // merge, w // merge
            count = t * gh * gw
            if i + count > n or any(other != tok for other in ids[i:i + count]):
                raise InputError(f"row {b}: the {kind} at token {start + i} needs {count} consecutive {kind} "
                                 f"placeholder tokens for its grid (t={t}, h={h}, w={w}) and merge size {merge}")
            step = 1.0
            if kind == "video":
                if cfg.vision.time_scaled_video:
                    step = spg[video_no] * cfg.vision.tokens_per_second
                video_no += 1
                if nxt + (t - 1) * step >= INT32_LIMIT:
                    raise InputError(f"second_per_grid_ts[{video_no - 1}] ({spg[video_no - 1]:g}) places the video's "
                                     f"{t} temporal patches past position 2**31")
            tpos = (torch.arange(t, dtype=torch.float64) * step).floor().long()
            tt, hh, ww = torch.meshgrid(tpos, torch.arange(gh), torch.arange(gw), indexing="ij")
            block = torch.stack([tt.flatten(), hh.flatten(), ww.flatten()]) + nxt
            pieces.append(block)
            nxt = int(block.max()) + 1
            i += count
        row = torch.cat(pieces, dim=1)
        positions[:, b, start:] = row
        deltas[b, 0] = int(row.max()) + 1 - length
    leftover = [name for name, tok in (("image", cfg.image_token_id), ("video", cfg.video_token_id)) if grids[tok]]
    if leftover:
        raise InputError(f"more {' and '.join(leftover)} grids than placeholder runs in input_ids")
    return positions.to(input_ids.device), deltas.to(input_ids.device)


def _queue(grid_thw: torch.Tensor | None) -> list[tuple[int, int, int]]:
    return [] if grid_thw is None else [tuple(g) for g in grid_thw.tolist()]


def decode_positions(start: int | torch.Tensor, length: int, deltas: torch.Tensor) -> torch.Tensor:
    """(3, B, length) positions for tokens at cache slots [start, start + length): all streams equal.
    `start` may be a 0-dim tensor on deltas' device (a cache length held there, for CUDA-graph capture)."""
    if isinstance(start, torch.Tensor):
        slots = torch.arange(length, device=deltas.device) + start
    else:  # one launch fewer than the tensor form: decode steps count every launch
        slots = torch.arange(start, start + length, device=deltas.device)
    return (slots[None, :] + deltas).unsqueeze(0).expand(3, -1, -1)
