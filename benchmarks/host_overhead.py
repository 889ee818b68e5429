"""Host time of a decode step, measured without a GPU: what each operator call, decoder layer and decode step
costs the CPU before the device does any work.

    python benchmarks/host_overhead.py [--json PATH] [--backends eager,triton]

Why: at batch 1 the model is bound by launching work, not by running it (3b on an H200: ~18 ms a decode step
with all-triton kernels, against ~2 ms to read the weights; benchmarks/gpu/h200-2026-11-26). Host cost is
Python and launch machinery, so it can be measured and tracked on the CPU CI machine.

How: the triton backend runs compiled, not interpreted, on CPU tensors. Every kernel goes through Triton's
real launch path (argument binding, specialization, kernel-cache lookup, grid) up to the driver: a stand-in
sm_90 driver (sm90_compile.Sm90Driver) answers device queries, and a JIT cache hook files a no-op kernel for
each specialization at its first launch, so later launches find it in the cache as a compiled kernel would
be. The eager backend runs its torch ops on CPU tensors at the tiny preset's shapes in float32, on one
thread, where the arithmetic is small next to dispatch. What this leaves out: the CUDA driver's own launch
cost (a few microseconds per kernel) and the GPU caching allocator; both count the same for every backend.

Figures (microseconds, the fastest of several rounds): per operator call through `Ops` (registry and checks
included) at a decode step's shapes, one decoder layer of a decode step, a whole decode step of the tiny
model (2 layers), and one vision block (the vision tower and prefill are host-bound too at batch 1: on the
H200 the 3b tower took 16 ms for about 2 TFLOP of work).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

# Compiled Triton on CPU tensors: this must precede every triton import (qvl keeps an explicit 0).
os.environ["TRITON_INTERPRET"] = "0"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from triton import knobs  # noqa: E402
from triton.runtime import driver  # noqa: E402

from benchmarks.sm90_compile import Sm90Driver  # noqa: E402

BACKENDS = ("eager", "triton")


class _NoOpKernel:
    """Stands in for a compiled kernel in Triton's cache: launching it does nothing."""

    function = None
    packed_metadata = None

    def launch_metadata(self, *args):
        return None

    def run(self, *args):
        pass


def _file_no_op_kernel(*, key, repr, fn, compile, is_manual_warmup, already_compiled):
    """jit_cache_hook: on a specialization's first launch, cache a no-op kernel under its key (and skip this
    launch); every later launch takes the cached path a compiled kernel takes."""
    fn.jit_function.device_caches[0][0][key] = _NoOpKernel()
    return True


def install_stand_in_device() -> None:
    """Triton launches as if compiled, with no device; the triton backend (from the registry) accepts CPU tensors
    and counts as available (its own check says no CUDA device and no interpreter)."""
    driver.set_active(Sm90Driver())
    knobs.runtime.jit_cache_hook = _file_no_op_kernel
    from qvl.backends import get_backend

    backend = get_backend("triton")
    for impl in backend.impls.values():
        impl.devices = frozenset({"cpu"})  # shadows the class's CUDA-only device set on this instance
    backend._availability = None
    backend._unavailable = None


def best_us(fn, calls: int = 200, rounds: int = 15) -> float:
    """Microseconds per call: the fastest of `rounds` rounds. Noise on a shared machine only ever adds time
    to pure host work, so the minimum is the steadiest estimate of its cost (garbage collection off)."""
    for _ in range(20):
        fn()
    times = []
    gc.disable()
    try:
        for _ in range(rounds):
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            times.append((time.perf_counter() - start) / calls * 1e6)
    finally:
        gc.enable()
    return min(times)


def measure(backend: str) -> dict[str, float]:
    import qvl
    from qvl.backends import BlockDiagonalMask, CausalMask
    from qvl.demo import demo_prompt
    from qvl.model.positions import decode_positions

    model = qvl.from_config("tiny", dtype=torch.float32, device="cpu", seed=0).requires_grad_(False)  # inference
    model.set_backends(backend)  # strict: every call on this backend
    inputs = demo_prompt(model.cfg)
    prompt = model.prepare(**inputs)
    n = prompt.embeds.shape[1]
    cache = model.new_cache(1, n + 8)
    cache.length = n  # the prompt's K/V need not be real: only the launches are timed
    token = torch.zeros(1, dtype=torch.long)
    embeds = model.model.embed_tokens(token[:, None])
    positions = decode_positions(n, 1, prompt.deltas)
    rotary, mask = model.rotary(True), CausalMask(prompt.pad)
    layer, ops = model.model.layers[0], model.ops
    attn = layer.self_attn
    k_cache, v_cache = cache.layer(0)
    q = torch.randn(1, 1, attn.num_heads, attn.head_dim, dtype=model.dtype)
    k = torch.randn(1, 1, attn.num_kv_heads, attn.head_dim, dtype=model.dtype)
    norm = layer.input_layernorm
    mlp = layer.mlp

    def step():
        cache.length = n
        model.decode_step(token, prompt, cache)

    # A vision block on one window of patches: its launches are those of any image (one varlen attention over
    # all windows), and the fewest patches keep the CPU's own arithmetic out of the figure.
    tower = model.visual
    window = (tower.cfg.window_size // tower.cfg.patch_size) ** 2
    patches = torch.randn(window, tower.cfg.hidden_size, dtype=model.dtype)
    patch_positions = torch.zeros(2, 1, window, dtype=torch.long)
    window_mask = BlockDiagonalMask.from_seqlens([window], device="cpu")

    figures = {
        "norm": best_us(lambda: ops.norm(embeds, norm.weight, norm.eps)),
        "norm+residual": best_us(lambda: ops.norm(embeds, norm.weight, norm.eps, embeds)),
        "cache (rope+write)": best_us(lambda: ops.cache(q, k, k, positions, rotary, k_cache, v_cache, n)),
        "attention (decode)": best_us(lambda: ops.attention(q, k_cache[:, :n + 1], v_cache[:, :n + 1], mask)),
        "mlp": best_us(lambda: ops.mlp(embeds, mlp.gate_up_proj.weight, None, mlp.down_proj.weight, None, "swiglu")),
        "linear (qkv)": best_us(lambda: ops.linear(embeds, attn.qkv_proj.weight, attn.qkv_proj.bias)),
        "decoder layer (decode)": best_us(lambda: layer(ops, embeds, embeds, positions, rotary, mask,
                                                          (k_cache, v_cache), n)),
        "decode step (tiny, 2 layers)": best_us(step, calls=50),
        "vision block": best_us(lambda: tower.blocks[0](ops, patches, patches, patch_positions, tower.rotary,
                                                       window_mask)),
    }
    if model.fallbacks:
        raise RuntimeError(f"{backend}: calls fell back: {model.fallbacks}")
    return figures


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write {backend: {figure: microseconds}} here")
    ap.add_argument("--backends", default=",".join(BACKENDS))
    args = ap.parse_args(argv)
    install_stand_in_device()
    torch.set_num_threads(1)  # a GPU's host thread does no arithmetic; one thread keeps CPU figures steady
    results = {backend: measure(backend) for backend in args.backends.split(",")}
    names = list(next(iter(results.values())))
    print(f"{'host us per call':<30}" + "".join(f"{b:>10}" for b in results))
    for name in names:
        print(f"{name:<30}" + "".join(f"{results[b][name]:>10.1f}" for b in results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
