"""A decode step captured once in a CUDA graph and replayed for every new token.

At batch 1 a decode step is bound by the host: Python, the registry and each kernel launch cost more than
the kernels themselves run (benchmarks/host_overhead.py). Replaying a captured graph launches the whole step
at once. Capture needs every launch of the step to be the same at every length, so the step runs in its
device-length form (`Qwen25VL.decode_step(..., length=tensor)`): attention over the whole static cache with
the written length read on the device, the new K/V written at a slot read on the device. Backends that
cannot take lengths on the device (xformers' attention and cache) are routed by the model's fallback policy,
or refused when there is none, before anything is captured.
"""

from __future__ import annotations

import torch


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
        if device.type != "cuda":
            raise ValueError(f"DecodeGraph: CUDA graphs need the model on a CUDA device; it is on {device}")
        if cache.length >= cache.max_len:
            raise ValueError(f"DecodeGraph: the cache is full ({cache.length} of {cache.max_len} slots)")
        self.cache = cache
        self.tokens = torch.zeros(prompt.embeds.shape[0], dtype=torch.long, device=device)
        self.length = torch.full((), cache.length, dtype=torch.long, device=device)
        self.graph, self.logits = capture(lambda: model.decode_step(self.tokens, prompt, cache, length=self.length),
                                          self.WARMUP_STEPS, device)

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
