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

import functools
from dataclasses import dataclass, replace

import torch
from torch import nn

from ..backends import CausalMask, Ops, Rotary, resolve_plan
from ..backends.interface import check_loss_inputs, divide_loss
from ..config import Qwen25VLConfig
from ..errors import InputError
from ..parallel.comm import gather, to_ranks, vocab_cross_entropy
from ..parallel.group import TensorParallel
from ..parallel.shard import check_vision_mode, local_sizes
from ..parallel.vision import encode_data_parallel
from . import generation
from .cache import StaticKVCache
from .graphs import DecodeGraph, DecodeGraphPool, PrefillGraphPool, VisionGraphPool
from .inputs import (
    check_cache_position,
    check_has_values,
    check_pixels,
    check_position_ids,
    check_rope_deltas,
    check_token_ids,
    first_non_finite,
    keep_positions,
    next_token_targets,
)
from .layers import inverse_frequencies
from .positions import check_grids, decode_positions, left_padding, mrope_positions
from .text import TextDecoder
from .vision import VisionTower


@dataclass
class Qwen25VLOutput:
    """What `Qwen25VL.forward` returns; transformers' Qwen2_5_VLCausalLMOutputWithPast fields.

    loss: 0-dim float32, only with labels. logits: (B, L, vocab) in the model's dtype; None when labels were
    given and the loss backend never made them (a chunked fused loss). rope_deltas (B, 1), transformers'
    meaning: a later token's position = the count of unpadded tokens before it + delta. past_key_values: the
    cache (with use_cache). hidden_states and attentions: per-layer tuples when asked for (`Qwen25VL.forward`).
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: object = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    rope_deltas: torch.Tensor | None = None

    @property
    def cache(self):
        """transformers 5's name for past_key_values."""
        return self.past_key_values


def transformers_deltas(slot_deltas: torch.Tensor, pad: torch.Tensor | None) -> torch.Tensor:
    """qvl keeps deltas against cache slots (padding counted); transformers' count only unpadded tokens."""
    return slot_deltas if pad is None else slot_deltas + pad[:, None]


def slot_deltas(deltas: torch.Tensor, pad: torch.Tensor | None) -> torch.Tensor:
    """transformers' rope deltas (see `transformers_deltas`) -> qvl's, against cache slots."""
    return deltas if pad is None else deltas - pad[:, None]


@dataclass
class Prompt:
    """A prompt prepared for the decoder: embeddings, 3-D positions, padding, and the decode delta."""

    embeds: torch.Tensor
    positions: torch.Tensor  # (3, B, L)
    pad: torch.Tensor | None  # (B,) left padding, None if none
    deltas: torch.Tensor  # (B, 1): decode position = cache slot + delta
    uniform: bool  # the three position streams are equal (text): 1-D rotary kernels apply

    def repeat_rows(self, times: int) -> Prompt:
        """Each row `times` times in a row (beams or returned sequences of one sample)."""
        if times == 1:
            return self
        return replace(self, embeds=self.embeds.repeat_interleave(times, 0),
                       positions=self.positions.repeat_interleave(times, 1),
                       pad=None if self.pad is None else self.pad.repeat_interleave(times, 0),
                       deltas=self.deltas.repeat_interleave(times, 0))


class Qwen25VL(nn.Module):
    def __init__(self, cfg: Qwen25VLConfig, backends=None, fallback: str | None = None,
                 parallel: TensorParallel | None = None, vision_parallel: str = "data"):
        """`parallel`: the tensor-parallel group this rank belongs to (`qvl.parallel.group.join`); the decoder is
        then built with this rank's sizes (`qvl.parallel.shard`), and the vision tower whole, run data-parallel
        (`vision_parallel="data"`), or split like the decoder ("tensor"). `from_config` and `from_pretrained` with
        `tp=N` build and fill it."""
        super().__init__()
        self.cfg = cfg.validate()
        self.parallel = parallel
        self.vision_parallel = check_vision_mode(vision_parallel)
        tp, rank = (1, 0) if parallel is None else (parallel.size, parallel.rank)
        self.sizes = local_sizes(cfg, tp, rank, vision_parallel)
        self.visual = VisionTower(cfg.vision, self.sizes, parallel if vision_parallel == "tensor" else None)
        self.model = TextDecoder(cfg.text, self.sizes, parallel)
        if not cfg.text.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.text.hidden_size, self.sizes.vocab_rows, bias=False)
        self.register_buffer("inv_freq", torch.empty(cfg.text.head_dim // 2), persistent=False)
        self.reset_rotary()
        self.graphs = DecodeGraphPool()  # decode steps captured once per shape, kept across generate calls
        self.vision_graphs = VisionGraphPool()  # the vision tower captured once per list of grids
        self.prefill_graphs = PrefillGraphPool()  # the prefill captured once per prompt shape, on a decode cache
        self.set_backends(backends, fallback=fallback)

    def _apply(self, fn, recurse=True):
        # .to(dtype / device) would cast the float32 frequency buffers and leave the cached Rotary
        # objects behind: rebuild both after every such move. Captured graphs hold the old tensors: drop them.
        super()._apply(fn, recurse)
        self.reset_rotary()
        self.clear_graphs()
        return self

    def clear_graphs(self) -> None:
        """Drop every captured graph (decode steps, vision towers, prefills) with the memory it holds."""
        self.graphs.clear()
        self.vision_graphs.clear()
        self.prefill_graphs.clear()

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
        """Resolve a backend plan (see `qvl.backends.registry`) and route every operator through it. Captured
        graphs (decode steps, vision towers, prefills) replay the old plan's kernels: they are dropped when the plan
        changes."""
        plan = resolve_plan(backends, fallback=fallback)
        if getattr(self, "ops", None) is None or plan != self.ops.plan:
            self.clear_graphs()
        self.ops = Ops(plan)
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

    def vision_features(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor,
                        cuda_graph: bool = False) -> torch.Tensor:
        """The merged vision tokens of every image (or video) in `grid_thw`, in order. Under tensor parallelism
        with the tower data-parallel the images are split over the ranks (each encodes some, the features are
        gathered), except while autograd records for the tower: every rank then encodes every image, so the
        tower's gradients are whole on each. A split tower ("tensor") encodes every image on every rank.

        cuda_graph: replay the tower from a CUDA graph (CUDA only), captured by the first call of these grids
        (in order), pixel dtype and plan and kept for later ones (`self.vision_graphs`, a `VisionGraphPool`).
        Inference only: the features carry no gradient.
        """
        pixels = pixel_values.to(self.device)
        if cuda_graph:
            encode, records = torch.no_grad()(functools.partial(self.vision_graphs.features, self)), False
        else:
            encode = functools.partial(self.visual, self.ops)
            records = torch.is_grad_enabled() and (pixels.requires_grad or any(
                p.requires_grad for p in self.visual.parameters()))
        if self.parallel is None or self.vision_parallel == "tensor" or records:
            return encode(pixels, grid_thw)
        return encode_data_parallel(encode, pixels, grid_thw, self.cfg.vision, self.parallel, self.dtype)

    # --- transformers' public helpers -----------------------------------------------------------------------

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def get_image_features(self, pixel_values: torch.Tensor, image_grid_thw) -> tuple[torch.Tensor, ...]:
        """The merged vision tokens of each image, (t*h*w / merge^2, hidden) apiece, in order."""
        return self._split_features(pixel_values, image_grid_thw, "image_grid_thw")

    def get_video_features(self, pixel_values_videos: torch.Tensor, video_grid_thw) -> tuple[torch.Tensor, ...]:
        """The merged vision tokens of each video, (t*h*w / merge^2, hidden) apiece, in order."""
        return self._split_features(pixel_values_videos, video_grid_thw, "video_grid_thw")

    def _split_features(self, pixels, grid_thw, what: str) -> tuple[torch.Tensor, ...]:
        merge = self.cfg.vision.spatial_merge_size
        grid = check_grids(grid_thw, merge, what)
        check_pixels(pixels, grid, self.cfg.vision.patch_dim, what.removesuffix("_grid_thw"))
        sizes = (grid.prod(-1) // merge**2).tolist()
        return torch.split(self.vision_features(pixels, grid), sizes)

    def get_rope_index(self, input_ids: torch.Tensor, image_grid_thw=None, video_grid_thw=None,
                       second_per_grid_ts=None, attention_mask=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(3, B, L) M-RoPE positions and the (B, 1) deltas (decode position = cache slot + delta) of a prompt:
        transformers' get_rope_index, placeholders read from input_ids. The deltas are transformers': the next
        position = the count of unpadded tokens before it + delta."""
        ids = check_token_ids(input_ids, self.cfg.text.vocab_size, "input_ids").to(self.device, torch.long)
        pad = left_padding(attention_mask, ids.shape, self.device)
        merge = self.cfg.vision.spatial_merge_size
        positions, deltas = mrope_positions(self.cfg, ids, pad, check_grids(image_grid_thw, merge, "image_grid_thw"),
                                            check_grids(video_grid_thw, merge, "video_grid_thw"), second_per_grid_ts)
        return positions, transformers_deltas(deltas, pad)

    # --- inputs ----------------------------------------------------------------------------------------------

    def prepare(self, input_ids=None, attention_mask=None, pixel_values=None, image_grid_thw=None,
                pixel_values_videos=None, video_grid_thw=None, second_per_grid_ts=None, *, inputs_embeds=None,
                position_ids=None, rope_deltas=None, past: StaticKVCache | None = None,
                mm_token_type_ids=None, cuda_graph: bool = False) -> Prompt:
        """Check the inputs, run the vision tower, place its features, compute positions. Records gradients
        for the embeddings and the vision tower when autograd does.

        Exactly one of `input_ids` (B, L) and `inputs_embeds` (B, L, hidden). Without ids, image and video
        placeholders are the rows equal to their token's embedding (as transformers finds them), and the 3-D
        positions are computed from those. `position_ids` (3, B, L), or (B, L) for all three streams, replace
        the computed positions (packed sequences). `past`: a cache these tokens continue (positions from its
        rope deltas, or `rope_deltas`); `attention_mask` then covers the cached tokens and these.
        `mm_token_type_ids` (what transformers' processor returns) is accepted and not needed: the token ids
        say the same. `cuda_graph`: run the vision tower from the model's pooled CUDA graphs (`vision_features`).
        """
        cfg = self.cfg
        ids, embeds = self._tokens(input_ids, inputs_embeds)
        batch, length = embeds.shape[:2]
        past_length = 0 if past is None else past.length
        if past is not None and past.batch != batch:
            raise InputError(f"the cache holds {past.batch} rows, the tokens {batch}")
        if mm_token_type_ids is not None and (not isinstance(mm_token_type_ids, torch.Tensor)
                                              or tuple(mm_token_type_ids.shape) != (batch, length)):
            got = (tuple(mm_token_type_ids.shape) if isinstance(mm_token_type_ids, torch.Tensor)
                   else type(mm_token_type_ids).__name__)
            raise InputError(f"mm_token_type_ids must be ({batch}, {length}) like the tokens, got {got}")
        if rope_deltas is not None:
            rope_deltas = check_rope_deltas(rope_deltas, batch)
        if attention_mask is not None:
            pad = left_padding(attention_mask, (batch, past_length + length), self.device)
        else:
            pad = None if past is None else past.pad
        merge = cfg.vision.spatial_merge_size
        image_grid_thw = check_grids(image_grid_thw, merge, "image_grid_thw")
        video_grid_thw = check_grids(video_grid_thw, merge, "video_grid_thw")
        if second_per_grid_ts is not None and video_grid_thw is None:
            raise InputError("second_per_grid_ts given without video_grid_thw")

        placeholders, source = {}, "input_ids" if ids is not None else "inputs_embeds"
        for kind, pixels, grid, token in (("image", pixel_values, image_grid_thw, cfg.image_token_id),
                                          ("video", pixel_values_videos, video_grid_thw, cfg.video_token_id)):
            placeholder = ids == token if ids is not None else self._is_embedding_of(embeds, token)
            placeholders[token] = placeholder
            n_tokens = int(placeholder.sum())
            if (pixels is None) != (grid is None):
                raise InputError(f"{kind}: pass both the pixels and their grid_thw, or neither")
            if pixels is None:
                if n_tokens:
                    raise InputError(f"{source} hold {n_tokens} {kind} placeholder tokens but no {kind} pixels "
                                     "were given")
                continue
            if past is not None and position_ids is None:
                raise InputError(f"{kind} pixels in a continuation of a cache: their 3-D positions need the whole "
                                 "prompt; put the vision inputs in the first forward, or pass position_ids")
            check_pixels(pixels, grid, cfg.vision.patch_dim, kind)
            expected = int(grid.prod(-1).sum()) // merge**2
            if n_tokens != expected:
                raise InputError(f"{source} hold {n_tokens} {kind} placeholder tokens, but the {kind} grids "
                                 f"{grid.tolist()} give {expected} merged {kind} tokens")
            features = self.vision_features(pixels, grid, cuda_graph).to(embeds.dtype)
            embeds = embeds.masked_scatter(placeholder.unsqueeze(-1), features)

        if position_ids is not None:
            positions = check_position_ids(position_ids, batch, length).to(self.device)
            deltas = positions.amax(dim=(0, 2)).view(batch, 1) + 1 - (past_length + length)
            if rope_deltas is not None:
                deltas = slot_deltas(rope_deltas.to(self.device), pad)
            return Prompt(embeds, positions, pad, deltas, uniform=False)
        if past is not None:
            deltas = past.rope_deltas if rope_deltas is None else slot_deltas(rope_deltas.to(self.device), pad)
            if deltas is None:
                deltas = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
            return Prompt(embeds, decode_positions(past_length, length, deltas.to(self.device)), pad, deltas,
                          uniform=True)
        if ids is None:  # the placeholders found in the embeddings stand for the ids the positions read
            ids = torch.zeros(batch, length, dtype=torch.long, device=self.device)
            for token, placeholder in placeholders.items():
                ids = ids.masked_fill(placeholder, token)
        positions, deltas = mrope_positions(cfg, ids, pad, image_grid_thw, video_grid_thw, second_per_grid_ts)
        uniform = image_grid_thw is None and video_grid_thw is None
        return Prompt(embeds, positions, pad, deltas, uniform=uniform)

    def _tokens(self, input_ids, inputs_embeds) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(checked ids or None, embeddings) from exactly one of input_ids and inputs_embeds."""
        if (input_ids is None) == (inputs_embeds is None):
            raise InputError("pass exactly one of input_ids and inputs_embeds")
        if input_ids is not None:
            ids = check_token_ids(input_ids, self.cfg.text.vocab_size, "input_ids").to(self.device, torch.long)
            return ids, self.model.embed_tokens(ids)
        hidden = self.cfg.text.hidden_size
        if (not isinstance(inputs_embeds, torch.Tensor) or inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != hidden
                or not inputs_embeds.is_floating_point()):
            got = (f"{tuple(inputs_embeds.shape)} {inputs_embeds.dtype}" if isinstance(inputs_embeds, torch.Tensor)
                   else type(inputs_embeds).__name__)
            raise InputError(f"inputs_embeds must be a (batch, length, {hidden}) float tensor, got {got}")
        if inputs_embeds.shape[0] == 0 or inputs_embeds.shape[1] == 0:
            raise InputError(f"inputs_embeds is empty: {tuple(inputs_embeds.shape)}")
        check_has_values(inputs_embeds, "inputs_embeds")
        found = first_non_finite(inputs_embeds.reshape(-1, hidden))
        if found is not None:
            b, i = divmod(found[0], inputs_embeds.shape[1])
            raise InputError(f"inputs_embeds hold {found[1]} (not finite) at batch row {b}, position {i}: embeddings "
                             "must be finite numbers")
        return None, inputs_embeds.to(self.device, self.dtype)

    def _is_embedding_of(self, embeds: torch.Tensor, token: int) -> torch.Tensor:
        """(B, L) True where a row of embeds equals token's embedding exactly (transformers' placeholder test)."""
        with torch.no_grad():
            row = self.model.embed_tokens(torch.tensor([token], device=self.device))[0]
        return (embeds == row.to(embeds.dtype)).all(-1)

    def _local_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The logits of this rank's vocabulary rows (all of them at tp 1)."""
        return self.ops.linear(to_ranks(hidden, self.parallel), self.lm_weight())

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return gather(self._local_logits(hidden), -1, self.parallel)

    def _loss(self, hidden: torch.Tensor, targets: torch.Tensor, divisor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(loss, logits or None) of (N, hidden) states against (N,) targets: the `loss` operator, or under tensor
        parallelism the vocabulary-parallel cross-entropy over each rank's logit columns."""
        if self.parallel is None:
            return self.ops.loss(hidden, self.lm_weight(), targets, divisor)
        check_loss_inputs(hidden, self.lm_weight(), targets, divisor)
        local = self._local_logits(hidden)
        total = vocab_cross_entropy(local, targets, self.sizes.vocab_first, self.parallel)
        return divide_loss(total, targets, divisor), gather(local, -1, self.parallel)

    # --- forward and generation ------------------------------------------------------------------------------

    def forward(self, input_ids=None, attention_mask=None, pixel_values=None, image_grid_thw=None,
                pixel_values_videos=None, video_grid_thw=None, second_per_grid_ts=None, labels=None,
                num_items_in_batch=None, *, inputs_embeds=None, position_ids=None, past_key_values=None,
                use_cache: bool | None = None, cache_position=None, rope_deltas=None, logits_to_keep=0,
                output_hidden_states: bool = False, output_attentions: bool = False,
                mm_token_type_ids=None, cache=None) -> Qwen25VLOutput:
        """transformers' Qwen2_5_VLForConditionalGeneration.forward: logits, and the loss with labels.

        Inputs: exactly one of `input_ids` and `inputs_embeds` (see `prepare`), the vision inputs, and
        `position_ids` to bypass the 3-D position computation.

        Loss: labels (B, L) like input_ids: the logits at position i are scored against labels[i + 1]; -100
        (IGNORE_INDEX) is not counted. The loss is the mean over counted tokens, or their sum divided by
        `num_items_in_batch` when given (gradient accumulation over micro-batches). A batch with no counted
        token has loss 0 and zero gradients. With labels the LM head and the loss run as one `loss` operator:
        backends that never build the whole logits (triton's chunked kernel) return `logits=None`.

        Cache: `use_cache=True` returns `past_key_values`, a `StaticKVCache` holding these tokens (and their
        rope deltas); pass it back with the next tokens and the attention mask over all of them to continue:
        the same logits as one forward over everything. `cache_position` (the new tokens' slots, contiguous,
        starting at or before the cached length) rewinds the cache to its first slot. `cache` is accepted as
        transformers 5's name for `past_key_values`. Without use_cache nothing is cached (transformers' default
        is True; qvl's is False: a cache costs memory only a continuation uses).

        Outputs: `logits_to_keep` (an int n > 0: the last n positions; a 1-D index tensor: those positions;
        0: all). `output_hidden_states=True`: transformers' tuple (the embeddings, the stream after each layer
        but the last, and the normed output). `output_attentions=True`: each text layer's attention weights
        (B, heads, Lq, Lk in the model's dtype) from the attention backends that form them (eager; the others
        refuse with that reason, or the plan's fallback takes those calls).

        Gradients flow when autograd records (not under torch.no_grad / inference_mode): wrap inference in
        one of them, as `generate` does. A cached past is a constant to them.
        """
        if cache is not None and past_key_values is not None:
            raise InputError("pass the cache once, as past_key_values or as cache")
        past = past_key_values if past_key_values is not None else cache
        if labels is not None and not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
            raise InputError("labels score every position: logits_to_keep must be 0 with labels")
        if past is not None and not isinstance(past, StaticKVCache):
            raise InputError(f"past_key_values must be the cache a forward with use_cache=True returned, got "
                             f"{type(past).__name__}")
        if past is not None and cache_position is not None:
            tokens = input_ids if input_ids is not None else inputs_embeds
            length = tokens.shape[1] if isinstance(tokens, torch.Tensor) and tokens.dim() >= 2 else None
            past.length = check_cache_position(cache_position, past.length, length)
        p = self.prepare(input_ids, attention_mask, pixel_values, image_grid_thw, pixel_values_videos,
                         video_grid_thw, second_per_grid_ts, inputs_embeds=inputs_embeds, position_ids=position_ids,
                         rope_deltas=rope_deltas, past=past, mm_token_type_ids=mm_token_type_ids)
        batch, length = p.embeds.shape[:2]
        if use_cache and past is None:
            past = self.new_cache(batch, length)
        if past is not None:
            past.ensure_capacity(past.length + length, self.cfg.text.max_position_embeddings)
        start = 0 if past is None else past.length
        hidden_states = [] if output_hidden_states else None
        attentions = [] if output_attentions else None
        hidden = self.model(self.ops, p.embeds, p.positions, self.rotary(p.uniform), CausalMask(p.pad), cache=past,
                            start=start, hidden_states=hidden_states, attentions=attentions)
        if past is not None:
            past.length, past.pad = start + length, p.pad
            past.rope_deltas = p.deltas
        out = Qwen25VLOutput(past_key_values=past, rope_deltas=transformers_deltas(p.deltas, p.pad),
                             hidden_states=None if hidden_states is None else tuple(hidden_states),
                             attentions=None if attentions is None else tuple(attentions))
        if labels is None:
            out.logits = self.logits(keep_positions(hidden, logits_to_keep))
            return out
        targets = next_token_targets(labels, (batch, length), self.cfg.text.vocab_size, self.device)
        loss, logits = self._loss(hidden.flatten(0, 1), targets.flatten(), num_items_in_batch)
        out.loss, out.logits = loss, None if logits is None else logits.view(batch, length, -1)
        return out

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
        """An empty cache for `batch` rows of up to `max_len` tokens; `ResourceError` if it would not fit."""
        return StaticKVCache(*self._cache_layout(batch, max_len), self.dtype, self.device)

    def check_cache_fits(self, batch: int, max_len: int) -> None:
        """What `new_cache(batch, max_len)` checks, without allocating: `ResourceError` if it would not fit."""
        StaticKVCache.ensure_fits(*self._cache_layout(batch, max_len), self.dtype, self.device)

    def _cache_layout(self, batch: int, max_len: int) -> tuple[int, int, int, int, int]:
        t = self.cfg.text
        return t.num_hidden_layers, batch, max_len, self.sizes.kv_heads, t.head_dim

    @torch.no_grad()
    def prefill(self, prompt: Prompt, cache: StaticKVCache, cuda_graph: bool = False) -> torch.Tensor:
        """Run the prompt into an empty cache; return the last position's logits (B, vocab).

        cuda_graph: replay the device work (`prefill_logits`) from a CUDA graph (CUDA only), captured by the
        first prompt of its shape and kept for later ones (`self.prefill_graphs`, a `PrefillGraphPool`); `cache`
        must then be the pooled one of `decode_cache(..., cuda_graph=True)`, which the graph writes.
        """
        if cuda_graph:
            logits = self.prefill_graphs.logits(self, prompt, cache)
        else:
            logits = self.prefill_logits(prompt.embeds, prompt.positions, prompt.pad, prompt.uniform, cache)
        cache.length = prompt.embeds.shape[1]
        return logits

    def prefill_logits(self, embeds: torch.Tensor, positions: torch.Tensor, pad: torch.Tensor | None,
                       uniform: bool, cache: StaticKVCache) -> torch.Tensor:
        """The prefill's device work on a prepared prompt: the decoder layers over `embeds` (B, L, hidden) at
        `positions` (3, B, L) with left padding `pad` (B,) or None, writing cache slots [0, L), then the final
        norm and the last position's logits (B, vocab). It launches the same work for every prompt of a shape and
        reads no value back to the host (the padding too, where the plan's attention reads it on the device:
        `graphs.padding_read_on_device`), so `PrefillGraph` captures it; `cache.length` is the caller's."""
        hidden = self.model(self.ops, embeds, positions, self.rotary(uniform), CausalMask(pad), cache=cache, start=0)
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

    def decode_cache(self, batch: int, max_len: int, cuda_graph: bool = False) -> StaticKVCache:
        """An empty cache to prefill and then decode into: a new one, or with cuda_graph the cache of the graph
        pool's entry for this batch and length bucket (`self.graphs`), whose captured step `decoder` replays."""
        if not cuda_graph:
            return self.new_cache(batch, max_len)
        cache = self.graphs.acquire(self, batch, max_len).cache
        cache.reset()
        return cache

    def decoder(self, prompt: Prompt, cache: StaticKVCache, cuda_graph: bool = False):
        """The decode step for this prompt and cache as a callable: tokens (B,) -> logits (B, vocab).

        cuda_graph: replay the step from a CUDA graph (CUDA only): the pooled one when `cache` came from
        `decode_cache(..., cuda_graph=True)` (captured by the first call of its shape, replayed by later calls),
        else one captured for this cache alone. The logits are then a buffer the next call overwrites.
        """
        if cuda_graph:
            pooled = self.graphs.entry_for(cache)
            if pooled is None:
                return torch.no_grad()(DecodeGraph(self, prompt, cache).step)
            pooled.start(prompt)
            return torch.no_grad()(pooled.graph.step)
        return lambda tokens: self.decode_step(tokens, prompt, cache)

    # Continue prompts: greedy, sampling or beam search; `qvl.model.generation.generate` with the model as self
    # (its signature and docstring, as help() shows them).
    generate = generation.generate
