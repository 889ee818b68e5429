"""The demo: the tiny model on an image-plus-text prompt, through each available backend mix.

Until the ablation runner exists this is the main job: it shows the registry at work and how far each
mix is from the eager reference.
"""

from __future__ import annotations

import time

import torch

from .backends import OPERATORS, all_backends
from .checkpoint import from_config
from .config import get_preset


def demo_prompt(cfg, seed: int = 0):
    """A prompt with two images of different sizes between text, as the processor would lay it out."""
    g = torch.Generator().manual_seed(seed)
    grids = torch.tensor([[1, 8, 12], [1, 6, 6]])
    merge2 = cfg.vision.spatial_merge_size**2
    ids = torch.randint(0, min(1000, cfg.text.vocab_size), (5,), generator=g).tolist()
    for t, h, w in grids.tolist():
        ids += [cfg.vision_start_token_id] + [cfg.image_token_id] * (t * h * w // merge2) + [cfg.vision_end_token_id]
        ids += torch.randint(0, min(1000, cfg.text.vocab_size), (4,), generator=g).tolist()
    pixels = torch.randn(int(grids.prod(-1).sum()), cfg.vision.patch_dim, generator=g)
    return {"input_ids": torch.tensor([ids]), "pixel_values": pixels, "image_grid_thw": grids}


def backend_mixes() -> list[tuple[str, dict[str, str]]]:
    """eager; every other usable backend for all operators (where it has them all); each alone per operator."""
    mixes = [("eager", {op: "eager" for op in OPERATORS})]
    for backend in all_backends():
        if backend.name == "eager" or backend.unavailable_reasons():
            continue
        if backend.covers_all_operators:  # a partial backend (triton-gemm) only per operator
            mixes.append((f"all {backend.name}", {op: backend.name for op in OPERATORS}))
        for op in OPERATORS:
            if op in backend.impls:
                mixes.append((f"{op}={backend.name}", {op: backend.name}))
    return mixes


def run_demo(preset: str = "tiny", new_tokens: int = 8, device: str = "cpu", seed: int = 0) -> list[dict]:
    from .ablate.config import WorkloadSpec, check_key
    from .ablate.runner import resolve_device
    from .model.generation import check_length

    cfg = get_preset(preset)
    check_key(WorkloadSpec, "decode_tokens", new_tokens, "new_tokens")  # the demo decodes as an ablation does
    inputs = demo_prompt(cfg, seed)
    # new tokens past the model's positions: one usage error now, not the same failure in every mix
    check_length(inputs["input_ids"].shape[1], new_tokens, cfg.text.max_position_embeddings)
    model = from_config(cfg, device=resolve_device(device), seed=seed)
    ref_logits = ref_tokens = None
    rows = []
    for name, spec in backend_mixes():
        row = {"mix": name}
        try:
            model.set_backends(spec, fallback="eager")
            start = time.perf_counter()
            with torch.no_grad():
                logits = model(**inputs).logits
            row["forward_ms"] = (time.perf_counter() - start) * 1e3
            start = time.perf_counter()
            tokens = model.generate(**inputs, max_new_tokens=new_tokens)[:, inputs["input_ids"].shape[1]:]
            row["tok_per_s"] = tokens.numel() / (time.perf_counter() - start)
            if ref_logits is None:
                ref_logits, ref_tokens = logits, tokens
            row["rel_err"] = ((logits - ref_logits).norm() / ref_logits.norm()).item()
            row["tokens_agree"] = (tokens == ref_tokens).float().mean().item()
            row["fallbacks"] = len({(f.operator, f.used) for f in model.fallbacks})
        except Exception as e:  # one failing mix must not hide the others
            row["error"] = f"{type(e).__name__}: {e}"
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    header = f"{'backend mix':<22} {'forward ms':>10} {'tok/s':>8} {'rel err':>9} {'tokens':>7} {'fallbacks':>9}"
    lines = [header, "-" * len(header)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['mix']:<22} failed: {r['error']}")
        else:
            lines.append(f"{r['mix']:<22} {r['forward_ms']:>10.1f} {r['tok_per_s']:>8.1f} {r['rel_err']:>9.2e} "
                         f"{r['tokens_agree']:>7.0%} {r['fallbacks']:>9}")
    return "\n".join(lines)
