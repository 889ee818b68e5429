"""Token rows and pixels for model tests, without transformers (spawned tensor-parallel workers import these)."""

import torch


def placeholders(cfg, token, grid):
    """vision start, one `token` per merged vision token of `grid` (t, h, w), vision end."""
    n = int(torch.tensor(grid).prod()) // cfg.vision.spatial_merge_size**2
    return [cfg.vision_start_token_id] + [token] * n + [cfg.vision_end_token_id]


def pixels(grids, seed):
    """Random patch rows for the (t, h, w) grids, seeded."""
    g = torch.Generator().manual_seed(seed)
    rows = sum(t * h * w for t, h, w in grids)
    return torch.randn(rows, 3 * 2 * 14 * 14, generator=g)


def text_ids(n, seed, vocab=1000):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def left_pad(rows, pad_id):
    """(ids, attention mask) of token rows left-padded to the longest."""
    length = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (length - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows])
    return ids, mask
