"""A whole-model training step next to transformers' Qwen2_5_VLForConditionalGeneration, with and without
Liger-Kernel's patches: the same weights, the same batch and labels, timed the same way.

    python benchmarks/train_peers.py [--out DIR]    # on the GPU: the 3b preset in bfloat16
    python benchmarks/train_peers.py --smoke        # anywhere: the tiny preset in float32, checks the script runs
                                                    # (without a GPU: transformers and qvl eager only)

Weights: qvl's random model of the preset (seed 0), saved in the published layout and read by transformers, as
in model_peers.py. Batch (the issue's target workload): one 448x448 image and 2048 text tokens, batch 1; labels
are the ids with the padding and the vision tokens ignored (`qvl.ablate.workload.training_labels`); --smoke a
small image and 16 tokens.

Rows: transformers (SDPA) and transformers + Liger (`apply_liger_kernel_to_qwen2_5_vl`: RMSNorm, SwiGLU, M-RoPE,
fused linear cross-entropy), both with gradient checkpointing; qvl eager without checkpointing (the memory the
target is relative to), qvl eager and qvl triton with checkpointing (triton: the fused loss, logits never built).
Every row is timed with one clock (CUDA events on a GPU), median of --repeats steps after a warm-up step:
  step ms        zero_grad, forward with labels, backward
  tokens/s       the batch's tokens / step time
  peak MiB       the most torch.cuda.max_memory_allocated rose above what was allocated before the step
                 (activations and gradients; the weights were there before)
  loss           the loss of the first step (every row starts from the same weights: no optimizer step)
  loss rel err   |loss - loss of qvl eager| / loss of qvl eager
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import qvl  # (before anything imports triton: the interpreter switch on a machine without a GPU)
from benchmarks.model_peers import CUDA, DEV, import_transformers, scratch_dir, write_files  # noqa: E402
from qvl.ablate.config import ImageSpec, WorkloadSpec  # noqa: E402
from qvl.ablate.measure import Clock  # noqa: E402
from qvl.ablate.workload import build_workload, training_labels  # noqa: E402
from qvl.dtypes import dtype_name  # noqa: E402

FULL_WORKLOAD = WorkloadSpec(images=(ImageSpec(size=(448, 448)),), prompt_tokens=2048, decode_tokens=1)
SMOKE_WORKLOAD = WorkloadSpec(images=(ImageSpec(size=(112, 168)),), prompt_tokens=16, decode_tokens=1)


class TransformersRow:
    """transformers' model in train mode with gradient checkpointing; `liger` patches its modules first."""

    def __init__(self, transformers, directory: str, dtype: torch.dtype, cfg, liger: bool):
        if liger:
            from liger_kernel.transformers import apply_liger_kernel_to_qwen2_5_vl

            apply_liger_kernel_to_qwen2_5_vl()  # patches the classes: build the model after it
        self.name = "transformers + Liger" if liger else "transformers (SDPA)"
        self.model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
            directory, dtype=dtype, attn_implementation="sdpa").to(DEV).train()
        self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.cfg = cfg

    def loss(self, batch: dict) -> torch.Tensor:
        ids = batch["input_ids"]
        # transformers >= 5 places the 3-D (M-RoPE) positions from the token types
        mm = (ids == self.cfg.image_token_id).int() + 2 * (ids == self.cfg.video_token_id).int()
        return self.model(**batch, attention_mask=torch.ones_like(ids), mm_token_type_ids=mm).loss


class QvlRow:
    """qvl's model under one backend spec (calls a backend cannot run go to eager, as in the ablations)."""

    def __init__(self, model, spec: str, checkpointing: bool):
        self.model, self.spec, self.checkpointing = model, spec, checkpointing
        self.name = f"qvl {spec}" + (", checkpointing" if checkpointing else "")

    def loss(self, batch: dict) -> torch.Tensor:
        self.model.set_backends(self.spec, fallback="eager").train()
        self.model.set_gradient_checkpointing(self.checkpointing)
        return self.model(**batch).loss


def measure(row, batch: dict, repeats: int, clock: Clock) -> dict:
    module = row.model
    tokens = batch["input_ids"].numel()
    steps, peaks, losses = [], [], []

    def step():
        module.zero_grad(set_to_none=True)
        loss = row.loss(batch)
        loss.backward()
        return loss.detach()

    for _ in range(1 + repeats):  # the first step warms up (Triton compiles, cuBLAS picks its kernels)
        module.zero_grad(set_to_none=True)
        before = torch.cuda.memory_allocated() if CUDA else 0
        if CUDA:
            torch.cuda.reset_peak_memory_stats()
        loss, ms = clock.time(step)
        steps.append(ms)
        losses.append(float(loss))
        if CUDA:
            peaks.append((torch.cuda.max_memory_allocated() - before) / 2**20)
    module.zero_grad(set_to_none=True)
    median = lambda xs: statistics.median(xs[1:])  # noqa: E731  (the warm-up step left out)
    step_ms = median(steps)
    return {"impl": row.name, "step_ms": step_ms, "tokens_per_s": tokens / (step_ms / 1e3),
            "peak_mib": median(peaks) if peaks else None, "loss": losses[0]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="the tiny preset in float32, any device")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--repeats", type=int, default=None, help="timed steps per row (default 3, smoke 2)")
    args = ap.parse_args(argv)
    small = args.smoke or not CUDA
    preset, dtype = ("tiny", torch.float32) if small else ("3b", torch.bfloat16)
    torch.backends.cudnn.allow_tf32 = False  # transformers' patch embedding is a Conv3d: no TF32 (model_peers.py)
    repeats = args.repeats or (2 if small else 3)
    transformers = import_transformers()

    model = qvl.from_config(preset, dtype=dtype, device=DEV, seed=0)
    spec = SMOKE_WORKLOAD if small else FULL_WORKLOAD
    work = build_workload(spec, model.cfg)
    inputs = {k: v.to(DEV) for k, v in work.inputs.items() if v is not None}
    batch = {**inputs, "labels": training_labels(inputs["input_ids"], model.cfg, inputs.get("attention_mask"))}
    clock, results = Clock(DEV), []

    def run(row) -> None:
        try:
            results.append(measure(row, batch, repeats, clock))
        except Exception as e:  # one implementation failing must not lose the others' rows
            results.append({"impl": row.name, "error": f"{type(e).__name__}: {e}"[:300]})
        print(json.dumps(results[-1]), flush=True)

    # qvl first (its eager loss is the reference), then transformers with the qvl model moved off the GPU.
    run(QvlRow(model, "eager", checkpointing=False))
    run(QvlRow(model, "eager", checkpointing=True))
    if CUDA:  # interpreted kernels (no GPU) are for checking results, not for timing
        run(QvlRow(model, "triton", checkpointing=True))
    with tempfile.TemporaryDirectory(dir=scratch_dir(model)) as directory:
        qvl.save_pretrained(model, directory, max_shard_bytes=4 * 2**30)
        model.to("cpu")
        if CUDA:
            torch.cuda.empty_cache()
        for liger in (False, True) if CUDA else (False,):  # Liger's kernels need a GPU
            try:
                row = TransformersRow(transformers, directory, dtype, model.cfg, liger)
            except Exception as e:
                results.append({"impl": "transformers + Liger" if liger else "transformers (SDPA)",
                                "error": f"{type(e).__name__}: {e}"[:300]})
                continue
            run(row)
            del row
            if CUDA:
                torch.cuda.empty_cache()
    write(results, args.out, preset, dtype, spec, repeats, transformers.__version__)
    return 0


def write(rows: list[dict], out: str, preset: str, dtype: torch.dtype, spec: WorkloadSpec, repeats: int,
          transformers_version: str) -> None:
    """train_peers.json (every figure) and train_peers.md (the table)."""
    device = torch.cuda.get_device_name() if CUDA else "cpu (triton interpreted)"
    image = "x".join(map(str, spec.images[0].size))
    meta = {"device": device, "torch": torch.__version__, "transformers": transformers_version, "preset": preset,
            "dtype": dtype_name(dtype), "date": time.strftime("%Y-%m-%d"), "repeats": repeats,
            "workload": f"one {image} image + {spec.prompt_tokens} text tokens, batch 1, one training step"}
    ref = next((r["loss"] for r in rows if r["impl"] == "qvl eager" and "loss" in r), None)
    for r in rows:
        if "loss" in r and ref:
            r["loss_rel_err"] = abs(r["loss"] - ref) / abs(ref)
    lines = [f"Device: {device}; torch {torch.__version__}; transformers {transformers_version}; {meta['date']}",
             f"{preset} preset, random weights in {meta['dtype']}; {meta['workload']}; median of {repeats} steps", "",
             "| impl | step ms | tokens/s | peak MiB | loss | loss rel err vs qvl eager |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['impl']} | failed: {r['error']} | | | | |")
            continue
        peak = "" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        err = f"{r['loss_rel_err']:.1e}" if "loss_rel_err" in r else ""
        lines.append(f"| {r['impl']} | {r['step_ms']:.1f} | {r['tokens_per_s']:.0f} | {peak} | {r['loss']:.4f} | "
                     f"{err} |")
    write_files(out, "train_peers", meta, rows, lines)


if __name__ == "__main__":
    sys.exit(main())
