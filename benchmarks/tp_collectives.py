"""Tensor parallelism's collectives on one device: a model in a process group of one rank next to the same model
without a group.

    python benchmarks/tp_collectives.py [--out DIR]   # on the GPU: 3b in bfloat16, NCCL, triton, CUDA graph
    python benchmarks/tp_collectives.py --smoke       # anywhere: tiny in float32, gloo on a CPU, eager

In a group of one (`qvl.parallel.group.join`) the model runs every collective tensor parallelism adds (an
all-reduce after each attention and MLP, the vocabulary-parallel embedding's all-reduce, the logits' all-gather)
over that one rank: the same arithmetic, so the logits must be equal and the greedy tokens identical, and on a
GPU the decode step is captured in a CUDA graph with its NCCL calls inside. Reports the logits' largest
difference, whether the tokens match, and decode tok/s with and without the group (model_peers' workload, batch
1). Writes tp_collectives.json and tp_collectives.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import qvl  # noqa: E402  (before anything imports triton: the interpreter switch on a machine without a GPU)
from benchmarks.model_peers import CUDA, DEV, FULL_WORKLOAD, SMOKE_WORKLOAD, write_files  # noqa: E402
from qvl.ablate.measure import Clock  # noqa: E402
from qvl.ablate.workload import build_workload  # noqa: E402
from qvl.dtypes import dtype_name  # noqa: E402
from qvl.parallel.launch import run_workers  # noqa: E402


def decode_rate(model, inputs: dict, n: int, graph: bool, repeats: int, clock: Clock) -> tuple[float, torch.Tensor]:
    """(median decode tok/s after a warm-up, the tokens of the last run)."""
    rates = []
    with torch.no_grad():
        for _ in range(1 + repeats):
            first = clock.time(lambda: model.generate(**inputs, max_new_tokens=1, eos_token_id=(), cuda_graph=graph))[1]
            tokens, whole = clock.time(lambda: model.generate(**inputs, max_new_tokens=n, eos_token_id=(),
                                                              cuda_graph=graph))
            rates.append((n - 1) / ((whole - first) / 1e3))
    return statistics.median(rates[1:]), tokens


def worker(out: str, smoke: bool) -> None:
    small = smoke or not CUDA
    preset, dtype = ("tiny", torch.float32) if small else ("3b", torch.bfloat16)
    backends, graph, repeats = ("eager", False, 3) if small else ("triton", True, 3)
    spec = SMOKE_WORKLOAD if small else FULL_WORKLOAD
    # the same seed, before and after the group exists: the same weights, once without and once with collectives
    plain = qvl.from_config(preset, dtype=dtype, device=DEV, backends=backends, seed=0)
    assert plain.parallel is None
    if CUDA:
        torch.cuda.set_device(DEV)
    dist.init_process_group("nccl" if CUDA else "gloo")
    grouped = qvl.from_config(preset, dtype=dtype, device=DEV, backends=backends, seed=0)
    assert grouped.parallel is not None and grouped.parallel.size == 1
    work = build_workload(spec, plain.cfg)
    inputs = {k: v.to(DEV) for k, v in work.inputs.items() if v is not None}
    with torch.no_grad():
        difference = (plain(**inputs).logits.float() - grouped(**inputs).logits.float()).abs().max().item()
    clock, rows = Clock(DEV), []
    for name, model in (("no group", plain), ("group of one", grouped)):
        rate, tokens = decode_rate(model, inputs, spec.decode_tokens, graph, repeats, clock)
        rows.append({"model": name, "decode_tok_s": rate, "tokens": tokens.tolist()})
        print(f"{name}: {rate:.1f} tok/s", flush=True)
    same = rows[0]["tokens"] == rows[1]["tokens"]
    device = torch.cuda.get_device_name() if CUDA else "cpu"
    meta = {"device": device, "torch": torch.__version__, "backend": dist.get_backend(), "preset": preset,
            "dtype": dtype_name(dtype), "backends": backends, "cuda_graph": graph, "repeats": repeats,
            "date": time.strftime("%Y-%m-%d"), "logits_max_abs_difference": difference, "tokens_equal": same}
    lines = [f"Device: {device}; torch {torch.__version__}; {dist.get_backend()}; {meta['date']}",
             f"{preset} in {meta['dtype']}, {backends}, CUDA graph {graph}; logits' largest difference "
             f"{difference:.3g}; greedy tokens {'equal' if same else 'DIFFER'}", "",
             "| model | decode tok/s |", "| --- | --- |"]
    lines += [f"| {row['model']} | {row['decode_tok_s']:.1f} |" for row in rows]
    write_files(out, "tp_collectives", meta, rows, lines)
    dist.destroy_process_group()
    if difference != 0.0 or not same:
        raise SystemExit(f"the group of one changed the results: logits differ by {difference}, tokens equal: {same}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="the tiny preset in float32, gloo, eager")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = ap.parse_args(argv)
    run_workers(1, worker, (args.out, args.smoke))  # its own process: the default group is torchrun-style
    return 0


if __name__ == "__main__":
    sys.exit(main())
