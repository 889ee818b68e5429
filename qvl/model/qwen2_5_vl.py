"""Qwen2.5-VL: vision tower + merger, 3-D positions, text decoder, and generation.

    tokens --embed--> text embeddings --+-- image/video features placed at their placeholder tokens
    pixels --vision tower + merger------+
                                        v
                   decoder (M-RoPE over (t, h, w) positions) --> lm_head --> logits

The forward signature follows transformers' Qwen2_5_VLForConditionalGeneration so users can swap.
Every operator runs through `self.ops`, resolved from the backend plan; `set_backends` swaps them on a
loaded model without touching the weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..backends import IGNORE_INDEX, CausalMask, Ops, Rotary, resolve_plan
from ..config import Qwen25VLConfig
from .cache import StaticKVCache
from .generation import generate
from .graphs import DecodeGraph
from .layers import inverse_frequencies
from .positions import check_grids, decode_positions, left_padding, mrope_positions
from .text import TextDecoder
from .vision import VisionTower


@dataclass
class Qwen25VLOutput:
    """What `Qwen25VL.forward` returns; transformers' Qwen2_5_VLCausalLMOutputWithPast fields.

    loss: 0-dim float32, only with labels. logits: (B, L, vocab) in the model's dtype; None when labels were
    given and the loss backend never made them (a chunked fused loss). rope_deltas (B, 1): decode position =
    cache slot + delta. past_key_values, hidden_states and attentions are not produced yet (None).
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: object = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    rope_deltas: torch.Tensor | None = None


def next_token_targets(labels, shape: torch.Size, vocab_size: int, device) -> torch.Tensor:
    """labels (B, L) -> the target of each position, labels[:, i + 1], with IGNORE_INDEX after the last.

    Checked first (one read of their range, as input_ids' is): the shape of the ids, integer, and every value
    a vocabulary id or IGNORE_INDEX."""
    if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != tuple(shape):
        got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels must have the shape of input_ids {tuple(shape)}, got {got}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got dtype {labels.dtype}")
    labels = labels.to(device=device, dtype=torch.long)
    bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= vocab_size))
    if bool(bad.any()):
        b, i = (int(x) for x in bad.nonzero()[0])
        raise ValueError(f"labels hold ids outside the vocabulary [0, {vocab_size}) other than {IGNORE_INDEX}: "
                         f"{int(labels[b, i])} at batch row {b}, position {i}")
    return torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


@dataclass
class Prompt:
    """A prompt prepared for the decoder: embeddings, 3-D positions, padding, and the decode delta."""

    embeds: torch.Tensor
    positions: torch.Tensor  # (3, B, L)
    pad: torch.Tensor | None  # (B,) left padding, None if none
    deltas: torch.Tensor  # (B, 1): decode position = cache slot + delta
    has_vision: bool


class Qwen25VL(nn.Module):
    def __init__(self, cfg: Qwen25VLConfig, backends=None, fallback: str | None = None):
        super().__init__()
        self.cfg = cfg.validate()
        self.visual = VisionTower(cfg.vision)
        self.model = TextDecoder(cfg.text)
        if not cfg.text.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)
        self.register_buffer("inv_freq", torch.empty(cfg.text.head_dim // 2), persistent=False)
        self.reset_rotary()
        self.set_backends(backends, fallback=fallback)

    def _apply(self, fn, recurse=True):
        # .to(dtype / device) would cast the float32 frequency buffers and leave the cached Rotary
        # objects behind: rebuild both after every such move.
        super()._apply(fn, recurse)
        self.reset_rotary()
        return self

    def reset_rotary(self) -> None:
        """(Re)compute the float32 rotary frequency buffers, e.g. after allocating on another device."""
        device = self.inv_freq.device
        if device.type == "meta":
            return
        self.inv_freq = inverse_frequencies(self.cfg.text.head_dim, self.cfg.text.rope_theta).to(device)
        sections = tuple(self.cfg.text.mrope_section)
        # Built once, with their tables on the device (Rotary), and shared by every layer and forward.
        self._rotary = {uniform: Rotary(self.inv_freq, sections, uniform) for uniform in (False, True)}
        self.visual.reset_rotary()

    # --- backends --------------------------------------------------------------------------------------------

    def set_backends(self, backends=None, *, fallback: str | None = None) -> Qwen25VL:
        """Resolve a backend plan (see `qvl.backends.registry`) and route every operator through it."""
        self.ops = Ops(resolve_plan(backends, fallback=fallback))
        return self

    @property
    def plan(self):
        return self.ops.plan

    @property
    def fallbacks(self):
        """Every fallback the registry took so far (operator, requested, used, call, reasons)."""
        return self.ops.fallbacks

    # --- pieces ----------------------------------------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def lm_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.cfg.text.tie_word_embeddings else self.lm_head.weight

    def rotary(self, uniform_streams: bool) -> Rotary:
        """Text M-RoPE; `uniform_streams` when every position stream is equal (text-only or decoding)."""
        return self._rotary[uniform_streams]

    def vision_features(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        return self.visual(self.ops, pixel_values.to(self.device), grid_thw)

    def prepare(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                pixel_values_videos=None, video_grid_thw=None, second_per_grid_ts=None) -> Prompt:
        """Check the inputs, run the vision tower, place its features, compute positions. Records gradients
        for the embeddings and the vision tower when autograd does."""
        cfg = self.cfg
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError("input_ids must be a (batch, length) integer tensor")
        if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids must be a (batch, length) integer tensor, got dtype {input_ids.dtype}")
        if input_ids.shape[1] == 0:
            raise ValueError("input_ids is empty")
        if input_ids.min() < 0 or input_ids.max() >= cfg.text.vocab_size:
            raise ValueError(f"input_ids hold token ids outside the vocabulary [0, {cfg.text.vocab_size})")
        input_ids = input_ids.to(self.device)
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device)
        pad = left_padding(attention_mask, input_ids)
        merge = cfg.vision.spatial_merge_size
        image_grid_thw = check_grids(image_grid_thw, merge, "image_grid_thw")
        video_grid_thw = check_grids(video_grid_thw, merge, "video_grid_thw")
        if second_per_grid_ts is not None and video_grid_thw is None:
            raise ValueError("second_per_grid_ts given without video_grid_thw")

        embeds = self.model.embed_tokens(input_ids)
        for kind, pixels, grid, token in (("image", pixel_values, image_grid_thw, cfg.image_token_id),
                                          ("video", pixel_values_videos, video_grid_thw, cfg.video_token_id)):
            placeholder = input_ids == token
            n_tokens = int(placeholder.sum())
            if (pixels is None) != (grid is None):
                raise ValueError(f"{kind}: pass both the pixels and their grid_thw, or neither")
            if pixels is None:
                if n_tokens:
                    raise ValueError(f"input_ids hold {n_tokens} {kind} placeholder tokens but no {kind} pixels "
                                     "were given")
                continue
            rows = int(grid.prod(-1).sum())
            if pixels.dim() != 2 or pixels.shape != (rows, cfg.vision.patch_dim):
                raise ValueError(f"{kind} pixels must be ({rows}, {cfg.vision.patch_dim}) for grids {grid.tolist()}, "
                                 f"got {tuple(pixels.shape)}")
            expected = rows // merge**2
            if n_tokens != expected:
                raise ValueError(f"input_ids hold {n_tokens} {kind} placeholder tokens, but the {kind} grids "
                                 f"{grid.tolist()} give {expected} merged {kind} tokens")
            features = self.vision_features(pixels, grid).to(embeds.dtype)
            embeds = embeds.masked_scatter(placeholder.unsqueeze(-1), features)

        positions, deltas = mrope_positions(cfg, input_ids, pad, image_grid_thw, video_grid_thw, second_per_grid_ts)
        has_vision = image_grid_thw is not None or video_grid_thw is not None
        return Prompt(embeds, positions, pad, deltas, has_vision=has_vision)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(hidden, self.lm_weight())

    # --- forward and generation ------------------------------------------------------------------------------

    def forward(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                pixel_values_videos=None, video_grid_thw=None, second_per_grid_ts=None, labels=None,
                num_items_in_batch=None) -> Qwen25VLOutput:
        """A whole prompt (no cache): logits, and with `labels` the causal-LM loss (transformers' rule).

        labels (B, L) like input_ids: the logits at position i are scored against labels[i + 1]; -100
        (IGNORE_INDEX) is not counted. The loss is the mean over counted tokens, or their sum divided by
        `num_items_in_batch` when given (gradient accumulation over micro-batches). A batch with no counted
        token has loss 0 and zero gradients. With labels the LM head and the loss run as one `loss` operator:
        backends that never build the whole logits (triton's chunked kernel) return `logits=None`.

        Gradients flow when autograd records (not under torch.no_grad / inference_mode): wrap inference in
        one of them, as `generate` does.
        """
        p = self.prepare(input_ids, attention_mask, pixel_values, image_grid_thw, pixel_values_videos,
                         video_grid_thw, second_per_grid_ts)
        hidden = self.model(self.ops, p.embeds, p.positions, self.rotary(not p.has_vision), CausalMask(p.pad))
        if labels is None:
            return Qwen25VLOutput(logits=self.logits(hidden), rope_deltas=p.deltas)
        targets = next_token_targets(labels, input_ids.shape, self.cfg.text.vocab_size, self.device)
        loss, logits = self.ops.loss(hidden.flatten(0, 1), self.lm_weight(), targets.flatten(), num_items_in_batch)
        if logits is not None:
            logits = logits.view(*hidden.shape[:2], -1)
        return Qwen25VLOutput(loss=loss, logits=logits, rope_deltas=p.deltas)

    def gradient_checkpointing_enable(self) -> None:
        """Recompute each decoder layer and vision block in backward instead of keeping its activations
        (non-reentrant torch.utils.checkpoint); the same gradients for less memory. Only while training."""
        self.set_gradient_checkpointing(True)

    def gradient_checkpointing_disable(self) -> None:
        self.set_gradient_checkpointing(False)

    def set_gradient_checkpointing(self, on: bool) -> None:
        """Checkpointing on or off from a flag (`gradient_checkpointing_enable` / `_disable`)."""
        self.model.gradient_checkpointing = self.visual.gradient_checkpointing = bool(on)

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.model.gradient_checkpointing

    def new_cache(self, batch: int, max_len: int) -> StaticKVCache:
        t = self.cfg.text
        return StaticKVCache(t.num_hidden_layers, batch, max_len, t.num_key_value_heads, t.head_dim, self.dtype,
                             self.device)

    @torch.no_grad()
    def prefill(self, prompt: Prompt, cache: StaticKVCache) -> torch.Tensor:
        """Run the prompt into an empty cache; return the last position's logits (B, vocab)."""
        n = prompt.embeds.shape[1]
        hidden = self.model(self.ops, prompt.embeds, prompt.positions, self.rotary(not prompt.has_vision),
                            CausalMask(prompt.pad), cache=cache, start=0)
        cache.length = n
        return self.logits(hidden[:, -1])

    @torch.no_grad()
    def decode_step(self, tokens: torch.Tensor, prompt: Prompt, cache: StaticKVCache,
                    length: torch.Tensor | None = None) -> torch.Tensor:
        """Feed one token per row (B,) at the cache's next slot; return its logits (B, vocab).

        `length`: the cache's length as a 0-dim integer tensor on the model's device, used instead of
        `cache.length` (which is then left for the caller to advance). Every launch of the step then has the
        same arguments whatever the length (attention spans the whole cache, the slot is read on the device),
        so the step can be captured in a CUDA graph and replayed for every token: `DecodeGraph`.
        """
        start = cache.length if length is None else length
        embeds = self.model.embed_tokens(tokens[:, None])
        positions = decode_positions(start, 1, prompt.deltas)
        mask = CausalMask(prompt.pad) if length is None else CausalMask(prompt.pad, kv_len=length + 1)
        hidden = self.model(self.ops, embeds, positions, self.rotary(True), mask, cache=cache, start=start)
        if length is None:
            cache.length = start + 1
        return self.logits(hidden[:, -1])

    def decoder(self, prompt: Prompt, cache: StaticKVCache, cuda_graph: bool = False):
        """The decode step for this prompt and cache as a callable: tokens (B,) -> logits (B, vocab).

        cuda_graph: capture the step once and replay it for every token (`DecodeGraph`; CUDA only). The
        logits are then a buffer the next call overwrites.
        """
        if cuda_graph:
            return torch.no_grad()(DecodeGraph(self, prompt, cache).step)
        return lambda tokens: self.decode_step(tokens, prompt, cache)

    def generate(self, *args, **kwargs):
        """Continue prompts: greedy, sampling or beam search (`qvl.model.generation.generate`)."""
        return generate(self, *args, **kwargs)
