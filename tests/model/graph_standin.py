"""A CPU stand-in for CUDA graph capture and replay (`qvl.model.graphs.capture`).

`CallAgain` replays a captured function by calling it again with the very objects it was captured with, writing
into the output captured first (as a graph overwrites it). A pooled graph reused by another input therefore gives
that input's result only if its values reach the captured work through the buffers the graph was captured on,
which is what the pools' CPU tests check; the real capture runs in the GPU-only tests.
"""

from __future__ import annotations

import contextlib

import pytest

from qvl.model import graphs


class CallAgain:
    """Replays a captured function by running it again into the output captured first."""

    def __init__(self, fn, out):
        self.fn, self.out = fn, out

    def replay(self):
        self.out.copy_(self.fn())


@contextlib.contextmanager
def replayed_on_cpu():
    """Within it, `qvl.model.graphs` captures on the CPU with `CallAgain`; yields the list of captured functions."""
    made = []

    def capture(fn, warmup=1, device=None):
        for _ in range(warmup):
            fn()
        made.append(fn)
        out = fn()
        return CallAgain(fn, out), out

    saved = graphs.capture, graphs.require_cuda
    graphs.capture, graphs.require_cuda = capture, lambda device, who="": None
    try:
        yield made
    finally:
        graphs.capture, graphs.require_cuda = saved


@pytest.fixture
def captures():
    """Capture on the CPU for one test; the list records each capture."""
    with replayed_on_cpu() as made:
        yield made
