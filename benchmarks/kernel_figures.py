"""First performance figures of the triton backend against eager and the usual peers (issue 3).

    python benchmarks/kernel_figures.py [--out DIR]      # on the GPU: shapes from ../shared/GPU.md
    python benchmarks/kernel_figures.py --smoke          # anywhere: tiny shapes, checks the script runs

Each row: operator, implementation, median time, achieved TB/s (bytes: every input read once, every output
written once) or TFLOP/s, and the fraction of the copy bandwidth / matmul rate measured in the same run.
Peers appear where installed: F.rms_norm, torch.compile of the eager op, SDPA, xformers, Liger-Kernel.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from qvl.backends import BlockDiagonalMask, Rotary  # noqa: E402
from qvl.backends import eager  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"


def bench(fn, reps: int) -> float:
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


def peers(name: str):
    """Optional packages: (module or None, reason)."""
    try:
        if name == "liger":
            import liger_kernel
            return liger_kernel, ""
        if name == "xformers":
            import xformers.ops as mod
            return mod, ""
    except Exception as e:  # not installed or broken: the row says so
        return None, f"{type(e).__name__}: {e}"
    return None, "unknown"


def compiled(fn):
    try:
        return torch.compile(fn)
    except Exception:
        return None


def graphed(fn):
    """fn captured in a CUDA graph: replaying it shows the GPU time without the per-launch CPU cost, which
    for microsecond kernels (decode, one cache write) can exceed the kernel itself."""
    from qvl.model.graphs import capture

    graph, _ = capture(fn)
    return graph.replay


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, any device")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()

    from qvl.kernels.activation import swiglu
    from qvl.kernels.attention import causal_attention, varlen_attention
    from qvl.kernels.decode_attention import decode_attention
    from qvl.kernels.gemm import linear
    from qvl.kernels.rms_norm import rms_norm
    from qvl.kernels.rope import rope, rope_and_cache

    small = args.smoke or not CUDA
    dt = torch.bfloat16
    rows: list[dict] = []

    def record(op, impl, shape, seconds, nbytes=None, flops=None, note=""):
        row = {"op": op, "impl": impl, "shape": shape, "ms": seconds * 1e3, "note": note}
        if nbytes is not None:
            row["TB/s"] = nbytes / seconds / 1e12
        if flops is not None:
            row["TFLOP/s"] = flops / seconds / 1e12
        rows.append(row)
        print(json.dumps(row), flush=True)

    def run(op, impl, shape, fn, **kw):
        try:
            record(op, impl, shape, bench(fn, args.reps), **kw)
        except Exception as e:  # a failing peer must not hide the rest
            rows.append({"op": op, "impl": impl, "shape": shape, "error": f"{type(e).__name__}: {e}"[:200]})

    def run_graphed(op, impl, shape, fn, **kw):
        try:
            replay = graphed(fn)
        except Exception as e:
            rows.append({"op": op, "impl": impl, "shape": shape, "error": f"{type(e).__name__}: {e}"[:200]})
            return
        run(op, impl, shape, replay, **kw)

    # device limits measured in this run
    n = (1 << 14, 2048) if not small else (64, 256)
    src = torch.randn(n, device=DEV, dtype=dt)
    dst = torch.empty_like(src)
    run("limits", "copy", f"{n[0]}x{n[1]}", lambda: dst.copy_(src), nbytes=2 * src.numel() * 2)
    m = 8192 if not small else 128
    a = torch.randn(m, m, device=DEV, dtype=dt)
    run("limits", "matmul", f"{m}^3", lambda: a @ a, flops=2 * m**3)

    # RMSNorm
    rows_, hidden = (16384, 2048) if not small else (64, 200)
    x = torch.randn(rows_, hidden, device=DEV, dtype=dt)
    w = torch.randn(hidden, device=DEV, dtype=dt)
    nb = 2 * x.numel() * 2 + hidden * 2
    shape = f"{rows_}x{hidden}"
    ref = eager.EagerNorm()
    run("norm", "eager", shape, lambda: ref(x, w, 1e-6), nbytes=nb)
    run("norm", "F.rms_norm", shape, lambda: F.rms_norm(x, (hidden,), w, 1e-6), nbytes=nb)
    if CUDA and (c := compiled(lambda: ref(x, w, 1e-6))):
        run("norm", "torch.compile(eager)", shape, c, nbytes=nb)
    xf, why = peers("xformers")
    if xf is not None and CUDA:
        from xformers.ops import rmsnorm
        run("norm", "xformers", shape, lambda: rmsnorm.rms_norm(x, w, 1e-6), nbytes=nb)
    liger, why = peers("liger")
    if liger is not None and CUDA:
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
        run("norm", "liger", shape, lambda: LigerRMSNormFunction.apply(x, w, 1e-6), nbytes=nb)
    run("norm", "triton", shape, lambda: rms_norm(x, w, 1e-6), nbytes=nb)
    r = torch.randn_like(x)
    run("norm+residual", "eager", shape, lambda: ref(x, w, 1e-6, r), nbytes=2 * nb)
    run("norm+residual", "triton", shape, lambda: rms_norm(x, w, 1e-6, r), nbytes=2 * nb)

    # SiLU(gate) * up on the fused projection output
    rows_, inner = (16384, 11008) if not small else (32, 300)
    h = torch.randn(rows_, 2 * inner, device=DEV, dtype=dt)
    nb = 3 * rows_ * inner * 2
    shape = f"{rows_}x{inner}"

    def silu_mul():
        g, u = h.chunk(2, -1)
        return F.silu(g) * u

    run("swiglu", "eager", shape, silu_mul, nbytes=nb)
    if CUDA and (c := compiled(silu_mul)):
        run("swiglu", "torch.compile(eager)", shape, c, nbytes=nb)
    if liger is not None and CUDA:
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction
        g, u = h.chunk(2, -1)
        g, u = g.contiguous(), u.contiguous()
        run("swiglu", "liger (separate gate, up)", shape, lambda: LigerSiLUMulFunction.apply(g, u), nbytes=nb)
    run("swiglu", "triton", shape, lambda: swiglu(h), nbytes=nb)

    # projections: torch matmul (cuBLAS) around the SiLU*up kernel, against qvl's GEMM with the activation in
    # its epilogue (issue 3 leaves the choice to this measurement). 3b text MLP and the vision MLP's down (K=3420)
    m = 8192 if not small else 64
    b_ = torch.randn(m, m, device=DEV, dtype=dt)
    run("gemm", "torch matmul", f"{m}^3", lambda: F.linear(a[:m, :m], b_), flops=2 * m**3)
    run("gemm", "triton gemm", f"{m}^3", lambda: linear(a[:m, :m], b_), flops=2 * m**3)
    hidden, inner = (2048, 11008) if not small else (64, 96)
    w_gu = torch.randn(2 * inner, hidden, device=DEV, dtype=dt) * hidden**-0.5
    w_down = torch.randn(hidden, inner, device=DEV, dtype=dt) * inner**-0.5
    for tokens in ((4096, 1) if not small else (40, 1)):
        xt = torch.randn(tokens, hidden, device=DEV, dtype=dt)
        gu_flops = 2 * tokens * hidden * 2 * inner
        # few rows are bound by reading the weights: count bytes there, FLOPs for prefill
        kw = dict(nbytes=w_gu.numel() * 2) if tokens <= 64 else dict(flops=gu_flops)
        shape = f"{tokens} tokens, {hidden}->2x{inner}"
        run("mlp gate_up+SiLU*up", "torch matmul + triton swiglu", shape, lambda: swiglu(F.linear(xt, w_gu)), **kw)
        run("mlp gate_up+SiLU*up", "triton gemm, fused epilogue", shape,
            lambda: linear(xt, w_gu, activation="swiglu"), **kw)
        xi = torch.randn(tokens, inner, device=DEV, dtype=dt)
        kw = dict(nbytes=w_down.numel() * 2) if tokens <= 64 else dict(flops=2 * tokens * inner * hidden)
        shape = f"{tokens} tokens, {inner}->{hidden}"
        run("mlp down", "torch matmul", shape, lambda: F.linear(xi, w_down), **kw)
        run("mlp down", "triton gemm", shape, lambda: linear(xi, w_down), **kw)
    v_hidden, v_inner, v_tokens = (1280, 3420, 16384) if not small else (80, 60, 32)
    xv = torch.randn(v_tokens, v_inner, device=DEV, dtype=dt)
    wv = torch.randn(v_hidden, v_inner, device=DEV, dtype=dt) * v_inner**-0.5
    shape = f"{v_tokens} tokens, {v_inner}->{v_hidden}"
    run("vision mlp down", "torch matmul", shape, lambda: F.linear(xv, wv), flops=2 * v_tokens * v_inner * v_hidden)
    run("vision mlp down", "triton gemm", shape, lambda: linear(xv, wv), flops=2 * v_tokens * v_inner * v_hidden)

    # M-RoPE on q and k
    seq, hq, hk, d = (4096, 16, 2, 128) if not small else (16, 4, 2, 16)
    sections = (16, 24, 24) if d == 128 else (2, 3, 3)
    inv = 1.0 / (1e6 ** (torch.arange(0, d, 2, device=DEV, dtype=torch.float32) / d))
    rot = Rotary(inv, sections)
    q = torch.randn(1, seq, hq, d, device=DEV, dtype=dt)
    k = torch.randn(1, seq, hk, d, device=DEV, dtype=dt)
    pos = torch.randint(0, seq, (3, 1, seq), device=DEV)
    nb = 2 * (q.numel() + k.numel()) * 2
    shape = f"S={seq} {hq}/{hk} heads d={d}"
    er = eager.EagerRope()
    run("rope", "eager", shape, lambda: er(q, k, pos, rot), nbytes=nb)
    if CUDA and (c := compiled(lambda: er(q, k, pos, rot))):
        run("rope", "torch.compile(eager)", shape, c, nbytes=nb)
    if liger is not None and CUDA:
        from liger_kernel.ops.qwen2vl_mrope import LigerQwen2VLMRopeFunction
        cos, sin = eager.rope_angles(pos, rot)
        emb_c = torch.cat([cos, cos], -1).to(dt)
        emb_s = torch.cat([sin, sin], -1).to(dt)
        qt, kt = q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous()
        c3 = emb_c.expand(3, -1, -1, -1).contiguous()
        s3 = emb_s.expand(3, -1, -1, -1).contiguous()
        run("rope", "liger (cos/sin given)", shape,
            lambda: LigerQwen2VLMRopeFunction.apply(qt, kt, c3, s3, list(sections)), nbytes=nb)
    run("rope", "triton", shape, lambda: rope(q, k, pos, inv, rot.stream_of_pair), nbytes=nb)

    # causal GQA prefill
    seq, hq, hk, d = (8192, 16, 2, 128) if not small else (48, 4, 2, 16)
    q = torch.randn(1, seq, hq, d, device=DEV, dtype=dt)
    k = torch.randn(1, seq, hk, d, device=DEV, dtype=dt)
    v = torch.randn_like(k)
    flops = 4 * seq * seq * hq * d / 2
    shape = f"B=1 S={seq} {hq}/{hk} heads d={d}"
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    run("attention causal", "SDPA", shape,
        lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True), flops=flops)
    if CUDA:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def sdpa_flash():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)
        run("attention causal", "SDPA FlashAttention-2", shape, sdpa_flash, flops=flops)
    if xf is not None and CUDA:
        q5 = q.view(1, seq, hk, hq // hk, d)
        k5 = k.view(1, seq, hk, 1, d).expand(1, seq, hk, hq // hk, d)
        v5 = v.view(1, seq, hk, 1, d).expand(1, seq, hk, hq // hk, d)
        causal = xf.fmha.attn_bias.LowerTriangularMask()
        run("attention causal", "xformers", shape,
            lambda: xf.memory_efficient_attention(q5, k5, v5, attn_bias=causal), flops=flops)
    run("attention causal", "triton", shape, lambda: causal_attention(q, k, v, None, d**-0.5), flops=flops)

    # vision windows: block-diagonal, head dim 80
    windows, wlen, hv, dv = (256, 64, 16, 80) if not small else (4, 16, 2, 80)
    n_tok = windows * wlen
    qv = torch.randn(1, n_tok, hv, dv, device=DEV, dtype=dt)
    kv, vv = torch.randn_like(qv), torch.randn_like(qv)
    mask = BlockDiagonalMask.from_seqlens([wlen] * windows, device=DEV)
    flops = 4 * windows * wlen * wlen * hv * dv
    shape = f"{windows} windows x {wlen} tokens, {hv} heads d={dv}"
    run("attention varlen", "eager", shape, lambda: eager.EagerAttention()(qv, kv, vv, mask, dv**-0.5), flops=flops)
    run("attention varlen", "triton", shape,
        lambda: varlen_attention(qv, kv, vv, mask.cu_seqlens, mask.max_seqlen, dv**-0.5), flops=flops)

    # decode against a long cache
    cache_len, hq, hk, d = (32768, 16, 2, 128) if not small else (200, 4, 2, 16)
    q1 = torch.randn(1, 1, hq, d, device=DEV, dtype=dt)
    kc = torch.randn(1, cache_len, hk, d, device=DEV, dtype=dt)
    vc = torch.randn_like(kc)
    nb = 2 * kc.numel() * 2
    shape = f"1 query, {cache_len} cached, {hq}/{hk} heads"
    run("attention decode", "SDPA", shape,
        lambda: F.scaled_dot_product_attention(q1.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2),
                                               enable_gqa=True), nbytes=nb)
    run("attention decode", "triton", shape, lambda: decode_attention(q1, kc, vc, None, d**-0.5), nbytes=nb)
    if CUDA:  # launch cost apart: the same calls replayed from CUDA graphs
        sdpa_decode = lambda: F.scaled_dot_product_attention(  # noqa: E731
            q1.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2), enable_gqa=True)
        run_graphed("attention decode", "SDPA, CUDA graph", shape, sdpa_decode, nbytes=nb)
        run_graphed("attention decode", "triton, CUDA graph", shape,
                    lambda: decode_attention(q1, kc, vc, None, d**-0.5), nbytes=nb)

    # rope + cache write for one decode step
    kn, vn = torch.randn(1, 1, hk, d, device=DEV, dtype=dt), torch.randn(1, 1, hk, d, device=DEV, dtype=dt)
    sec = (16, 24, 24) if d == 128 else (2, 3, 3)
    inv = 1.0 / (1e6 ** (torch.arange(0, d, 2, device=DEV, dtype=torch.float32) / d))
    rot = Rotary(inv, sec, True)
    p1 = torch.full((3, 1, 1), cache_len - 1, device=DEV)
    run("cache (rope+write)", "eager", "1 token", lambda: eager.EagerCache()(q1, kn, vn, p1, rot, kc, vc, cache_len - 1))
    run("cache (rope+write)", "triton", "1 token",
        lambda: rope_and_cache(q1, kn, vn, p1, inv, rot.stream_of_pair, kc, vc, cache_len - 1))
    if CUDA:
        run_graphed("cache (rope+write)", "triton, CUDA graph", "1 token",
                    lambda: rope_and_cache(q1, kn, vn, p1, inv, rot.stream_of_pair, kc, vc, cache_len - 1))

    copy = next((r["TB/s"] for r in rows if r.get("impl") == "copy" and "TB/s" in r), None)
    mm = next((r["TFLOP/s"] for r in rows if r.get("impl") == "matmul" and "TFLOP/s" in r), None)
    device = torch.cuda.get_device_name() if CUDA else "cpu (triton interpreted)"
    import triton
    meta = {"device": device, "torch": torch.__version__, "triton": triton.__version__,
            "date": time.strftime("%Y-%m-%d"), "smoke": small}
    lines = [f"Device: {device}; torch {torch.__version__}; triton {triton.__version__}; {meta['date']}", "",
             "| op | impl | shape | ms | TB/s | TFLOP/s | of limit |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['op']} | {r['impl']} | {r['shape']} | failed: {r['error']} | | | |")
            continue
        frac = ""
        if "TB/s" in r and copy:
            frac = f"{r['TB/s'] / copy:.0%} of copy"
        elif "TFLOP/s" in r and mm:
            frac = f"{r['TFLOP/s'] / mm:.0%} of matmul"
        lines.append(f"| {r['op']} | {r['impl']} | {r['shape']} | {r['ms']:.3f} | {r.get('TB/s', float('nan')):.2f} "
                     f"| {r.get('TFLOP/s', float('nan')):.1f} | {frac} |")
    table = "\n".join(lines)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "kernel_figures.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    with open(os.path.join(args.out, "kernel_figures.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
