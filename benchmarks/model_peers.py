"""The whole model next to transformers' Qwen2_5_VLForConditionalGeneration, the implementation users would
otherwise run: the same weights, the same prompt, timed the same way.

    python benchmarks/model_peers.py [--out DIR]    # on the GPU: the 3b preset in bfloat16, about two minutes
    python benchmarks/model_peers.py --smoke        # anywhere: the tiny preset in float32, checks the script runs
                                                    # (without a GPU: transformers and qvl eager only)

Weights: qvl's random model of the preset (seed 0), written with `qvl.save_pretrained` in the published
checkpoint layout and read by transformers' `from_pretrained`, the route a user's checkpoint takes. transformers
runs with its default attention (SDPA) and its default dynamic KV cache. Workload: the default GPU ablation's
(one 448x448 image and 256 text tokens, batch 1, 64 tokens decoded greedily); --smoke a small image.

Every row is timed with one clock (CUDA events on a GPU), median of --repeats runs after a warm-up:
  vision ms      the vision tower alone on the image (`get_image_features` / `vision_features`)
  TTFT ms        `generate(max_new_tokens=1)`: vision tower, positions, prefill, the first token (the CUDA-graph
                 rows replay the tower and the prefill's device work)
  decode tok/s   (N - 1) / (generate(N) - generate(1)), each run's difference: the N - 1 decode steps (replayed
                 steps in the CUDA-graph rows)
  work MiB       peak GPU memory during generate(N) above what was allocated before it (activations, KV cache)
  logits rel err ||L - L_ref|| / ||L_ref|| over the prompt's logits, L_ref from qvl eager in float32 (the
                 reference the parity tests hold to transformers' float32 at 1e-4)
  capture ms     qvl's CUDA-graph rows: the decode graph's capture, then the vision tower's, then the prefill's,
                 each paid once per shape by the warm-up run (kept in `model.graphs`, `model.vision_graphs` and
                 `model.prefill_graphs` and replayed by every later call: the vision ms, TTFT and decode tok/s of
                 those rows are replays)
  launches/step  what the host launches per decode step, generation loop included: aten ops plus Triton launches
                 (qvl.launches.LaunchCounter) in generate(N) less generate(1), over N - 1, counted after the timed
                 runs. One per kernel without graphs; a CUDA-graph row's replay launches its kernels as one, so
                 there the figure is the loop's own work around the replay
Generation never stops early: no EOS for either implementation, so every run decodes exactly N tokens.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import qvl  # (before anything imports triton: the interpreter switch on a machine without a GPU)
from benchmarks.harness import on_triton  # noqa: E402
from qvl.ablate.config import ImageSpec, WorkloadSpec  # noqa: E402
from qvl.ablate.measure import Clock  # noqa: E402
from qvl.ablate.workload import build_workload  # noqa: E402
from qvl.dtypes import dtype_name  # noqa: E402
from qvl.launches import LaunchCounter  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
FULL_WORKLOAD = WorkloadSpec(images=(ImageSpec(size=(448, 448)),), prompt_tokens=256, decode_tokens=64)
# decode tok/s is a difference of two generate timings: even at the smoke size the decode steps must outweigh the
# noise of a shared CPU, or the difference can come out negative
SMOKE_WORKLOAD = WorkloadSpec(images=(ImageSpec(size=(112, 168)),), prompt_tokens=16, decode_tokens=16)


def import_transformers():
    """transformers imports torchvision when installed; beside a CPU-only torch its PyPI wheel needs the op schemas
    the tests declare (tests/processing/helpers.py)."""
    if importlib.util.find_spec("torchvision") is not None:
        from tests.processing.helpers import define_torchvision_ops

        define_torchvision_ops()
    import transformers

    return transformers


class TransformersPeer:
    """transformers' model behind the three calls a row times."""

    name = "transformers (SDPA)"

    def __init__(self, transformers, directory: str, dtype: torch.dtype, cfg):
        self.hf = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
            directory, dtype=dtype, attn_implementation="sdpa").to(DEV).eval()
        self.cfg = cfg

    def _kwargs(self, inputs: dict) -> dict:
        ids = inputs["input_ids"]
        # transformers >= 5 places the 3-D (M-RoPE) positions from the token types
        mm = (ids == self.cfg.image_token_id).int() + 2 * (ids == self.cfg.video_token_id).int()
        return {**inputs, "attention_mask": torch.ones_like(ids), "mm_token_type_ids": mm}

    def vision(self, inputs: dict):
        return self.hf.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])

    def generate(self, inputs: dict, n: int) -> torch.Tensor:
        return self.hf.generate(**self._kwargs(inputs), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                eos_token_id=None, pad_token_id=0)

    def logits(self, inputs: dict) -> torch.Tensor:
        return self.hf(**self._kwargs(inputs)).logits


class QvlRow:
    """qvl's model under one backend spec (calls a backend cannot run go to eager, as in the ablations)."""

    def __init__(self, model, spec: str, cuda_graph: bool = False):
        self.model, self.spec, self.cuda_graph = model, spec, cuda_graph
        self.name = f"qvl {spec}" + (", CUDA graph" if cuda_graph else "")

    def vision(self, inputs: dict):
        self.model.set_backends(self.spec, fallback="eager")
        with torch.no_grad():
            return self.model.vision_features(inputs["pixel_values"], inputs["image_grid_thw"],
                                              cuda_graph=self.cuda_graph)

    def generate(self, inputs: dict, n: int) -> torch.Tensor:
        self.model.set_backends(self.spec, fallback="eager")
        return self.model.generate(**inputs, max_new_tokens=n, eos_token_id=(), cuda_graph=self.cuda_graph)

    def logits(self, inputs: dict) -> torch.Tensor:
        self.model.set_backends(self.spec, fallback="eager")
        with torch.no_grad():
            return self.model(**inputs).logits


def measure(row, inputs: dict, n: int, repeats: int, clock: Clock, ref_logits: torch.Tensor) -> dict:
    prompt_len = inputs["input_ids"].shape[1]
    vision, first, decode, work = [], [], [], []
    with torch.no_grad():
        for _ in range(1 + repeats):  # the first run warms up (Triton compiles, cuBLAS picks its kernels)
            vision.append(clock.time(lambda: row.vision(inputs))[1])
            first.append(clock.time(lambda: row.generate(inputs, 1))[1])
            before = torch.cuda.memory_allocated() if CUDA else 0
            if CUDA:
                torch.cuda.reset_peak_memory_stats()
            out, ms = clock.time(lambda: row.generate(inputs, n))
            if out.shape[1] != prompt_len + n:
                raise RuntimeError(f"{row.name}: generated {out.shape[1] - prompt_len} tokens, not {n}")
            decode.append((n - 1) / ((ms - first[-1]) / 1e3) if n > 1 else float("nan"))
            if CUDA:
                work.append((torch.cuda.max_memory_allocated() - before) / 2**20)
        logits = row.logits(inputs).float()
    err = ((logits - ref_logits).norm() / ref_logits.norm()).item()
    launches = launches_per_step(row, inputs, n) if n > 1 else None
    median = lambda xs: statistics.median(xs[1:])  # noqa: E731  (the warm-up run left out)
    graphed = getattr(row, "cuda_graph", False)
    captures = [g["capture_seconds"] * 1e3 for g in row.model.graphs.stats() if g["captured"]] if graphed else []
    vision_captures = [g["capture_seconds"] * 1e3 for g in row.model.vision_graphs.stats()] if graphed else []
    prefill_captures = [g["capture_seconds"] * 1e3 for g in row.model.prefill_graphs.stats()] if graphed else []
    return {"impl": row.name, "vision_ms": median(vision), "ttft_ms": median(first), "decode_tok_s": median(decode),
            "capture_ms": max(captures) if captures else None,
            "vision_capture_ms": max(vision_captures) if vision_captures else None,
            "prefill_capture_ms": max(prefill_captures) if prefill_captures else None,
            "work_mib": median(work) if work else None, "logits_rel_err": err, "launches_per_step": launches,
            "tokens": out[0, prompt_len:].tolist()}


def launches_per_step(row, inputs: dict, n: int) -> float:
    """Host launches per decode step (the module docstring's launches/step)."""
    counts = []
    for tokens in (1, n):
        with torch.no_grad(), LaunchCounter().counting() as launches:
            row.generate(inputs, tokens)
        counts.append(launches.total)
    return (counts[1] - counts[0]) / (n - 1)


def scratch_dir(model) -> str | None:
    """/dev/shm when it has room for the checkpoint (7.5 GB at 3b in bf16: memory is faster than the disk), else
    the default temporary directory."""
    need = 2 * sum(p.numel() * p.element_size() for p in model.parameters())  # with room to spare
    try:
        return "/dev/shm" if os.access("/dev/shm", os.W_OK) and shutil.disk_usage("/dev/shm").free > need else None
    except OSError:
        return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="the tiny preset in float32, any device")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per row (default 3, smoke 2)")
    args = ap.parse_args(argv)
    small = args.smoke or not CUDA
    preset, dtype = ("tiny", torch.float32) if small else ("3b", torch.bfloat16)
    # transformers' patch embedding is a Conv3d, which cuDNN runs in TF32 unless told not to (2e-4 off in float32
    # on the H200); qvl's is a matmul, full float32 by torch's default. Same arithmetic on both sides.
    torch.backends.cudnn.allow_tf32 = False
    repeats = args.repeats or (2 if small else 3)
    transformers = import_transformers()

    # The reference logits from float32 weights; the rows run those weights cast to the row dtype.
    model = qvl.from_config(preset, dtype=torch.float32, device=DEV, seed=0)
    spec = SMOKE_WORKLOAD if small else FULL_WORKLOAD
    work = build_workload(spec, model.cfg)
    inputs = {k: v.to(DEV) for k, v in work.inputs.items() if v is not None}
    with torch.no_grad():
        ref_logits = model(**inputs).logits.float()
    model = model.to(dtype)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=scratch_dir(model)) as directory:
        qvl.save_pretrained(model, directory, max_shard_bytes=4 * 2**30)
        peer = TransformersPeer(transformers, directory, dtype, model.cfg)
    print(f"checkpoint written and read by transformers in {time.perf_counter() - started:.1f} s", flush=True)

    # Interpreted kernels (no GPU) are for checking results, not for timing: the triton rows need a GPU.
    # The last row puts every projection on the triton-gemm backend, whose decode projections run on qvl's GEMV.
    rows = [peer, QvlRow(model, "eager")] + ([QvlRow(model, "triton"), QvlRow(model, "triton", True),
                                              QvlRow(model, on_triton("triton-gemm"), True)] if CUDA else [])
    clock, results = Clock(DEV), []
    for row in rows:
        try:
            results.append(measure(row, inputs, spec.decode_tokens, repeats, clock, ref_logits))
        except Exception as e:  # one implementation failing must not lose the others' rows
            results.append({"impl": row.name, "error": f"{type(e).__name__}: {e}"[:300]})
        print(json.dumps({k: v for k, v in results[-1].items() if k != "tokens"}), flush=True)
        # written after each row: a run stopped by the GPU session's time box keeps the rows it measured
        write(results, args.out, small, preset, dtype, spec, repeats, transformers.__version__,
              echo=len(results) == len(rows))
        if row is peer:  # its weights are not needed any more: give the memory back before the qvl rows
            del peer.hf
            if CUDA:
                torch.cuda.empty_cache()
    return 0


def write(rows: list[dict], out: str, small: bool, preset: str, dtype: torch.dtype, spec: WorkloadSpec,
          repeats: int, transformers_version: str, echo: bool = True) -> None:
    """model_peers.json (every figure, the generated tokens) and model_peers.md (the table, printed with `echo`)."""
    device = torch.cuda.get_device_name() if CUDA else "cpu (triton interpreted)"
    dt = dtype_name(dtype)
    image = "x".join(map(str, spec.images[0].size))
    meta = {"device": device, "torch": torch.__version__, "transformers": transformers_version, "preset": preset,
            "dtype": dt, "date": time.strftime("%Y-%m-%d"), "smoke": small, "repeats": repeats,
            "workload": f"one {image} image + {spec.prompt_tokens} text tokens, batch 1, {spec.decode_tokens} "
                        "tokens decoded"}
    lines = [f"Device: {device}; torch {torch.__version__}; transformers {transformers_version}; {meta['date']}",
             f"{preset} preset, random weights in {dt}; {meta['workload']}; median of {repeats} runs", "",
             "| impl | vision ms | TTFT ms | decode tok/s | launches/step | capture ms | work MiB "
             "| logits rel err vs qvl eager float32 |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['impl']} | failed: {r['error']} | | | | | | |")
            continue
        launches = "" if r["launches_per_step"] is None else f"{r['launches_per_step']:.0f}"
        work = "" if r["work_mib"] is None else f"{r['work_mib']:.0f}"
        capture = "" if r.get("capture_ms") is None else f"{r['capture_ms']:.0f}"
        for part in ("vision_capture_ms", "prefill_capture_ms"):
            if r.get(part) is not None:
                capture += f" + {r[part]:.0f}"
        lines.append(f"| {r['impl']} | {r['vision_ms']:.1f} | {r['ttft_ms']:.1f} | {r['decode_tok_s']:.1f} "
                     f"| {launches} | {capture} | {work} | {r['logits_rel_err']:.2e} |")
    write_files(out, "model_peers", meta, rows, lines, echo)


def write_files(out: str, stem: str, meta: dict, rows: list[dict], lines: list[str], echo: bool = True) -> None:
    """<stem>.json (meta and every row) and <stem>.md (the table `lines`) in `out`; the table printed with `echo`."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{stem}.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    with open(os.path.join(out, f"{stem}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    if echo:
        print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
