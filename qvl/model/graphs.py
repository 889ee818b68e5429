"""Work captured once in a CUDA graph and replayed: the decode step for every new token, the vision tower for
every image set of the same grids, the prefill for every prompt of the same shape.

At batch 1 a decode step is bound by the host: Python, the registry and each kernel launch cost more than
the kernels themselves run (benchmarks/host_overhead.py). Replaying a captured graph launches the whole step
at once. Capture needs every launch of the step to be the same at every length, so the step runs in its
device-length form (`Qwen25VL.decode_step(..., length=tensor)`): attention over the whole static cache with
the written length read on the device, the new K/V written at a slot read on the device. Backends that
cannot take lengths on the device (xformers' attention and cache) are routed by the model's fallback policy,
or refused when there is none, before anything is captured.

The vision tower is bound by the host the same way (the 3b triton tower took 13.9 ms for one image on an
H200, benchmarks/gpu/h200-2026-11-26-lease3, mostly launching kernels). Its launches depend only on the grids
(t, h, w) of the images: the host-side preparation from the grids (`VisionTower.layout`: positions, window
order, attention segments) runs once per grid list, outside the graph, and the device work on it
(`VisionTower.encode`) is captured. Its calls take every length from the grids, on the host, and read nothing
back (tests/model/test_host_syncs.py), so no call asks a backend for anything it could refuse in a graph;
calls the plan routes to its fallback are routed in the warm-up, before the capture, as in the decode step.

The prefill, time to first token, is bound by the host the same way at batch 1 (the 3b triton prefill of one
448x448 image and 256 text tokens took 31 ms on an H200, issue 23). `prepare` does everything that reads the
host (padding, positions, placeholders, the vision tower, the embedding lookup); the device work on what it
prepared (`Qwen25VL.prefill_logits`: the decoder layers writing the KV cache, the final norm, the last
position's logits) launches the same work for every prompt of a shape and reads nothing back, so it is
captured once per shape on the pooled decode cache it fills and replayed for every prompt of that shape.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, replace

import torch

from ..backends.registry import AUTO, get_backend
from ..dtypes import dtype_name
from ..errors import InputError


def require_cuda(device: torch.device, who: str = "DecodeGraph") -> None:
    if device.type != "cuda":
        raise InputError(f"{who}: CUDA graphs need the model on a CUDA device; it is on {device}")


def capture(fn, warmup: int = 1, device=None):
    """(graph, output): `fn()` run `warmup` times on a side stream (Triton compiles and autotunes there; capture
    needs the warm-up off the default stream), then captured once. Replaying the graph reruns fn's kernels on
    the same memory, output included."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    torch.cuda.synchronize(device)
    return graph, out


class DecodeGraph:
    """`model.decode_step(tokens, prompt, cache)`, captured for this prompt and cache and replayed by `step`.

    Building it runs two warm-up steps (Triton compiles and autotunes there, the registry takes its decisions)
    and captures a third; they write only the cache slot the first real step overwrites. The prompt and cache
    must stay as they are while the graph is used: it reads and writes them in place. The graph keeps the
    operators of the model's plan at capture: `set_backends` afterwards does not change what it replays.
    """

    WARMUP_STEPS = 2

    def __init__(self, model, prompt, cache):
        device = model.device
        require_cuda(device)
        if cache.length >= cache.max_len:
            raise ValueError(f"DecodeGraph: the cache is full ({cache.length} of {cache.max_len} slots)")
        self.cache = cache
        self.tokens = torch.zeros(cache.batch, dtype=torch.long, device=device)
        self.length = torch.full((), cache.length, dtype=torch.long, device=device)
        started = time.perf_counter()
        self.graph, self.logits = capture(lambda: model.decode_step(self.tokens, prompt, cache, length=self.length),
                                          self.WARMUP_STEPS, device)
        self.capture_seconds = time.perf_counter() - started

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed `tokens` (B,) at slot cache.length, advance it; the logits (B, vocab) are a buffer the next
        step overwrites (copy them to keep them)."""
        if self.cache.length >= self.cache.max_len:
            raise ValueError(f"DecodeGraph: the cache is full ({self.cache.length} of {self.cache.max_len} slots)")
        if tokens.shape != self.tokens.shape:  # copy_ would broadcast one token over the batch
            raise ValueError(f"DecodeGraph: tokens must be {tuple(self.tokens.shape)}, got {tuple(tokens.shape)}")
        self.tokens.copy_(tokens)
        self.length.fill_(self.cache.length)
        self.graph.replay()
        self.cache.length += 1
        return self.logits


@dataclass(frozen=True)
class GraphKey:
    """What a captured decode step is specific to: rows, cache slots, the operators chosen, dtype and device."""

    batch: int
    cache_len: int
    plan: str
    dtype: torch.dtype
    device: torch.device


class PooledDecode:
    """One pool entry: a static cache and the decode step captured on it, with the per-prompt values the step
    reads (rope deltas, left padding) in buffers of their own, so the graph serves every prompt of its shape.

    Prefill into `cache`, then `start(prompt)` loads the prompt's values (capturing the step the first time) and
    `graph.step(tokens)` replays it.
    """

    def __init__(self, model, key: GraphKey):
        self.model, self.key = model, key
        self.cache = model.new_cache(key.batch, key.cache_len)
        self.deltas = torch.zeros(key.batch, 1, dtype=torch.long, device=key.device)
        # always a tensor (zeros without padding): one graph for padded and unpadded batches
        self.pad = torch.zeros(key.batch, dtype=torch.long, device=key.device)
        self.graph: DecodeGraph | None = None
        self.calls = 0

    def start(self, prompt) -> None:
        """Load `prompt`'s values into the buffers (after its prefill into `cache`); the first call captures."""
        if prompt.deltas.shape[0] != self.key.batch:
            raise ValueError(f"PooledDecode: a prompt of {prompt.deltas.shape[0]} rows for a graph of {self.key.batch}")
        self.calls += 1
        self.deltas.copy_(prompt.deltas)
        self.pad.zero_() if prompt.pad is None else self.pad.copy_(prompt.pad)
        if self.graph is None:
            # what the decode step reads of a prompt: the buffers above (embeddings and positions are prefill's)
            step_prompt = replace(prompt, embeds=prompt.embeds[:, :0], positions=prompt.positions[:, :, :0],
                                  pad=self.pad, deltas=self.deltas)
            self.graph = DecodeGraph(self.model, step_prompt, self.cache)


class GraphPool:
    """Entries (captured graphs with the buffers they read) by key, at most `max_entries`: the least recently
    used goes first, and its graph's memory with it. One call at a time per model: an entry's buffers are
    reused by the next call of its key."""

    def __init__(self, max_entries: int = 4):
        self.max_entries = max_entries
        self._entries: OrderedDict = OrderedDict()

    def _use(self, key, make):
        """The entry for `key`, `make()` if there is none, now the most recently used."""
        entry = self._entries.pop(key) if key in self._entries else make()
        self._entries[key] = entry  # most recently used last
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return entry

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


class DecodeGraphPool(GraphPool):
    """Decode graphs captured once per (batch, cache-length bucket, backend plan) and kept across `generate`
    calls, so only the first call of a shape pays the capture. Cache lengths round up to a bucket (at least
    MIN_BUCKET slots, then steps of a quarter of a power of two: at most 25 % more slots than asked, since
    the captured attention spans the whole cache); the least recently used entry goes when more than
    `max_entries` are held. The model empties the pool on `set_backends` and when it moves (`.to`), and
    `clear()` frees the entries' caches. One generate at a time per model: an entry's cache and buffers are
    reused by the next call.
    """

    MIN_BUCKET = 256

    @classmethod
    def bucket(cls, length: int) -> int:
        """Cache slots for `length` tokens: MIN_BUCKET, or the next multiple of a quarter of the power of two
        at or below `length` (256, 320, 384, 448, 512, 640, ...)."""
        if length <= cls.MIN_BUCKET:
            return cls.MIN_BUCKET
        step = (1 << (length.bit_length() - 1)) // 4
        return -(-length // step) * step

    def key(self, model, batch: int, length: int) -> GraphKey:
        limit = model.cfg.text.max_position_embeddings
        return GraphKey(batch, min(self.bucket(length), max(length, limit)), str(model.plan), model.dtype,
                        model.device)

    def acquire(self, model, batch: int, length: int) -> PooledDecode:
        """The entry for `batch` rows and at least `length` cache slots, made (not yet captured) if new."""
        require_cuda(model.device)
        key = self.key(model, batch, length)
        return self._use(key, lambda: PooledDecode(model, key))

    def captured(self, model, batch: int, length: int) -> DecodeGraph | None:
        """The graph captured for `batch` rows and `length` cache slots under the model's plan, if any."""
        entry = self._entries.get(self.key(model, batch, length))
        return entry.graph if entry else None

    def entry_for(self, cache) -> PooledDecode | None:
        """The entry whose cache `cache` is, if any."""
        return next((e for e in self._entries.values() if e.cache is cache), None)

    def stats(self) -> list[dict]:
        """Per entry: its key, whether captured, the capture's seconds and how many generate calls used it."""
        return [{"batch": k.batch, "cache_len": k.cache_len, "plan": k.plan, "captured": e.graph is not None,
                 "capture_seconds": e.graph.capture_seconds if e.graph else None, "calls": e.calls}
                for k, e in self._entries.items()]


# --- the vision tower ------------------------------------------------------------------------------------------


class VisionGraph:
    """The vision tower's device work for one list of grids (`VisionTower.encode`), captured once and replayed
    for any pixels of those grids: `graph(pixels)` -> features (sum t*h*w / merge^2, out_hidden_size).

    Building it prepares the grids' layout on the host (kept here: the graph reads it in place), runs a warm-up
    (Triton compiles and autotunes there, the registry takes its decisions) and captures the tower on a static
    pixel buffer. Each call copies the pixels into that buffer, replays, and returns a copy of the output
    buffer. Inference only: no gradients. The graph keeps the operators of the model's plan at capture.
    """

    WARMUP_CALLS = 1

    def __init__(self, model, grid_thw: torch.Tensor, pixel_dtype: torch.dtype):
        device, tower = model.device, model.visual
        require_cuda(device, "VisionGraph")
        self.layout = tower.layout(grid_thw, device)  # the host-side preparation, outside the graph
        rows = int(grid_thw.prod(-1).sum())
        self.pixels = torch.zeros(rows, model.cfg.vision.patch_dim, dtype=pixel_dtype, device=device)
        self.calls = 0
        started = time.perf_counter()
        with torch.no_grad():
            self.graph, self.features = capture(lambda: tower.encode(model.ops, self.pixels, self.layout),
                                                self.WARMUP_CALLS, device)
        self.capture_seconds = time.perf_counter() - started

    @torch.no_grad()
    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.shape != self.pixels.shape:  # copy_ would broadcast a single row over the buffer
            raise ValueError(f"VisionGraph: pixels must be {tuple(self.pixels.shape)} for its grids, got "
                             f"{tuple(pixels.shape)}")
        self.pixels.copy_(pixels)
        self.graph.replay()
        self.calls += 1
        return self.features.clone()  # the next replay overwrites the buffer


@dataclass(frozen=True)
class VisionGraphKey:
    """What a captured vision tower is specific to: the (t, h, w) grids of its images or videos in order, the
    pixels' dtype, the operators chosen, the model's dtype and device."""

    grids: tuple[tuple[int, int, int], ...]
    pixel_dtype: torch.dtype
    plan: str
    dtype: torch.dtype
    device: torch.device


class VisionGraphPool(GraphPool):
    """Vision towers captured once per (grids, pixel dtype, backend plan, model dtype, device) and kept across
    calls, so only the first call of a list of grids pays the preparation and the capture. Grids are matched
    exactly (an image's launches depend on its size: the rows of every matmul, the attention windows), so the
    pool pays off when sizes repeat. The model empties it with the decode graphs (`set_backends` with another
    plan, `.to`); at most `max_entries` are kept, the least recently used going first with its graph's memory.
    """

    def key(self, model, grid_thw: torch.Tensor, pixel_dtype: torch.dtype) -> VisionGraphKey:
        grids = tuple(tuple(g) for g in grid_thw.tolist())
        return VisionGraphKey(grids, pixel_dtype, str(model.plan), model.dtype, model.device)

    def features(self, model, pixels: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """The tower's features of `pixels` (on the model's device, as many rows as the grids' patches) replayed
        from the entry of these grids, captured first if there is none."""
        require_cuda(model.device, "vision_features: cuda_graph=True")
        key = self.key(model, grid_thw, pixels.dtype)
        return self._use(key, lambda: VisionGraph(model, grid_thw, pixels.dtype))(pixels)

    def captured(self, model, grid_thw: torch.Tensor, pixel_dtype: torch.dtype) -> VisionGraph | None:
        """The graph captured for these grids and pixel dtype under the model's plan, if any."""
        return self._entries.get(self.key(model, grid_thw, pixel_dtype))

    def stats(self) -> list[dict]:
        """Per entry: its grids, pixel dtype and plan, the capture's seconds and how many calls used it."""
        return [{"grids": [list(g) for g in k.grids], "pixel_dtype": dtype_name(k.pixel_dtype),
                 "plan": k.plan, "captured": True, "capture_seconds": e.capture_seconds, "calls": e.calls}
                for k, e in self._entries.items()]


# --- the prefill -----------------------------------------------------------------------------------------------


def padding_read_on_device(model) -> bool:
    """Whether the plan's attention reads a batch's left padding from device memory, as a captured padded prefill
    needs (its replays take other paddings): the backends that take lengths held on the device
    (`OpImpl.device_lengths`: eager, triton) do; xformers' builds its mask from the padding on the host. An
    `auto` choice may pick either: counted as not."""
    name = model.plan["attention"]
    impl = None if name == AUTO else get_backend(name).impls.get("attention")
    return bool(getattr(impl, "device_lengths", False))


class PrefillGraph:
    """The prefill's device work (`Qwen25VL.prefill_logits`) for one prompt shape, captured on a pooled decode
    cache and replayed for any prompt of that shape: `graph(prompt)` -> the last position's logits (B, vocab).

    The graph reads every per-prompt value from static buffers each call copies into: the embeddings (the vision
    features already placed), the 3-D positions and, for padded batches, the left padding (unpadded prompts
    have their own graph, with the plain prefill's mask). Building it runs a warm-up (Triton compiles and
    autotunes there, the registry takes its decisions) and captures; both write only the cache the replay then
    fills. The cache must stay the pool's while the graph is kept: the graph writes it in place. Inference only:
    no gradients. The graph keeps the operators of the model's plan at capture.
    """

    WARMUP_CALLS = 1

    def __init__(self, model, key: PrefillGraphKey, cache):
        device = model.device
        require_cuda(device, "PrefillGraph")
        self.cache = cache
        self.embeds = torch.zeros(key.batch, key.length, model.cfg.text.hidden_size, dtype=key.dtype, device=device)
        self.positions = torch.zeros(3, key.batch, key.length, dtype=torch.long, device=device)
        self.pad = torch.zeros(key.batch, dtype=torch.long, device=device) if key.padded else None
        self.calls = 0
        started = time.perf_counter()
        with torch.no_grad():
            self.graph, self.logits = capture(
                lambda: model.prefill_logits(self.embeds, self.positions, self.pad, key.uniform, cache),
                self.WARMUP_CALLS, device)
        self.capture_seconds = time.perf_counter() - started

    @torch.no_grad()
    def __call__(self, prompt) -> torch.Tensor:
        if prompt.embeds.shape != self.embeds.shape:  # copy_ would broadcast one row over the batch
            raise ValueError(f"PrefillGraph: embeddings must be {tuple(self.embeds.shape)}, got "
                             f"{tuple(prompt.embeds.shape)}")
        self.embeds.copy_(prompt.embeds)
        self.positions.copy_(prompt.positions)
        if self.pad is not None:
            self.pad.copy_(prompt.pad)
        self.graph.replay()
        self.calls += 1
        return self.logits.clone()  # the next replay of this shape overwrites the buffer


@dataclass(frozen=True)
class PrefillGraphKey:
    """What a captured prefill is specific to: rows, prompt length, whether the three position streams are equal
    (text only: the rotary kernels differ), whether the batch is left-padded (the mask differs), the cache it
    writes (the decode pool's bucket), the operators chosen, dtype and device."""

    batch: int
    length: int
    uniform: bool
    padded: bool
    cache_len: int
    plan: str
    dtype: torch.dtype
    device: torch.device


class PrefillGraphPool(GraphPool):
    """Prefills captured once per (batch, prompt length, text only or not, padded or not, cache bucket, backend
    plan, dtype, device) and kept across calls, so only the first prompt of a shape pays the capture. Each is
    captured on the static cache of the decode pool's entry (`DecodeGraphPool`), which the decode step then
    continues: no cache of its own. Lengths are matched exactly. An entry whose cache the decode pool let go
    (evicted, cleared) is dropped at the next graphed prefill, and every entry by `model.clear_graphs()`
    (`set_backends` with another plan, `.to`); at most `max_entries` are kept, the least recently used going
    first with its graph's memory.
    """

    def key(self, model, prompt, cache) -> PrefillGraphKey:
        batch, length = prompt.embeds.shape[:2]
        return PrefillGraphKey(batch, length, prompt.uniform, prompt.pad is not None, cache.max_len,
                               str(model.plan), model.dtype, model.device)

    def graph(self, model, prompt, cache) -> PrefillGraph:
        """The entry for `prompt`'s shape on `cache` (from `model.decode_cache(..., cuda_graph=True)`), captured
        first if there is none."""
        require_cuda(model.device, "prefill: cuda_graph=True")
        if model.graphs.entry_for(cache) is None:
            raise ValueError("prefill: cuda_graph=True needs the pooled cache of decode_cache(..., cuda_graph=True)")
        for stale in [k for k, e in self._entries.items() if model.graphs.entry_for(e.cache) is None]:
            del self._entries[stale]  # its graph writes a cache no decode graph continues, and keeps it alive
        key = self.key(model, prompt, cache)
        return self._use(key, lambda: PrefillGraph(model, key, cache))

    def logits(self, model, prompt, cache) -> torch.Tensor:
        """`prompt`'s prefill into `cache` replayed from its shape's graph: the last position's logits. A padded
        prompt whose plan reads the padding on the host (`padding_read_on_device`) runs launched op by op
        instead, into the same cache: a graph would replay the padding it was captured with."""
        if prompt.pad is not None and not padding_read_on_device(model):
            return model.prefill_logits(prompt.embeds, prompt.positions, prompt.pad, prompt.uniform, cache)
        return self.graph(model, prompt, cache)(prompt)

    def captured(self, model, prompt, cache) -> PrefillGraph | None:
        """The graph captured for `prompt`'s shape on `cache` under the model's plan, if any."""
        return self._entries.get(self.key(model, prompt, cache))

    def stats(self) -> list[dict]:
        """Per entry: its key, the capture's seconds and how many calls used it."""
        return [{"batch": k.batch, "length": k.length, "uniform": k.uniform, "padded": k.padded,
                 "cache_len": k.cache_len, "plan": k.plan, "captured": True, "capture_seconds": e.capture_seconds,
                 "calls": e.calls} for k, e in self._entries.items()]
