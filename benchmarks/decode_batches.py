"""Decode throughput by batch size: qvl's CUDA-graph decode next to transformers with its static cache.

    python benchmarks/decode_batches.py [--out DIR]   # on the GPU: 3b in bfloat16, batches 1 4 16 64
    python benchmarks/decode_batches.py --smoke       # anywhere: tiny in float32, batches 1 2, eager, no graphs

Workload: model_peers' (one 448x448 image and 256 text tokens per row, the same prompt in every row), N tokens
decoded greedily without EOS. decode tok/s = B * (N - 1) / (generate(N) - generate(1)), median of --repeats
runs after a warm-up (which captures qvl's graph for the shape: later calls replay it from `model.graphs`).
transformers runs with SDPA and `cache_implementation="static"`, not compiled. Writes decode_batches.json and
decode_batches.md (the table benchmarks/README.md quotes).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import qvl  # noqa: E402  (before anything imports triton: the interpreter switch on a machine without a GPU)
from benchmarks.model_peers import (  # noqa: E402
    CUDA,
    DEV,
    FULL_WORKLOAD,
    SMOKE_WORKLOAD,
    TransformersPeer,
    import_transformers,
    scratch_dir,
    write_files,
)
from qvl.ablate.measure import Clock  # noqa: E402
from qvl.ablate.workload import build_workload  # noqa: E402
from qvl.dtypes import dtype_name  # noqa: E402


class StaticCachePeer(TransformersPeer):
    name = "transformers (SDPA, static cache)"

    def generate(self, inputs: dict, n: int) -> torch.Tensor:
        return self.hf.generate(**self._kwargs(inputs), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                eos_token_id=None, pad_token_id=0, cache_implementation="static")


def qvl_generate(model, spec: str, graph: bool):
    """generate under `spec` (set per call: rows share the model; the same plan keeps the captured graphs)."""
    return lambda inputs, n: model.set_backends(spec).generate(**inputs, max_new_tokens=n, eos_token_id=(),
                                                               cuda_graph=graph)


def decode_rate(generate, inputs: dict, batch: int, n: int, repeats: int, clock: Clock) -> float:
    """Median decode tokens/s over the batch (the warm-up run left out)."""
    rates = []
    with torch.no_grad():
        for _ in range(1 + repeats):
            first = clock.time(lambda: generate(inputs, 1))[1]
            whole = clock.time(lambda: generate(inputs, n))[1]
            rates.append(batch * (n - 1) / ((whole - first) / 1e3))
    return statistics.median(rates[1:])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="the tiny preset in float32, any device")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--batches", type=int, nargs="+", help="batch sizes (default 1 4 16 64; smoke 1 2)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per cell (default 3)")
    args = ap.parse_args(argv)
    small = args.smoke or not CUDA
    preset, dtype = ("tiny", torch.float32) if small else ("3b", torch.bfloat16)
    batches = args.batches or ([1, 2] if small else [1, 4, 16, 64])
    repeats = args.repeats or 3
    spec = SMOKE_WORKLOAD if small else FULL_WORKLOAD
    transformers = import_transformers()
    model = qvl.from_config(preset, dtype=dtype, device=DEV, seed=0)
    with tempfile.TemporaryDirectory(dir=scratch_dir(model)) as directory:
        qvl.save_pretrained(model, directory, max_shard_bytes=4 * 2**30)
        peer = StaticCachePeer(transformers, directory, dtype, model.cfg)
    # interpreted Triton kernels say nothing about speed: on a CPU only eager, without graphs
    impls = {peer.name: peer.generate, "qvl eager": qvl_generate(model, "eager", False)}
    if CUDA:
        impls["qvl triton, CUDA graph"] = qvl_generate(model, "triton", True)
    clock, rows = Clock(DEV), []
    for batch in batches:
        work = build_workload(replace(spec, batch_size=batch), model.cfg)
        inputs = {k: v.to(DEV) for k, v in work.inputs.items() if v is not None}
        row = {"batch": batch}
        for name, generate in impls.items():
            started = time.perf_counter()
            try:
                row[name] = decode_rate(generate, inputs, batch, spec.decode_tokens, repeats, clock)
            except Exception as e:  # one implementation failing must not lose the others' cells
                row[name] = f"{type(e).__name__}: {e}"[:200]
            print(f"batch {batch}, {name}: {row[name]} ({time.perf_counter() - started:.0f} s)", flush=True)
        rows.append(row)
    device = torch.cuda.get_device_name() if CUDA else "cpu"
    meta = {"device": device, "torch": torch.__version__, "transformers": transformers.__version__,
            "preset": preset, "dtype": dtype_name(dtype), "date": time.strftime("%Y-%m-%d"), "repeats": repeats,
            "graphs": model.graphs.stats()}
    names = list(impls)
    lines = [f"Device: {device}; torch {torch.__version__}; transformers {transformers.__version__}; {meta['date']}",
             f"{preset} preset in {meta['dtype']}; decode tok/s over the batch, median of {repeats}", "",
             "| batch | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
    for row in rows:
        cells = [f"{row[n]:.1f}" if isinstance(row[n], float) else f"failed: {row[n]}" for n in names]
        lines.append(f"| {row['batch']} | " + " | ".join(cells) + " |")
    write_files(args.out, "decode_batches", meta, rows, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
