"""The Qwen2.5-VL and Qwen2-VL vision towers: patch embedding, ViT blocks with 2-D RoPE, 2x2 patch merger.

Patches arrive as rows of ``pixel_values`` (3 x 2 x 14 x 14 flattened), ordered so that the four patches
of each 2x2 merge unit are adjacent.

Qwen2.5-VL (``cfg.windowed``): most blocks attend inside windows of merge units; the blocks listed in
``fullatt_block_indexes`` attend over each whole frame. Windows are formed by permuting merge units into
window order once before the blocks and restoring the order after the merger, so every block's attention
is one block-diagonal call over all windows of all images. Norms are RMSNorms, the MLP is SwiGLU.
Qwen2-VL: every block attends over each whole frame; norms are LayerNorms with a bias, the MLP is
fc1 -> QuickGELU -> fc2 (``cfg.hidden_act``). The merger is the same but for its norm.

Under tensor parallelism the tower is whole on every rank and runs data-parallel (`Qwen25VL.vision_features`),
or, built with `parallel` (`vision_parallel="tensor"`), its blocks are split like the decoder's layers: each rank
its heads' q, k, v and its share of the MLP, the attention output and the MLP's last layer summed over the ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..backends import BlockDiagonalMask, Ops, Rotary
from ..config import VisionConfig
from ..parallel.comm import to_ranks
from ..parallel.group import TensorParallel
from ..parallel.shard import LocalSizes
from .layers import LayerNorm, PlainMLP, RMSNorm, SwiGLUMLP, checkpointed, inverse_frequencies, row_parallel_linear
from .positions import vision_frame_seqlens, vision_rope_positions, vision_window_index


class PatchEmbed(nn.Module):
    """Conv3d with kernel = stride = (2, 14, 14) over one patch is a matmul with the flattened kernel."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.proj = nn.Module()
        self.proj.weight = nn.Parameter(torch.empty(cfg.hidden_size, cfg.in_channels, cfg.temporal_patch_size,
                                                    cfg.patch_size, cfg.patch_size))

    def forward(self, ops: Ops, patches: torch.Tensor) -> torch.Tensor:
        w = self.proj.weight
        return ops.linear(patches.to(w.dtype), w.reshape(w.shape[0], -1))


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig, heads: int, parallel: TensorParallel | None = None):
        """`heads`: the heads this rank holds (all of them unless the tower is split)."""
        super().__init__()
        self.num_heads, self.head_dim, self.parallel = heads, cfg.head_dim, parallel
        self.qkv = nn.Linear(cfg.hidden_size, 3 * heads * cfg.head_dim, bias=True)
        self.proj = nn.Linear(heads * cfg.head_dim, cfg.hidden_size, bias=True)

    def forward(self, ops: Ops, x: torch.Tensor, positions: torch.Tensor, rotary: Rotary,
                mask: BlockDiagonalMask) -> torch.Tensor:
        n = x.shape[0]
        qkv = ops.linear(to_ranks(x, self.parallel), self.qkv.weight, self.qkv.bias)
        q, k, v = qkv.view(1, n, 3, self.num_heads, self.head_dim).unbind(2)
        q, k = ops.rope(q, k, positions, rotary)
        out = ops.attention(q, k, v, mask)
        return row_parallel_linear(ops, out.reshape(n, -1), self.proj, self.parallel)


def vision_norm(cfg: VisionConfig) -> RMSNorm | LayerNorm:
    """The blocks' and the merger's norm: LayerNorm in Qwen2-VL, RMSNorm in Qwen2.5-VL."""
    return (LayerNorm if cfg.layer_norm else RMSNorm)(cfg.hidden_size, cfg.rms_norm_eps)


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig, sizes: LocalSizes, parallel: TensorParallel | None = None):
        super().__init__()
        self.norm1 = vision_norm(cfg)
        self.attn = VisionAttention(cfg, sizes.vision_heads, parallel)
        self.norm2 = vision_norm(cfg)
        if cfg.gated_mlp:
            self.mlp = SwiGLUMLP(cfg.hidden_size, sizes.vision_intermediate, bias=True, parallel=parallel)
        else:
            self.mlp = PlainMLP(cfg.hidden_size, sizes.vision_intermediate, cfg.hidden_act, parallel=parallel)

    def forward(self, ops, hidden, residual, positions, rotary, mask):
        """x + attn(norm1(x)), then + mlp(norm2(x)), written as in the text decoder: `hidden` is the previous
        block's MLP output and `residual` the stream before it (None at block 0), and each residual add is
        fused into the norm that follows it. Returns (this block's MLP output, the stream before it)."""
        x, residual = self.norm1.add_and_norm(ops, hidden, residual)
        attn = self.attn(ops, x, positions, rotary, mask)
        x, residual = self.norm2.add_and_norm(ops, attn, residual)
        return self.mlp(ops, x), residual


class PatchMerger(nn.Module):
    """Norm each patch, concatenate the 4 patches of a 2x2 unit, then Linear-GELU-Linear to the text width."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.unit_dim = cfg.hidden_size * cfg.spatial_merge_size**2
        self.ln_q = vision_norm(cfg)
        self.fc1 = nn.Linear(self.unit_dim, self.unit_dim, bias=True)
        self.fc2 = nn.Linear(self.unit_dim, cfg.out_hidden_size, bias=True)

    def forward(self, ops: Ops, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """Merges hidden + residual (the last block's output and stream; the add fused into ln_q)."""
        x, _ = self.ln_q.add_and_norm(ops, hidden, residual)
        return ops.mlp(x.reshape(-1, self.unit_dim), self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias,
                       "gelu")


@dataclass(frozen=True, eq=False)
class VisionLayout:
    """What the tower's blocks read of the grids, on the device (`VisionTower.layout`)."""

    positions: torch.Tensor  # (2, 1, N): each patch's (h, w) rope coordinates, one packed sequence in block order
    masks: tuple[BlockDiagonalMask, ...]  # per block: its windows or whole frames
    patch_order: torch.Tensor | None = None  # (N,) patches into window order (windowed towers)
    restore: torch.Tensor | None = None  # (N / merge^2,) merged tokens back into the input order


class VisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig, sizes: LocalSizes, parallel: TensorParallel | None = None):
        """`parallel`: split the blocks over its ranks (`sizes` their local heads and MLP width); None: whole."""
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(VisionBlock(cfg, sizes, parallel) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg)
        self.gradient_checkpointing = False
        # 2-D RoPE: the first half of the rotated pairs follow the patch row, the second half its column,
        # each with the frequency ladder of a head_dim/2 rotary.
        self.register_buffer("inv_freq", torch.empty(cfg.head_dim // 2), persistent=False)
        self.reset_rotary()

    def _apply(self, fn, recurse=True):
        # .to(dtype / device) would cast the float32 frequency buffers and leave the cached Rotary
        # objects behind: rebuild both after every such move.
        super()._apply(fn, recurse)
        self.reset_rotary()
        return self

    def reset_rotary(self) -> None:
        if self.inv_freq.device.type == "meta":
            return
        half = inverse_frequencies(self.cfg.head_dim // 2, self.cfg.rope_theta)
        self.inv_freq = torch.cat([half, half]).to(self.inv_freq.device)
        self.rotary = Rotary(self.inv_freq, (self.cfg.head_dim // 4, self.cfg.head_dim // 4))

    def forward(self, ops: Ops, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """(sum t*h*w, patch_dim) patches -> (sum t*h*w / merge^2, out_hidden_size) merged tokens."""
        return self.encode(ops, pixel_values, self.layout(grid_thw, pixel_values.device))

    def layout(self, grid_thw: torch.Tensor, device) -> VisionLayout:
        """The host-side preparation from the grids: positions, window order and masks, computed on the host
        and copied to `device` once. `encode` then reads nothing else of the grids."""
        cfg = self.cfg
        positions = vision_rope_positions(grid_thw, cfg.spatial_merge_size)
        # Full-attention blocks see whole frames; frames are contiguous in window order too, since windows
        # never straddle frames.
        frame_mask = BlockDiagonalMask.from_seqlens(vision_frame_seqlens(grid_thw), device=device)
        if not cfg.windowed:
            return VisionLayout(positions.unsqueeze(1).to(device), (frame_mask,) * cfg.depth)
        unit = cfg.spatial_merge_size**2
        window_index, window_seqlens = vision_window_index(grid_thw, cfg.spatial_merge_size, cfg.window_size,
                                                           cfg.patch_size)
        # Permute merge units (groups of `unit` consecutive patches) into window order.
        patch_order = (window_index[:, None] * unit + torch.arange(unit)).flatten()
        window_mask = BlockDiagonalMask.from_seqlens(window_seqlens, device=device)
        masks = tuple(frame_mask if i in cfg.fullatt_block_indexes else window_mask for i in range(cfg.depth))
        return VisionLayout(positions[:, patch_order].unsqueeze(1).to(device), masks, patch_order.to(device),
                            torch.argsort(window_index).to(device))

    def encode(self, ops: Ops, pixel_values: torch.Tensor, layout: VisionLayout) -> torch.Tensor:
        """`forward` on a prepared layout: device work only (no read back, no copy from the host), so the same
        launches for every image of the layout's grids: what a CUDA graph captures (`qvl.model.graphs`)."""
        x = self.patch_embed(ops, pixel_values)
        if layout.patch_order is not None:
            x = x[layout.patch_order]
        hidden, residual = x, None
        for block, mask in zip(self.blocks, layout.masks, strict=True):
            hidden, residual = checkpointed(self, block)(ops, hidden, residual, layout.positions, self.rotary, mask)
        merged = self.merger(ops, hidden, residual)
        return merged if layout.restore is None else merged[layout.restore]
