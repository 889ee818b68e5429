"""`qvl ablate` with no config: a default that fits the machine.

CPU: the tiny preset, eager (the reference) against the Triton kernels (interpreted) and xformers when it
is available here. GPU: the 3b preset in bfloat16 with every backend mix `qvl demo` knows, and all eager
and all triton with decode steps replayed from a CUDA graph, against eager in float32 on the same weights.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..backends import OPERATORS, all_backends, backend_names, get_backend
from .config import AblationConfig, ImageSpec, ModelSpec, RunSpec, Variant, WorkloadSpec


def _variant(name: str, mapping: dict[str, str], fallback: str | None) -> Variant:
    full = {op: "eager" for op in OPERATORS}
    full.update(mapping)
    spec = (next(iter(mapping.values())) if len(set(mapping.values())) == 1 and len(mapping) == len(OPERATORS)
            else ",".join(f"{op}={b}" for op, b in mapping.items()))
    return Variant(name=name, backends=full, spec=spec, fallback=fallback)


def default_config(device: str = "auto") -> AblationConfig:
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if not cuda:
        variants = [_variant("eager", {op: "eager" for op in OPERATORS}, None),
                    # always listed: until the kernels land (or without triton) it is recorded as failed
                    _variant("triton", {op: "triton" for op in OPERATORS}, "eager")]
        if "xformers" in backend_names() and not get_backend("xformers").unavailable_reasons():
            variants.append(_variant("xformers", {op: "xformers" for op in OPERATORS}, "eager"))
        return AblationConfig(
            name="default_cpu", reference="eager",
            description="The tiny preset on the CPU: eager against the Triton kernels (interpreted) "
                        "and xformers when available.",
            model=ModelSpec(preset="tiny", dtype="float32", device="cpu" if device == "auto" else device),
            workload=WorkloadSpec(images=(ImageSpec(size=(112, 168)),), prompt_tokens=16, decode_tokens=8),
            run=RunSpec(warmup=1, repeats=3, fallback="eager"), variants=tuple(variants))
    from ..demo import backend_mixes

    # The reference is eager in float32 on the same weights: bf16 rounding alone, amplified through 36 random
    # layers, moves the logits by a few percent whichever backend rounds, and eager bf16's own error against
    # float32 is the yardstick for every other bf16 variant.
    reference = replace(_variant("eager float32", {op: "eager" for op in OPERATORS}, None), dtype="float32")
    variants, usable = [reference], {b.name for b in all_backends() if not b.unavailable_reasons()}
    for name, mapping in backend_mixes():
        if all(b in usable for b in mapping.values()):
            variants.append(_variant(name, mapping, "eager"))
    # At batch 1 decoding is bound by launching kernels: the same backends with the step replayed from a graph.
    for name in ("eager", "triton"):
        if name in usable:
            variants.append(replace(_variant(f"{name}, CUDA graph", {op: name for op in OPERATORS}, "eager"),
                                    cuda_graph=True))
    return AblationConfig(
        name="default_gpu", reference=reference.name,
        description="The 3b preset (random weights) in bfloat16 on the GPU through every backend mix, against "
                    "eager in float32 on the same weights.",
        model=ModelSpec(preset="3b", dtype="bfloat16", device="cuda" if device == "auto" else device),
        workload=WorkloadSpec(images=(ImageSpec(size=(448, 448)),), prompt_tokens=256, decode_tokens=64),
        run=RunSpec(warmup=1, repeats=10, fallback="eager"), variants=tuple(variants))


__all__ = ["default_config"]
