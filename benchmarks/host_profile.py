"""Where the host time of the whole model goes, profiled where it is spent: on the GPU machine.

    python benchmarks/host_profile.py [--out DIR]    # on the GPU: the 3b preset in bfloat16, about a minute
    python benchmarks/host_profile.py --smoke        # anywhere: the tiny preset, checks the script runs
                                                     # (eager only: interpreted Triton's host time says nothing)

Why: at batch 1 the 3b model is host-bound on the H200 (benchmarks/gpu/h200-2026-11-26-lease2). The triton
decode step took 31.5 ms launched op by op and 2.68 ms replayed from a CUDA graph. The vision tower took
16.2 ms on 132 patches, as long as it had taken on 1024. benchmarks/host_overhead.py measures host cost on
the CPU with a stand-in driver, and it puts a triton decoder layer at ~0.3 ms. The GPU showed ~0.9 ms. The
difference lies in what the stand-in leaves out (CUDA launches, the caching allocator, cuBLAS), and only a
profile taken there can place it. It did (benchmarks/gpu/h200-2026-11-26-lease3): 17.7 ms a triton step
(0.49 ms a layer) against 2.4 ms of kernels, spread thin over cuBLAS calls, allocations, Triton's launch path
and qvl's Python. The 31.5 ms was a slow spell of the lent machine's host: a run 16 s after a machine started
measured 39.4 ms, one 40 s later 18.3 ms. Compare this script's wall times within one run.

For each backend (eager, triton) and each of the vision tower (the demo image), prefill (the demo prompt) and
one decode step (lengths in Python, no graph), after a warm-up:
  wall ms      the call alone, synchronized after it (median of 5)
  device ms    the GPU's kernel time inside the call (torch.profiler; on the CPU, none)
  by origin    cProfile's own time (tottime) of every function, summed by where the function lives: qvl,
               triton, torch (Python), builtins (C functions reached from Python: torch ops, the launcher)
  top          the 15 functions with the most own time, per call
cProfile adds its own cost to every Python call, so read its figures as shares of the host time, not as
times. Writes host_profile.json (every figure) and host_profile.md.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import qvl  # (before anything imports triton: the interpreter switch on a machine without a GPU)
from benchmarks.harness import CUDA, DEVICE, device_name, median_seconds, sync  # noqa: E402
from qvl.demo import demo_prompt  # noqa: E402
from qvl.dtypes import dtype_name  # noqa: E402

TOP = 15


def device_ms(fn) -> float | None:
    """GPU kernel time inside one call, from torch.profiler's CUDA activity."""
    if not CUDA:
        return None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        sync()
    # The device's own events (kernels, copies), once each: a CPU op's device time counts its kernels again.
    return sum(e.device_time_total for e in prof.events() if e.device_type == DeviceType.CUDA) / 1e3


def origin(filename: str) -> str:
    if filename == "~":
        return "builtins"
    path = filename.replace(os.sep, "/")
    for name in ("qvl", "triton", "torch"):
        if f"/{name}/" in path:
            return name
    return "other"


def host_profile(fn, reps: int) -> dict:
    """cProfile over `reps` calls: own time summed by origin, and the top functions, both per call (ms)."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(reps):
        fn()
    profiler.disable()
    sync()
    stats = pstats.Stats(profiler).stats  # {(file, line, name): (primitive calls, calls, tottime, cumtime, ..)}
    by_origin: dict[str, float] = {}
    rows = []
    for (filename, line, name), (_, calls, own, _, _) in stats.items():
        by_origin[origin(filename)] = by_origin.get(origin(filename), 0.0) + own * 1e3 / reps
        where = name if filename == "~" else f"{os.path.basename(filename)}:{line} {name}"
        rows.append({"function": where, "origin": origin(filename), "own_ms": own * 1e3 / reps,
                     "calls": calls / reps})
    rows.sort(key=lambda r: -r["own_ms"])
    return {"by_origin_ms": dict(sorted(by_origin.items(), key=lambda kv: -kv[1])), "top": rows[:TOP]}


def workloads(model, inputs) -> dict:
    prompt = model.prepare(**inputs)
    cache = model.new_cache(1, inputs["input_ids"].shape[1] + 64)
    model.prefill(prompt, cache)
    token = torch.zeros(1, dtype=torch.long, device=DEVICE)
    start = cache.length

    def decode():
        cache.length = start  # every call writes the same slot: the same work each time
        model.decode_step(token, prompt, cache)

    return {"vision tower": lambda: model.vision_features(inputs["pixel_values"], inputs["image_grid_thw"]),
            "prefill": lambda: model.prefill(prompt, cache), "decode step": decode}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="the tiny preset, any device")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--backends", default=None, help="comma-separated (default eager,triton; --smoke eager)")
    args = ap.parse_args(argv)
    small = args.smoke or not CUDA
    backends = args.backends or ("eager" if small else "eager,triton")
    preset, dtype = ("tiny", torch.float32) if small else ("3b", torch.bfloat16)
    reps = 2 if small else 5
    model = qvl.from_config(preset, dtype=dtype, device=DEVICE, seed=0).requires_grad_(False)  # inference
    inputs = demo_prompt(model.cfg)
    rows = []
    for backend in backends.split(","):
        model.set_backends(backend, fallback="eager")
        for what, fn in workloads(model, inputs).items():
            fn()  # warm: compiles, autotunes, fills caches
            row = {"backend": backend, "what": what, "wall_ms": median_seconds(fn, reps, warmup=0) * 1e3,
                   "device_ms": device_ms(fn)}
            row |= host_profile(fn, reps)
            rows.append(row)
            print(json.dumps({k: row[k] for k in ("backend", "what", "wall_ms", "device_ms", "by_origin_ms")}),
                  flush=True)
    write(rows, args.out, preset, dtype)
    return 0


def write(rows: list[dict], out: str, preset: str, dtype: torch.dtype) -> None:
    import triton

    device = device_name()
    meta = {"device": device, "torch": torch.__version__, "triton": triton.__version__, "preset": preset,
            "dtype": dtype_name(dtype), "date": time.strftime("%Y-%m-%d")}
    origins = ["qvl", "triton", "torch", "builtins", "other"]
    lines = [f"Device: {device}; torch {meta['torch']}; triton {meta['triton']}; {preset} {meta['dtype']}; "
             f"{meta['date']}", "",
             "| backend | call | wall ms | device ms | " + " | ".join(f"{o} ms" for o in origins) + " |",
             "| --- " * (4 + len(origins)) + "|"]
    for r in rows:
        dev = "-" if r["device_ms"] is None else f"{r['device_ms']:.2f}"
        lines.append(f"| {r['backend']} | {r['what']} | {r['wall_ms']:.2f} | {dev} | "
                     + " | ".join(f"{r['by_origin_ms'].get(o, 0.0):.2f}" for o in origins) + " |")
    lines += ["", "Per origin: cProfile's own time per call (inflated by cProfile itself; read as shares).", ""]
    for r in rows:
        lines += [f"### {r['backend']}: {r['what']}", "", "| function | origin | own ms | calls |",
                  "| --- | --- | --- | --- |"]
        lines += [f"| `{t['function']}` | {t['origin']} | {t['own_ms']:.3f} | {t['calls']:g} |" for t in r["top"]]
        lines.append("")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "host_profile.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    with open(os.path.join(out, "host_profile.md"), "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines[:4 + len(rows)]))


if __name__ == "__main__":
    sys.exit(main())
