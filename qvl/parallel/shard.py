"""What each tensor-parallel rank holds: the degrees that can split the model, and every parameter's split.

Megatron-style tensor parallelism over `tp` ranks, as vLLM and SGLang run Qwen2.5-VL:

    colwise     qkv_proj, gate_up_proj: each rank computes its own output rows (its heads, its share of the
                MLP's inner width) from the whole input
    rowwise     o_proj, down_proj: each rank multiplies its share of the input columns; the partial outputs
                are summed over the ranks (an all-reduce)
    vocab       embed_tokens, lm_head: each rank holds a contiguous block of vocabulary rows
    replicated  the norms, a row-parallel layer's bias (added once, after the sum), and the whole vision tower
                (it runs data-parallel: each rank encodes some of the images)

The vision tower may instead be split like the decoder (`vision="tensor"`, where its heads and MLP width divide
by tp): each block's qkv and first MLP layer column-parallel, its attention output and last MLP layer
row-parallel; the patch embedding, norms and merger replicated.

A fused matrix is not split contiguously. qkv_proj stacks [q; k; v]: rank r holds its query heads' q rows, its
KV heads' k rows and their v rows (three ranges). gate_up_proj stacks [gate; up]: rank r holds its gate rows and
the same rows of up (two ranges). When tp exceeds num_key_value_heads, each KV head is replicated over
tp / num_key_value_heads ranks: every rank holds the one KV head its query heads read.

Every split is a `RankSlice`, one dim and (start, stop) ranges along it: `rank_slice` cuts a tensor with it and
`assemble` puts every rank's piece back in the whole, `rank_shape` and `rank_bytes` size a rank without any
tensor, and `checkpoint_slices` maps it onto the unfused checkpoint tensors, so a reader fetches only a rank's
rows (safetensors' ``get_slice``). The later distributed runtime builds on these; this module needs no process
group.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass

import torch

from ..config import Qwen25VLConfig
from ..errors import ConfigError

STYLES = ("colwise", "rowwise", "vocab", "replicated")
VISION_MODES = ("data", "tensor")  # how the vision tower runs under tensor parallelism

# Parameter name (as in model.named_parameters()) -> style; the first full match wins. A name no rule matches is an
# error, so a parameter added to the model must be given its split here rather than replicated unnoticed.
_LAYER = r"model\.layers\.\d+\."
_BLOCK = r"visual\.blocks\.\d+\."
_VISION_TENSOR_RULES: tuple[tuple[re.Pattern, str], ...] = tuple((re.compile(p), s) for p, s in (
    (_BLOCK + r"(attn\.qkv|mlp\.gate_up_proj|mlp\.fc1)\.(weight|bias)", "colwise"),
    (_BLOCK + r"(attn\.proj|mlp\.down_proj|mlp\.fc2)\.weight", "rowwise"),
))  # ahead of _RULES when the vision tower is split; everything else in it stays replicated
_RULES: tuple[tuple[re.Pattern, str], ...] = tuple((re.compile(p), s) for p, s in (
    (r"visual\..+", "replicated"),
    (r"model\.embed_tokens\.weight|lm_head\.weight", "vocab"),
    (_LAYER + r"(self_attn\.qkv_proj\.(weight|bias)|mlp\.gate_up_proj\.weight)", "colwise"),
    (_LAYER + r"(self_attn\.o_proj|mlp\.down_proj)\.weight", "rowwise"),
    (_LAYER + r"(self_attn\.o_proj|mlp\.down_proj)\.bias", "replicated"),
    (_LAYER + r"(input_layernorm|post_attention_layernorm)\.weight|model\.norm\.weight", "replicated"),
))


# --- degrees ---------------------------------------------------------------------------------------------------


def check_vision_mode(vision: str) -> str:
    if vision not in VISION_MODES:
        raise ConfigError(f"the vision tower runs 'data'- or 'tensor'-parallel, got {vision!r}")
    return vision


def _splits(cfg: Qwen25VLConfig, vision: str = "data") -> tuple[tuple[str, int, str], ...]:
    """(dimension, size, how a degree must relate to it) for each dimension tensor parallelism splits."""
    t, v = cfg.text, cfg.vision
    decoder = (("num_attention_heads", t.num_attention_heads, "divide"),
               ("num_key_value_heads", t.num_key_value_heads, "divide or be divided by"),
               ("intermediate_size", t.intermediate_size, "divide"),
               ("vocab_size", t.vocab_size, "divide"))
    if check_vision_mode(vision) == "data":
        return decoder
    return decoder + (("vision num_heads", v.num_heads, "divide"), ("vision intermediate_size", v.intermediate_size,
                                                                    "divide"))


def _fits(tp: int, size: int, rule: str) -> bool:
    # KV heads are split when tp divides them, replicated when they divide tp
    return size % tp == 0 or (rule != "divide" and tp % size == 0)


@functools.lru_cache(maxsize=64)
def valid_degrees(cfg: Qwen25VLConfig, vision: str = "data") -> tuple[int, ...]:
    """Every degree that splits the decoder (and the vision tower, with `vision="tensor"`), ascending. Each
    divides num_attention_heads, so only its divisors are candidates."""
    heads = cfg.text.num_attention_heads
    divisors = {d for i in range(1, math.isqrt(heads) + 1) if heads % i == 0 for d in (i, heads // i)}
    return tuple(d for d in sorted(divisors) if all(_fits(d, size, rule) for _, size, rule in _splits(cfg, vision)))


def _check_int(value, name: str, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")


def check_degree(cfg: Qwen25VLConfig, tp: int, vision: str = "data") -> None:
    """Refuse (`ConfigError`, one line) a degree that cannot split the decoder (and with `vision="tensor"` the
    vision tower), naming the dimension, its size and the degrees that would: ``tp 3 cannot split
    num_attention_heads 16; degrees that split every dimension: 1, 2, 4, 8, 16``. The vocabulary is not padded
    (vLLM pads it): a degree must divide it."""
    _check_int(tp, "tp", 1)
    for dim, size, rule in _splits(cfg, vision):
        if not _fits(tp, size, rule):
            why = " (KV heads are split when tp divides them, replicated when they divide tp)" if rule != "divide" \
                else ""
            raise ConfigError(f"tp {tp} cannot split {dim} {size}{why}; degrees that split every dimension: "
                              f"{', '.join(map(str, valid_degrees(cfg, vision)))}")


def local_heads(cfg: Qwen25VLConfig, tp: int) -> tuple[int, int]:
    """(query heads, KV heads) one rank holds: what its attention, rope and cache operators see."""
    check_degree(cfg, tp)
    t = cfg.text
    return t.num_attention_heads // tp, max(1, t.num_key_value_heads // tp)


@dataclass(frozen=True)
class LocalSizes:
    """The sizes one rank builds its layers with (the whole model's at tp 1)."""

    heads: int  # query heads
    kv_heads: int  # KV heads (one, replicated, when tp exceeds them)
    intermediate: int  # the MLP's inner width
    vocab_first: int  # the first token id of the rank's embedding and LM-head rows
    vocab_rows: int
    vision_heads: int  # the vision blocks' heads and MLP width: all of them unless the tower is split
    vision_intermediate: int


def local_sizes(cfg: Qwen25VLConfig, tp: int = 1, rank: int = 0, vision: str = "data") -> LocalSizes:
    """What rank `rank` of `tp` holds of each split dimension; the shapes `rank_shape` gives its parameters."""
    check_degree(cfg, tp, vision)
    heads, kv_heads = local_heads(cfg, tp)
    first, stop = share(cfg.text.vocab_size, tp, rank)
    split = tp if vision == "tensor" else 1
    return LocalSizes(heads, kv_heads, cfg.text.intermediate_size // tp, first, stop - first,
                      cfg.vision.num_heads // split, cfg.vision.intermediate_size // split)


# --- one parameter ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RankSlice:
    """One rank's piece of a parameter: the indexes in `ranges` ((start, stop) pairs, ascending) along `dim`,
    concatenated in order. Replicated parameters take their whole dim 0."""

    style: str
    dim: int
    ranges: tuple[tuple[int, int], ...]

    @property
    def length(self) -> int:
        return sum(stop - start for start, stop in self.ranges)

    def shape(self, full: tuple[int, ...]) -> tuple[int, ...]:
        return full[:self.dim] + (self.length,) + full[self.dim + 1:]

    def take(self, tensor: torch.Tensor) -> torch.Tensor:
        """The piece of `tensor` (a view when it is one range, a new tensor otherwise)."""
        pieces = [tensor.narrow(self.dim, start, stop - start) for start, stop in self.ranges]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, self.dim)

    def put(self, piece: torch.Tensor, whole: torch.Tensor) -> None:
        """Copy `piece` (what `take` cuts) into its indexes of `whole`: the inverse of `take`."""
        at = 0
        for start, stop in self.ranges:
            whole.narrow(self.dim, start, stop - start).copy_(piece.narrow(self.dim, at, stop - start))
            at += stop - start


def split_style(name: str, vision: str = "data") -> str:
    """How parameter `name` is split across ranks: one of STYLES."""
    rules = _VISION_TENSOR_RULES + _RULES if check_vision_mode(vision) == "tensor" else _RULES
    for pattern, style in rules:
        if pattern.fullmatch(name):
            return style
    raise ConfigError(f"no tensor-parallel split for parameter {name!r}: add it to qvl.parallel.shard's rules")


@functools.lru_cache(maxsize=8)
def parameter_shapes(cfg: Qwen25VLConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter's full shape, by name, from the model itself built on the meta device (no memory)."""
    from ..model.qwen2_5_vl import Qwen25VL

    with torch.device("meta"):
        model = Qwen25VL(cfg, backends="eager")
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def share(size: int, tp: int, rank: int) -> tuple[int, int]:
    """Rank `rank`'s contiguous block of `size` split evenly in `tp`."""
    return rank * size // tp, (rank + 1) * size // tp


def _merged(ranges: list[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """Adjacent ranges joined (at tp 1 a fused matrix is one range), empty ones dropped."""
    out: list[tuple[int, int]] = []
    for start, stop in ranges:
        if stop <= start:
            continue
        if out and out[-1][1] == start:
            out[-1] = (out[-1][0], stop)
        else:
            out.append((start, stop))
    return tuple(out)


def rank_ranges(name: str, cfg: Qwen25VLConfig, tp: int, rank: int, vision: str = "data") -> RankSlice:
    """Which indexes of parameter `name` rank `rank` of `tp` holds. The one place a split is computed."""
    check_degree(cfg, tp, vision)
    _check_int(rank, "rank", 0)
    if rank >= tp:
        raise ConfigError(f"rank {rank} out of range for tp {tp} (ranks 0 to {tp - 1})")
    shapes = parameter_shapes(cfg)
    if name not in shapes:
        raise ConfigError(f"{name!r} is not a parameter of this model")
    style, full = split_style(name, vision), shapes[name]
    module = name.split(".")[-2]
    if style == "replicated":
        return RankSlice(style, 0, ((0, full[0]),))
    if style == "vocab":
        return RankSlice(style, 0, (share(cfg.text.vocab_size, tp, rank),))
    if name.startswith("visual."):  # a split vision block: as many KV heads as query heads, [q; k; v] in qkv
        v = cfg.vision
        return _block_ranges(style, module, v.num_heads, v.num_heads, v.head_dim, v.intermediate_size, tp, rank)
    t = cfg.text
    return _block_ranges(style, module, t.num_attention_heads, t.num_key_value_heads, t.head_dim,
                         t.intermediate_size, tp, rank)


def _block_ranges(style: str, module: str, heads: int, kv: int, d: int, intermediate: int, tp: int,
                  rank: int) -> RankSlice:
    """A split attention or MLP layer's piece (modules named as the text decoder's or the vision blocks')."""
    q_rows = share(heads * d, tp, rank)  # this rank's query heads, as rows of q (or columns of o)
    if module in ("o_proj", "proj"):
        return RankSlice(style, 1, (q_rows,))
    inner = share(intermediate, tp, rank)
    if module in ("down_proj", "fc2"):
        return RankSlice(style, 1, (inner,))
    if module == "fc1":
        return RankSlice(style, 0, (inner,))
    if module == "gate_up_proj":  # [gate; up]: the rank's gate rows, then the same rows of up
        return RankSlice(style, 0, _merged([inner, (intermediate + inner[0], intermediate + inner[1])]))
    # qkv_proj / qkv, [q; k; v]: the rank's q heads, then its KV heads' k and v. Past tp = KV heads, rank r's
    # query heads all read KV head r * kv // tp (one head, replicated over tp // kv ranks).
    head = share(kv, tp, rank) if tp <= kv else (rank * kv // tp, rank * kv // tp + 1)
    k_rows = (head[0] * d, head[1] * d)
    q_all, kv_all = heads * d, kv * d
    return RankSlice(style, 0, _merged([q_rows, (q_all + k_rows[0], q_all + k_rows[1]),
                                        (q_all + kv_all + k_rows[0], q_all + kv_all + k_rows[1])]))


def rank_slice(name: str, tensor: torch.Tensor, cfg: Qwen25VLConfig, tp: int, rank: int,
               vision: str = "data") -> torch.Tensor:
    """Rank `rank`'s piece of parameter `name`, given the whole parameter `tensor`."""
    full = parameter_shapes(cfg).get(name)
    if full is not None and tuple(tensor.shape) != full:
        raise ConfigError(f"{name} has shape {tuple(full)} in this model, got a tensor of {tuple(tensor.shape)}")
    return rank_ranges(name, cfg, tp, rank, vision).take(tensor)


def assemble(name: str, pieces: list[torch.Tensor], cfg: Qwen25VLConfig, vision: str = "data") -> torch.Tensor:
    """Parameter `name` whole (or its gradient) from every rank's piece, `pieces[r]` rank r's as `rank_slice` cuts
    it: the inverse of `rank_slice`, tp being len(pieces). Indexes several ranks hold (a replicated parameter, a
    KV head replicated past tp = KV heads) come from any one of them: they hold the same values (a replicated KV
    head's gradient is summed over its ranks, `qvl.parallel.comm.replicated_rows`)."""
    splits = [rank_ranges(name, cfg, len(pieces), rank, vision) for rank in range(len(pieces))]
    full = parameter_shapes(cfg)[name]
    whole = pieces[0].new_empty(full)
    for rank, (piece, where) in enumerate(zip(pieces, splits, strict=True)):
        if tuple(piece.shape) != where.shape(full):
            raise ConfigError(f"{name}: rank {rank}'s piece has shape {tuple(piece.shape)}, its split "
                              f"{where.shape(full)}")
        where.put(piece, whole)
    return whole


def rank_shape(name: str, cfg: Qwen25VLConfig, tp: int, rank: int = 0, vision: str = "data") -> tuple[int, ...]:
    """The shape of rank `rank`'s piece of parameter `name`, without any tensor."""
    return rank_ranges(name, cfg, tp, rank, vision).shape(parameter_shapes(cfg)[name])


def rank_bytes(cfg: Qwen25VLConfig, dtype: torch.dtype, tp: int, rank: int = 0, *, tower: str | None = None,
               vision: str = "data") -> int:
    """Exact bytes of the parameters rank `rank` holds in `dtype`; `tower` "decoder" (with the LM head) or
    "vision" counts only that part."""
    if tower not in (None, "decoder", "vision"):
        raise ConfigError(f"tower must be 'decoder', 'vision' or None, got {tower!r}")
    names = [n for n in parameter_shapes(cfg) if tower is None or (n.startswith("visual.") == (tower == "vision"))]
    return sum(math.prod(rank_shape(n, cfg, tp, rank, vision)) for n in names) * dtype.itemsize


def checkpoint_slices(name: str, sources: list[tuple[str, int]], cfg: Qwen25VLConfig, tp: int,
                      rank: int, vision: str = "data") -> list[tuple[str, RankSlice]]:
    """Rank `rank`'s piece of parameter `name` as pieces of the checkpoint tensors that fill it.

    `sources` is `qvl.checkpoint.checkpoint_sources(model)[name]`: (checkpoint key, first row in the parameter),
    in row order. Returns (key, slice of that tensor) for each source the rank reads, the ranges relative to the
    source's own rows; concatenating the pieces along the slice's dim, in order, gives `rank_slice`'s tensor.
    """
    piece = rank_ranges(name, cfg, tp, rank, vision)
    rows = parameter_shapes(cfg)[name][0]
    out = []
    for i, (key, first) in enumerate(sources):
        last = sources[i + 1][1] if i + 1 < len(sources) else rows
        if piece.dim != 0:  # a column split reads the same columns of every source
            out.append((key, piece))
            continue
        local = [(max(a, first) - first, min(b, last) - first) for a, b in piece.ranges]
        if ranges := _merged(local):
            out.append((key, RankSlice(piece.style, 0, ranges)))
    return out
