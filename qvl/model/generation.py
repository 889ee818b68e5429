"""Generation: greedy or sampled continuation of a prepared prompt through the model's static KV cache."""

from __future__ import annotations

import torch

from .sampling import Sampler


@torch.no_grad()
def generate(model, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
             pixel_values_videos=None, video_grid_thw=None, second_per_grid_ts=None, *,
             max_new_tokens: int = 32, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, seed: int | None = None, eos_token_id=None,
             pad_token_id: int | None = None, on_token=None, cuda_graph: bool = False) -> torch.Tensor:
    """Greedy (temperature 0) or sampled continuation; returns ids (B, L + n) including the prompt.

    Rows that emit an EOS token are padded with `pad_token_id` (default: the config's pad, else the
    first EOS) and generation stops when every row has finished. `on_token(tokens)` is called with each
    new (B,) step, for streaming. cuda_graph: replay the decode step from a CUDA graph (`DecodeGraph`).
    """
    if max_new_tokens < 0:
        raise ValueError("max_new_tokens must be >= 0")
    if cuda_graph and model.device.type != "cuda":
        raise ValueError(f"generate: cuda_graph needs the model on a CUDA device; it is on {model.device}")
    sampler = Sampler(temperature, top_k, top_p, seed, model.device)
    prompt = model.prepare(input_ids, attention_mask, pixel_values, image_grid_thw, pixel_values_videos,
                          video_grid_thw, second_per_grid_ts)
    input_ids = input_ids.to(model.device)
    if max_new_tokens == 0:
        return input_ids
    eos = model.cfg.eos_token_id if eos_token_id is None else (
        (eos_token_id,) if isinstance(eos_token_id, int) else tuple(eos_token_id))
    pad_id = pad_token_id if pad_token_id is not None else (
        model.cfg.pad_token_id if model.cfg.pad_token_id is not None else (eos[0] if eos else 0))
    eos_t = torch.tensor(eos, dtype=torch.long, device=model.device)
    batch, length = input_ids.shape
    if length + max_new_tokens > model.cfg.text.max_position_embeddings:
        raise ValueError(f"prompt ({length}) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"max_position_embeddings ({model.cfg.text.max_position_embeddings})")
    cache = model.new_cache(batch, length + max_new_tokens)
    logits = model.prefill(prompt, cache)
    step_fn = model.decoder(prompt, cache, cuda_graph)
    finished = torch.zeros(batch, dtype=torch.bool, device=model.device)
    out = [input_ids]
    for step in range(max_new_tokens):
        tokens = sampler(logits)
        tokens = torch.where(finished, torch.full_like(tokens, pad_id), tokens)
        out.append(tokens[:, None])
        if on_token is not None:
            on_token(tokens)
        finished |= torch.isin(tokens, eos_t)
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        logits = step_fn(tokens)
    return torch.cat(out, dim=1)
