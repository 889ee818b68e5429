"""Decode attention's launch configuration, swept: which split count, key block, warps and pipeline depth
reach the copy rate on this GPU. On the H200 (benchmarks/gpu/h200-2026-11-26-lease3) the automatic choice
came within 1 us of the best configuration at every shape, level with SDPA (22.5 vs 21.9 us at a 32k cache).

    python benchmarks/decode_sweep.py [--out DIR]     # on the GPU, about a minute
    python benchmarks/decode_sweep.py --smoke         # anywhere: tiny shapes, checks the script runs

Timing is GPU time: on a GPU every configuration is captured in a CUDA graph and the replay is timed
(triton.testing.do_bench: the L2 is flushed before each call, so the cache is read cold from memory). Without
the graph the first sweep on the H200 timed the host instead: qvl's call (checks, two Triton launches) costs
more host time than the kernels take, so identical configurations measured 49 and 120 us depending on how
far the host ran behind the L2 flush. One row, "triton auto, no graph", keeps that host-bound figure, the cost
of an eager decode call. Two stages per shape, so the sweep stays
small: every split count x key block at the default warps and stages, then warps x stages for the best of
those. SDPA (what users would otherwise pick) is measured in the same run, and the automatic choice
(`choose_num_splits` and the default tiles) is the row to beat. Each configuration is checked against SDPA's
output before it is timed; a configuration that fails to compile or run is recorded with its error.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import qvl  # noqa: F401  (before anything imports triton: the interpreter switch on a machine without a GPU)
from benchmarks.kernel_figures import CUDA, DEV, bench, graphed  # noqa: E402
from qvl.kernels.decode_attention import DEFAULT_TILES, decode_attention  # noqa: E402

# (batch, cache length, q heads, kv heads, head dim): the 3b decoder at a long and a medium cache, the 7b one.
SHAPES = [(1, 32768, 16, 2, 128), (1, 4096, 16, 2, 128), (1, 32768, 28, 4, 128)]
SMOKE_SHAPES = [(1, 300, 4, 2, 16)]
SPLITS = [None, 16, 32, 64, 128, 256, 512]  # None: choose_num_splits
BLOCKS_N = [32, 64, 128]
WARPS, STAGES = [2, 4, 8], [2, 3, 4, 5]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes and a few configurations, any device")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = ap.parse_args()
    small = args.smoke or not CUDA
    dt = torch.bfloat16
    rows: list[dict] = []

    def measure(shape: tuple, q, k, v, expected, name: str, fn, graph: bool = CUDA, **config) -> dict:
        row = {"shape": shape_name(shape), "impl": name, **config}
        try:
            out = fn()
            err = ((out.float() - expected.float()).norm() / expected.float().norm()).item()
            if err > 2e-2:
                raise AssertionError(f"relative error {err:.3g} against SDPA")
            seconds = bench(graphed(fn) if graph else fn, reps=3)
            row |= {"us": seconds * 1e6, "TB/s": 2 * k.numel() * k.element_size() / seconds / 1e12}
        except Exception as e:  # a configuration that does not compile (shared memory) must not stop the sweep
            row["error"] = f"{type(e).__name__}: {e}"[:200]
        rows.append(row)
        print(json.dumps(row), flush=True)
        return row

    for shape in SMOKE_SHAPES if small else SHAPES:
        batch, cache_len, hq, hk, d = shape
        q = torch.randn(batch, 1, hq, d, device=DEV, dtype=dt)
        k = torch.randn(batch, cache_len, hk, d, device=DEV, dtype=dt)
        v = torch.randn_like(k)
        scale = d**-0.5

        sdpa = functools.partial(sdpa_attention, q, k, v)
        triton_auto = functools.partial(decode_attention, q, k, v, None, scale)
        expected = sdpa()
        measure(shape, q, k, v, expected, "SDPA", sdpa)
        measure(shape, q, k, v, expected, "triton auto", triton_auto)
        if CUDA:
            measure(shape, q, k, v, expected, "triton auto, no graph", triton_auto, graph=False)

        def ours(config, shape=shape, q=q, k=k, v=v, expected=expected, scale=scale):
            return measure(shape, q, k, v, expected, "triton",
                           functools.partial(decode_attention, q, k, v, None, scale, **config), **config)

        splits, blocks = (SPLITS[:2], BLOCKS_N[1:2]) if small else (SPLITS, BLOCKS_N)
        first = [ours({"num_splits": s, "block_n": b}) for s, b in itertools.product(splits, blocks)]
        best = min((r for r in first if "us" in r), key=lambda r: r["us"])
        warps, stages = (WARPS[1:2], STAGES[:2]) if small else (WARPS, STAGES)
        for w, st in itertools.product(warps, stages):
            ours({"num_splits": best["num_splits"], "block_n": best["block_n"], "num_warps": w, "num_stages": st})

    write(rows, args.out, small)
    return 0


def sdpa_attention(q, k, v):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          enable_gqa=True).transpose(1, 2)


def shape_name(shape: tuple) -> str:
    batch, cache_len, hq, hk, d = shape
    return f"B={batch} cache {cache_len} heads {hq}/{hk} d={d}"


def write(rows: list[dict], out: str, small: bool) -> None:
    """decode_sweep.json (every row) and decode_sweep.md: per shape SDPA, the automatic choice, the 8 fastest."""
    import triton

    device = torch.cuda.get_device_name() if CUDA else "cpu (triton interpreted)"
    meta = {"device": device, "torch": torch.__version__, "triton": triton.__version__,
            "date": time.strftime("%Y-%m-%d"), "smoke": small, "default_tiles": DEFAULT_TILES}
    lines = [f"Device: {device}; torch {torch.__version__}; triton {triton.__version__}; {meta['date']}", ""]
    for shape in dict.fromkeys(r["shape"] for r in rows):
        mine = [r for r in rows if r["shape"] == shape]
        timed = sorted((r for r in mine if "us" in r), key=lambda r: r["us"])
        shown = [r for r in mine if r["impl"] != "triton"] + [r for r in timed if r["impl"] == "triton"][:8]
        failed = [r for r in mine if "error" in r]
        lines += [f"### {shape}", "", "| impl | splits | key block | warps | stages | us | TB/s |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in shown:
            auto = "" if r["impl"].startswith("SDPA") else "auto"  # a knob the row leaves to decode_attention
            cells = [r["impl"]] + [auto if r.get(key) is None else str(r[key])
                                   for key in ("num_splits", "block_n", "num_warps", "num_stages")]
            figures = f"{r['us']:.1f} | {r['TB/s']:.2f}" if "us" in r else f"failed: {r['error']} |"
            lines.append(f"| {' | '.join(cells)} | {figures} |")
        lines += ["", f"{len(timed)} configurations timed, {len(failed)} failed.", ""]
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "decode_sweep.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    with open(os.path.join(out, "decode_sweep.md"), "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
