"""What tests/parallel/test_runtime.py runs on each tensor-parallel rank, and again in one process as the reference.

`run_cases(model)` returns every figure the tests compare, by name: logits (text, images, a video, a cache
continuation), greedy tokens, gathered attention weights, vision features of an odd number of images, the loss and
every gradient of a training step. Each rank writes its figures to a safetensors file (`rank_worker`).
"""

from __future__ import annotations

import os

import torch

import qvl
from qvl.backends import IGNORE_INDEX
from qvl.config import PRESETS
from tests.model.graph_standin import replayed_on_cpu
from tests.model.prompts import left_pad, pixels, placeholders, text_ids

TINY = PRESETS["tiny"]  # 4 query heads, 2 KV heads: tp 2 splits both; 2 vision heads
CONFIGS = {
    "kv2": TINY,
    # 1 KV head, replicated over both ranks; an untied LM head (its own vocabulary-parallel weight)
    "kv1": TINY.with_overrides({"text.num_key_value_heads": 1, "text.tie_word_embeddings": False}),
}
# how each config's vision tower runs at tp 2: data-parallel (the default) or split like the decoder
VISION = {"kv2": "data", "kv1": "tensor"}
IMAGES = [[1, 4, 6], [1, 6, 4], [1, 4, 4]]  # three: two ranks encode an odd number of images
VIDEO = [[2, 4, 4]]
NEW_TOKENS = 6


def perturbed(cfg, seed: int = 0):
    """A tp-1 model whose every weight (norms and biases too) is random: slicing mistakes cannot hide behind ones
    and zeros; large enough that greedy tokens vary."""
    model = qvl.from_config(cfg, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * (0.2 if p.dim() == 1 else 0.1))
    return model


def _image_rows(cfg):
    rows = [text_ids(3, 1) + placeholders(cfg, cfg.image_token_id, IMAGES[0]) + text_ids(4, 2),
            text_ids(6, 3) + placeholders(cfg, cfg.image_token_id, IMAGES[1]) + text_ids(2, 4)
            + placeholders(cfg, cfg.image_token_id, IMAGES[2]) + text_ids(3, 5)]
    ids, mask = left_pad(rows, cfg.pad_token_id)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels(IMAGES, 6),
            "image_grid_thw": torch.tensor(IMAGES)}


def _video_row(cfg):
    ids = torch.tensor([text_ids(4, 7) + placeholders(cfg, cfg.video_token_id, VIDEO[0]) + text_ids(5, 8)])
    return {"input_ids": ids, "pixel_values_videos": pixels(VIDEO, 9), "video_grid_thw": torch.tensor(VIDEO),
            "second_per_grid_ts": torch.tensor([0.75])}


def training_batch(cfg) -> dict:
    batch = _image_rows(cfg)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    labels = ids.masked_fill((mask == 0) | (ids == cfg.image_token_id), IGNORE_INDEX)
    return {**batch, "labels": labels}


def run_cases(model) -> dict[str, torch.Tensor]:
    cfg, out = model.cfg, {}
    text_ids_, text_mask = left_pad([text_ids(11, 10), text_ids(7, 11)], cfg.pad_token_id)
    images, video = _image_rows(cfg), _video_row(cfg)
    with torch.no_grad():
        out["logits/text"] = model(text_ids_, attention_mask=text_mask).logits
        out["logits/images"] = model(**images).logits
        out["logits/video"] = model(**video).logits
        out["features/images"] = torch.cat(model.get_image_features(images["pixel_values"], images["image_grid_thw"]))
        out["attentions/text"] = torch.stack(model(text_ids_, attention_mask=text_mask,
                                                   output_attentions=True).attentions)
        if cfg == CONFIGS["kv1"]:  # the registry's kernels on a rank's local heads (interpreted on a CPU: once)
            out["logits/text-triton"] = model.set_backends("triton")(text_ids_, attention_mask=text_mask).logits
            model.set_backends("eager")
        # a cache continuation: the prompt with its images, then three more tokens against the cache
        first = model(**images, use_cache=True)
        more = torch.tensor([text_ids(3, 12), text_ids(3, 13)])
        mask = torch.cat([images["attention_mask"], torch.ones_like(more)], 1)
        out["logits/continued"] = model(more, attention_mask=mask, past_key_values=first.past_key_values).logits
        out["tokens/greedy"] = model.generate(**images, max_new_tokens=NEW_TOKENS)
        with replayed_on_cpu() as captured:  # the CUDA-graph path (vision tower, prefill, decode step), run twice
            for _ in range(2):
                out["tokens/graphed"] = model.generate(**images, max_new_tokens=NEW_TOKENS, cuda_graph=True)
        out["graph_captures"] = torch.tensor(len(captured))
        out["tokens/video"] = model.generate(**video, max_new_tokens=NEW_TOKENS)
        out["tokens/beams"] = model.generate(**images, max_new_tokens=NEW_TOKENS, num_beams=2, num_return_sequences=2)
        # no seed: the ranks must still draw the same tokens (they agree on one)
        out["tokens/sampled"] = model.generate(**images, max_new_tokens=NEW_TOKENS, do_sample=True, temperature=1.0)
    model.train()
    for checkpointing, prefix in ((False, "grad"), (True, "checkpointed_grad")):
        model.set_gradient_checkpointing(checkpointing)  # recomputation repeats the layers' collectives
        model.zero_grad(set_to_none=True)
        loss = model(**training_batch(cfg)).loss
        loss.backward()
        out[f"{prefix}/loss"] = loss.detach()
        out.update({f"{prefix}/{name}": p.grad for name, p in model.named_parameters()})
    model.set_gradient_checkpointing(False)
    model.eval()
    out.update({f"param/{name}": p.detach() for name, p in model.named_parameters()})
    return out


def rank_worker(checkpoint: str, results: str) -> None:
    """One rank: load each config's checkpoint with tp = WORLD_SIZE, run the cases, write this rank's figures."""
    from safetensors.torch import save_file

    tp, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    for name in CONFIGS:
        model = qvl.from_pretrained(os.path.join(checkpoint, name), tp=tp, vision_parallel=VISION[name])
        figures = {k: v.contiguous() for k, v in run_cases(model).items()}
        try:
            qvl.save_pretrained(model, os.path.join(results, "piece"))
            figures["save_refused"] = torch.tensor(False)
        except qvl.ConfigError:
            figures["save_refused"] = torch.tensor(True)
        drawn = qvl.from_config(CONFIGS[name], tp=tp, seed=3, vision_parallel=VISION[name])
        figures.update({f"from_config/{k}": v.detach().contiguous() for k, v in drawn.named_parameters()})
        save_file(figures, os.path.join(results, f"{name}.rank{rank}.safetensors"))
