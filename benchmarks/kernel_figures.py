"""One table of every operator on every backend, next to the usual peers (issue 3's first performance figures).

    python benchmarks/kernel_figures.py [--out DIR]      # on the GPU: shapes from ../shared/GPU.md
    python benchmarks/kernel_figures.py --smoke          # anywhere: tiny shapes, checks the script runs

Each row: figure, implementation, shape, median time, achieved TB/s (bytes: every input read once, every output
written once) or TFLOP/s, and the fraction of the copy bandwidth / matmul rate measured in the same run.
Implementations are named as in the bench_*.py suites:
- `qvl[<spec>]`: the operator through the registry, `Ops(resolve_plan(spec))`, one row per backend usable here
  that implements it (`harness.backend_ops`), so a newly registered backend gets its rows without an edit here.
  A call the backend declares unsupported is a row `skipped` with the backend's reason, as in the suites.
- peers, called directly where installed: F.rms_norm, torch.compile of the eager operator, SDPA, xformers,
  Liger-Kernel.
- `qvl kernel <name>`: the kernels no operator exposes alone, SiLU(gate)*up and the GEMM (`kernels_alone`), and
  the GEMM's few-row path, the GEMV, at each projection of a 3b decode step (`decode_projections`).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# qvl switches on the Triton interpreter on a machine without a GPU when imported: nothing before it imports triton.
import torch
import torch.nn.functional as F

from benchmarks import harness
from qvl.backends import BackendUnsupportedError, BlockDiagonalMask, CausalMask, Ops, Rotary, get_backend
from qvl.files import write_json

# decode_sweep.py imports these four (CUDA, DEV, bench, graphed) to time its rows the same way.
CUDA = harness.CUDA
DEV = harness.DEVICE
DT = torch.bfloat16
EPS = 1e-6


def bench(fn: Callable[[], object], reps: int) -> float:
    """Median seconds of `fn()`; CUDA events on the GPU."""
    fn()
    if CUDA:
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def graphed(fn: Callable[[], object]) -> Callable[[], object]:
    """fn captured in a CUDA graph: replaying it shows the GPU time without the per-launch CPU cost, which
    for microsecond kernels (decode, one cache write) can exceed the kernel itself."""
    from qvl.model.graphs import capture

    graph, _ = capture(fn)
    return graph.replay


def size(*tensors: torch.Tensor) -> int:
    """Bytes of the tensors, each counted once."""
    return sum(t.numel() * t.element_size() for t in tensors)


def eager_impl(operator: str):
    """The eager backend's implementation of `operator`, from the registry: what the torch.compile peer compiles."""
    return get_backend("eager").impls[operator]


def inverse_frequencies(head_dim: int) -> torch.Tensor:
    return 1.0 / (1e6 ** (torch.arange(0, head_dim, 2, device=DEV, dtype=torch.float32) / head_dim))


@dataclass
class Table:
    """The rows measured so far, each printed as soon as it is known. A failing implementation becomes a row
    with its `error` and an unsupported backend call a row `skipped` with the reason: neither hides the rest."""

    reps: int
    rows: list[dict] = field(default_factory=list)

    def run(self, op: str, impl: str, shape: str, fn: Callable[[], object], *, nbytes: float | None = None,
            flops: float | None = None, graph: bool = False, spec: str | None = None) -> None:
        """Time `fn` (replayed from a CUDA graph with `graph`) as one row."""
        row = {"op": op, "impl": impl, "shape": shape} | ({"spec": spec} if spec else {})
        try:
            seconds = bench(graphed(fn) if graph else fn, self.reps)
        except BackendUnsupportedError as e:
            row["skipped"] = "unsupported: " + " ".join(str(e).split())
        except Exception as e:  # a failing peer or backend must not hide the rest
            row["error"] = f"{type(e).__name__}: {e}"[:200]
        else:
            row |= {"ms": seconds * 1e3, "note": ""}
            if nbytes is not None:
                row["TB/s"] = nbytes / seconds / 1e12
            if flops is not None:
                row["TFLOP/s"] = flops / seconds / 1e12
        self.rows.append(row)
        print(json.dumps(row), flush=True)

    def each_backend(self, operator: str, op: str, shape: str, call: Callable[[Ops], object], *,
                     graph: bool = False, **figures) -> None:
        """One row `qvl[<spec>]` per usable backend that implements `operator` (the registry's name; `op` is the
        rows' figure, e.g. "norm+residual"): `call(ops)` through the registry."""
        for spec, ops in harness.backend_ops(operator).items():
            impl = f"qvl[{spec}]" + (", CUDA graph" if graph else "")
            self.run(op, impl, shape, functools.partial(call, ops), graph=graph, spec=spec, **figures)


def limits(table: Table, small: bool) -> None:
    """The device's copy bandwidth and matmul rate, measured in this run: the rows' "of limit" column."""
    n = (64, 256) if small else (1 << 14, 2048)
    src = torch.randn(n, device=DEV, dtype=DT)
    dst = torch.empty_like(src)
    table.run("limits", "copy", f"{n[0]}x{n[1]}", lambda: dst.copy_(src), nbytes=2 * size(src))
    m = 128 if small else 8192
    a = torch.randn(m, m, device=DEV, dtype=DT)
    table.run("limits", "matmul", f"{m}^3", lambda: a @ a, flops=2 * m**3)


def norm_figures(table: Table, small: bool) -> None:
    """RMSNorm, and RMSNorm fused with the residual add, at the 3b decoder's width."""
    rows, hidden = (64, 200) if small else (16384, 2048)
    x = torch.randn(rows, hidden, device=DEV, dtype=DT)
    w = torch.randn(hidden, device=DEV, dtype=DT)
    r = torch.randn_like(x)
    nb = 2 * size(x) + size(w)
    shape = f"{rows}x{hidden}"
    table.each_backend("norm", "norm", shape, lambda ops: ops.norm(x, w, EPS), nbytes=nb)
    table.run("norm", "F.rms_norm", shape, lambda: F.rms_norm(x, (hidden,), w, EPS), nbytes=nb)
    eager = eager_impl("norm")
    if (c := harness.compiled(lambda: eager(x, w, EPS))) is not None:
        table.run("norm", "torch.compile(eager)", shape, c, nbytes=nb)
    if CUDA and (xf := harness.optional("xformers.ops.rmsnorm")) is not None:
        table.run("norm", "xformers", shape, lambda: xf.rms_norm(x, w, EPS), nbytes=nb)
    if CUDA and (liger := harness.optional("liger_kernel.ops.rms_norm")) is not None:
        table.run("norm", "liger", shape, lambda: liger.LigerRMSNormFunction.apply(x, w, EPS), nbytes=nb)
    table.each_backend("norm", "norm+residual", shape, lambda ops: ops.norm(x, w, EPS, r), nbytes=2 * nb)


def mlp_figures(table: Table, small: bool) -> None:
    """The SwiGLU MLP (fused [gate; up] projection, SiLU(gate)*up, down projection) of the 3b decoder at prefill and
    at decode, and of the vision blocks. The backends differ in the projections: torch matmul (cuBLAS) around
    the activation kernel (triton) or qvl's GEMM with the activation in its epilogue (triton-gemm)."""
    # (tokens, hidden, intermediate)
    shapes = [(40, 64, 96), (1, 64, 96), (32, 80, 60)] if small else [(4096, 2048, 11008), (1, 2048, 11008),
                                                                     (16384, 1280, 3420)]
    for tokens, hidden, inner in shapes:
        x = torch.randn(tokens, hidden, device=DEV, dtype=DT)
        w_in = torch.randn(2 * inner, hidden, device=DEV, dtype=DT) * hidden**-0.5
        w_out = torch.randn(hidden, inner, device=DEV, dtype=DT) * inner**-0.5
        # a few tokens are bound by reading the weights: bytes there, FLOPs for prefill
        figures = {"nbytes": size(w_in, w_out)} if tokens <= 64 else {"flops": 2 * tokens * hidden * inner * 3}
        table.each_backend("mlp", "mlp", f"{tokens} tokens, {hidden}->2x{inner}->{hidden}",
                           functools.partial(swiglu_mlp, x=x, w_in=w_in, w_out=w_out), **figures)


def swiglu_mlp(ops: Ops, x: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor) -> torch.Tensor:
    return ops.mlp(x, w_in, None, w_out, None, "swiglu")


def kernels_alone(table: Table, small: bool) -> None:
    """SiLU(gate)*up and the GEMM, each alone: kernel rows, not backend rows.

    No operator exposes them: the registry's `mlp` is the whole MLP (projections and activation), measured per
    backend by mlp_figures. These rows time the two qvl kernels the triton and triton-gemm MLPs are built from
    against their direct peers (the activation against torch.compile and Liger, the GEMM against cuBLAS), so
    they call the kernels themselves, under the name `qvl kernel <name>`.
    """
    from qvl.kernels.activation import swiglu
    from qvl.kernels.gemm import linear

    rows, inner = (32, 300) if small else (16384, 11008)
    h = torch.randn(rows, 2 * inner, device=DEV, dtype=DT)
    nb = 3 * rows * inner * h.element_size()
    shape = f"{rows}x{inner}"

    def silu_mul():
        gate, up = h.chunk(2, -1)
        return F.silu(gate) * up

    table.run("swiglu", "qvl kernel swiglu", shape, lambda: swiglu(h), nbytes=nb)
    table.run("swiglu", "torch", shape, silu_mul, nbytes=nb)
    if (c := harness.compiled(silu_mul)) is not None:
        table.run("swiglu", "torch.compile", shape, c, nbytes=nb)
    if CUDA and (liger := harness.optional("liger_kernel.ops.swiglu")) is not None:
        # Liger takes gate and up as two tensors (its models project them apart): given halves of one fused
        # output it would copy each to contiguous memory first, so the copies are made here, outside the timing.
        gate, up = (half.contiguous() for half in h.chunk(2, -1))
        table.run("swiglu", "liger (separate gate, up)", shape,
                  lambda: liger.LigerSiLUMulFunction.apply(gate, up), nbytes=nb)

    m = 64 if small else 8192
    a, b = torch.randn(m, m, device=DEV, dtype=DT), torch.randn(m, m, device=DEV, dtype=DT)
    table.run("gemm", "qvl kernel linear", f"{m}^3", lambda: linear(a, b), flops=2 * m**3)
    table.run("gemm", "torch matmul", f"{m}^3", lambda: F.linear(a, b), flops=2 * m**3)
    decode_projections(table, small)


# The 3b decoder's projections at decode: (name, K, N, activation, bias). gate_up's N is both halves.
DECODE_PROJECTIONS = [("qkv", 2048, 2560, "none", True), ("o", 2048, 2048, "none", False),
                      ("gate_up + SiLU*up", 2048, 2 * 11008, "swiglu", False), ("down", 11008, 2048, "none", False),
                      ("lm_head", 2048, 151936, "none", False)]
# Bytes of weights one decode-projection row streams: over twice an H200's 50 MB L2.
DECODE_STREAM_BYTES = 128 << 20


def decode_projections(table: Table, small: bool) -> None:
    """Each projection of a decode step at batch 1: qvl's linear (the GEMV, qvl/kernels/gemv.py) against
    torch matmul (cuBLAS; for gate_up followed by the SiLU*up kernel, as the triton MLP runs it). Bound by
    reading the weights: TB/s of weight bytes.

    On a GPU one row is a CUDA graph of the projection on `copies` weight matrices in turn, like consecutive
    layers: a single microsecond kernel would be timed with its launch (the graph's own launch, spread over
    the copies here), and the copies, over twice the L2 together, are read from memory as a model's are."""
    from qvl.kernels.gemm import linear

    # smoke: one projection with a bias and the fused activation's, tiny (interpreted kernels are slow)
    projections = [p for p in DECODE_PROJECTIONS if p[0] in ("qkv", "gate_up + SiLU*up")] if small else \
        DECODE_PROJECTIONS
    for name, k_dim, n, activation, bias in projections:
        if small:
            k_dim, n = 40, 2 * 24 if activation == "swiglu" else 24
        copies = 1 if small else min(16, -(-DECODE_STREAM_BYTES // (n * k_dim * DT.itemsize)))
        weights = [torch.randn(n, k_dim, device=DEV, dtype=DT) * k_dim**-0.5 for _ in range(copies)]
        b = torch.randn(n, device=DEV, dtype=DT) if bias else None
        x = torch.randn(1, k_dim, device=DEV, dtype=DT)

        shape = f"{name}: 1x{k_dim} -> {n}" + (f", {copies} matrices in turn" if copies > 1 else "")
        for impl, project in (("qvl kernel linear", linear), ("torch matmul", cublas_linear)):
            fn = functools.partial(each_weight, project, x, weights, b, activation)
            table.run("decode projection", impl, shape, fn, nbytes=size(*weights), graph=CUDA)


def each_weight(project, x, weights, b, activation):
    return [project(x, w, b, activation) for w in weights]


def cublas_linear(x, w, b, activation):
    """torch matmul, then (SwiGLU) qvl's SiLU*up kernel: the triton MLP's input projection."""
    from qvl.kernels.activation import swiglu

    h = F.linear(x, w, b)
    return swiglu(h) if activation == "swiglu" else h


def rope_figures(table: Table, small: bool) -> None:
    """M-RoPE on q and k: three position streams (t, h, w), the 3b decoder's heads."""
    seq, hq, hk, d = (16, 4, 2, 16) if small else (4096, 16, 2, 128)
    sections = (2, 3, 3) if small else (16, 24, 24)
    rot = Rotary(inverse_frequencies(d), sections)
    q = torch.randn(1, seq, hq, d, device=DEV, dtype=DT)
    k = torch.randn(1, seq, hk, d, device=DEV, dtype=DT)
    pos = torch.randint(0, seq, (3, 1, seq), device=DEV)
    nb = 2 * size(q, k)
    shape = f"S={seq} {hq}/{hk} heads d={d}"
    table.each_backend("rope", "rope", shape, lambda ops: ops.rope(q, k, pos, rot), nbytes=nb)
    eager = eager_impl("rope")
    if (c := harness.compiled(lambda: eager(q, k, pos, rot))) is not None:
        table.run("rope", "torch.compile(eager)", shape, c, nbytes=nb)
    if CUDA and (liger := harness.optional("liger_kernel.ops.qwen2vl_mrope")) is not None:
        from qvl.backends.eager import rope_angles

        # Liger takes cos/sin precomputed per stream and q, k head-major: prepared here, outside the timing.
        cos, sin = rope_angles(pos, rot)
        c3, s3 = (torch.cat([t, t], -1).to(DT).expand(3, -1, -1, -1).contiguous() for t in (cos, sin))
        qt, kt = q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous()
        table.run("rope", "liger (cos/sin given)", shape,
                  lambda: liger.LigerQwen2VLMRopeFunction.apply(qt, kt, c3, s3, list(sections)), nbytes=nb)


def prefill_attention_figures(table: Table, small: bool) -> None:
    """Causal GQA prefill (the 3b decoder's heads) against SDPA, FlashAttention-2 and xformers."""
    seq, hq, hk, d = (48, 4, 2, 16) if small else (8192, 16, 2, 128)
    q = torch.randn(1, seq, hq, d, device=DEV, dtype=DT)
    k = torch.randn(1, seq, hk, d, device=DEV, dtype=DT)
    v = torch.randn_like(k)
    flops = 4 * seq * seq * hq * d / 2
    shape = f"B=1 S={seq} {hq}/{hk} heads d={d}"
    causal = CausalMask()
    table.each_backend("attention", "attention causal", shape, lambda ops: ops.attention(q, k, v, causal, d**-0.5),
                       flops=flops)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))

    def sdpa():
        return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)

    table.run("attention causal", "SDPA", shape, sdpa, flops=flops)
    if CUDA:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def sdpa_flash():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return sdpa()

        table.run("attention causal", "SDPA FlashAttention-2", shape, sdpa_flash, flops=flops)
    if CUDA and (xf := harness.optional("xformers.ops")) is not None:
        # xformers' own GQA layout: (B, L, kv heads, query heads per kv head, D), k and v broadcast
        q5 = q.view(1, seq, hk, hq // hk, d)
        k5, v5 = (t.view(1, seq, hk, 1, d).expand(1, seq, hk, hq // hk, d) for t in (k, v))
        lower = xf.fmha.attn_bias.LowerTriangularMask()
        table.run("attention causal", "xformers", shape,
                  lambda: xf.memory_efficient_attention(q5, k5, v5, attn_bias=lower), flops=flops)


def vision_attention_figures(table: Table, small: bool) -> None:
    """The vision tower's windows: block-diagonal attention over all windows in one call, head dim 80."""
    windows, length, heads, d = (4, 16, 2, 80) if small else (256, 64, 16, 80)
    q = torch.randn(1, windows * length, heads, d, device=DEV, dtype=DT)
    k, v = torch.randn_like(q), torch.randn_like(q)
    mask = BlockDiagonalMask.from_seqlens([length] * windows, device=DEV)
    table.each_backend("attention", "attention varlen", f"{windows} windows x {length} tokens, {heads} heads d={d}",
                       lambda ops: ops.attention(q, k, v, mask, d**-0.5), flops=4 * windows * length**2 * heads * d)


def decode_figures(table: Table, small: bool) -> None:
    """One decode step's attention against a long cache, and its rope + cache write; on a GPU also replayed
    from CUDA graphs, which takes the launch cost out."""
    cache_len, hq, hk, d = (200, 4, 2, 16) if small else (32768, 16, 2, 128)
    q = torch.randn(1, 1, hq, d, device=DEV, dtype=DT)
    k_cache = torch.randn(1, cache_len, hk, d, device=DEV, dtype=DT)
    v_cache = torch.randn_like(k_cache)
    causal = CausalMask()
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k_cache, v_cache))

    def attention(ops):
        return ops.attention(q, k_cache, v_cache, causal, d**-0.5)

    def sdpa():
        return F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True)

    nb = 2 * size(k_cache)
    shape = f"1 query, {cache_len} cached, {hq}/{hk} heads"
    table.each_backend("attention", "attention decode", shape, attention, nbytes=nb)
    table.run("attention decode", "SDPA", shape, sdpa, nbytes=nb)
    if CUDA:
        table.each_backend("attention", "attention decode", shape, attention, nbytes=nb, graph=True)
        table.run("attention decode", "SDPA, CUDA graph", shape, sdpa, nbytes=nb, graph=True)

    k, v = torch.randn(1, 1, hk, d, device=DEV, dtype=DT), torch.randn(1, 1, hk, d, device=DEV, dtype=DT)
    rot = Rotary(inverse_frequencies(d), (2, 3, 3) if small else (16, 24, 24), uniform_streams=True)
    pos = torch.full((3, 1, 1), cache_len - 1, device=DEV)

    def rope_and_cache(ops):
        return ops.cache(q, k, v, pos, rot, k_cache, v_cache, cache_len - 1)

    table.each_backend("cache", "cache (rope+write)", "1 token", rope_and_cache)
    if CUDA:
        table.each_backend("cache", "cache (rope+write)", "1 token", rope_and_cache, graph=True)


FIGURES = (limits, norm_figures, mlp_figures, kernels_alone, rope_figures, prefill_attention_figures,
           vision_attention_figures, decode_figures)


def write(rows: list[dict], out: str, small: bool) -> str:
    """kernel_figures.json ({"meta", "rows"}) and kernel_figures.md (the table, with each row's share of the
    copy bandwidth or matmul rate measured in this run); returns the table."""
    import triton

    copy = next((r["TB/s"] for r in rows if r["impl"] == "copy" and "TB/s" in r), None)
    matmul = next((r["TFLOP/s"] for r in rows if r["impl"] == "matmul" and "TFLOP/s" in r), None)
    device = harness.device_name()
    meta = {"device": device, "torch": torch.__version__, "triton": triton.__version__,
            "date": time.strftime("%Y-%m-%d"), "smoke": small}
    lines = [f"Device: {device}; torch {torch.__version__}; triton {triton.__version__}; {meta['date']}", "",
             "| op | impl | shape | ms | TB/s | TFLOP/s | of limit |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "error" in r or "skipped" in r:
            outcome = f"failed: {r['error']}" if "error" in r else f"skipped: {r['skipped']}"
            lines.append(f"| {r['op']} | {r['impl']} | {r['shape']} | {outcome} | | | |")
            continue
        share = ""
        if "TB/s" in r and copy:
            share = f"{r['TB/s'] / copy:.0%} of copy"
        elif "TFLOP/s" in r and matmul:
            share = f"{r['TFLOP/s'] / matmul:.0%} of matmul"
        lines.append(f"| {r['op']} | {r['impl']} | {r['shape']} | {r['ms']:.3f} | {r.get('TB/s', float('nan')):.2f} "
                     f"| {r.get('TFLOP/s', float('nan')):.1f} | {share} |")
    table = "\n".join(lines)
    write_json(os.path.join(out, "kernel_figures.json"), {"meta": meta, "rows": rows}, indent=1)
    with open(os.path.join(out, "kernel_figures.md"), "w") as f:
        f.write(table + "\n")
    return table


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, any device")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--reps", type=int, default=5, help="timed calls per row on the CPU (the GPU uses do_bench)")
    args = ap.parse_args(argv)
    small = args.smoke or not CUDA
    table = Table(args.reps)
    for figures in FIGURES:
        figures(table, small)
        # written after each set: a run stopped by the GPU session's time box keeps what it measured
        text = write(table.rows, args.out, small)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
