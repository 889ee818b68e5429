"""Training: labels -> loss, and gradients through the whole model, against transformers and across backends.

The batch has two images, a video and a left-padded row, with labels ignoring the padding and the vision
placeholders, as a fine-tuning collator writes them. qvl eager must match transformers' loss and every
parameter's gradient (float32, relative error <= 1e-4); the triton backend (interpreted on a CPU) must match
eager within 1e-3, with and without gradient checkpointing.
"""

import pytest
import torch

import qvl
from qvl.backends import IGNORE_INDEX, get_backend
from qvl.checkpoint import canonical_key, checkpoint_sources
from qvl.config import PRESETS
from tests.backends.model_checks import perturbed
from tests.model.test_parity import CONFIGS, hf_kwargs, left_pad, perturbed_hf_model, pixels, placeholders, text_ids
from tests.ops.compare import rel_err

TINY = PRESETS["tiny"]
IMAGES = [[1, 4, 6], [1, 6, 4]]
# The parity tests' video: 0.75 s per grid puts its temporal positions where transformers' rule and the
# released one agree.
VIDEO = [[3, 6, 8]]


# The same kinds of input, smaller, for the triton backend: it runs through the Triton interpreter here, whose
# time grows with every program a kernel launches.
SMALL_IMAGES, SMALL_VIDEO = [[1, 4, 4], [1, 2, 4]], [[2, 4, 4]]


def training_batch(cfg=TINY, images=IMAGES, video=VIDEO) -> dict:
    """Row 0: text, an image, text, the video, text. Row 1: text, the second image, text, left-padded."""
    rows = [text_ids(4, 40) + placeholders(cfg, cfg.image_token_id, images[0]) + text_ids(3, 41)
            + placeholders(cfg, cfg.video_token_id, video[0]) + text_ids(5, 42),
            text_ids(6, 43) + placeholders(cfg, cfg.image_token_id, images[1]) + text_ids(4, 44)]
    ids, mask = left_pad(rows, cfg.pad_token_id)
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    # A row's first token has no predecessor: the last padding position would be scored on it, and padding
    # positions carry no meaning (the two models fill them differently).
    labels[torch.arange(len(rows)), (mask == 0).sum(1)] = IGNORE_INDEX
    for token in (cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id):
        labels = labels.masked_fill(ids == token, IGNORE_INDEX)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "pixel_values": pixels(images, 45),
            "image_grid_thw": torch.tensor(images), "pixel_values_videos": pixels(video, 46),
            "video_grid_thw": torch.tensor(video), "second_per_grid_ts": torch.tensor([0.75])}


def loss_and_grads(model, batch, **extra) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(**batch, **extra)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def hf_grads_as_qvl(model, hf) -> dict[str, torch.Tensor]:
    """transformers' parameter gradients in qvl's layout (q/k/v and gate/up stacked as qvl stores them)."""
    flat = {canonical_key(name): p.grad for name, p in hf.named_parameters()}
    return {name: torch.cat([flat[key] for key, _ in sources])
            for name, sources in checkpoint_sources(model).items()}


def assert_grads_match(grads: dict, ref: dict, tol: float) -> None:
    worst = {}
    for name, g in ref.items():
        assert g is not None, f"{name}: the reference has no gradient"
        assert grads[name] is not None, f"{name}: no gradient"
        worst[name] = rel_err(grads[name], g)
    name = max(worst, key=worst.get)
    assert worst[name] <= tol, f"worst gradient {name}: relative error {worst[name]:.2e} > {tol:.0e}"


@pytest.fixture(scope="module", params=["tiny", "tiny_wide"])
def hf_pair(request, tmp_path_factory):
    """transformers' model and qvl's on the same weights: the tiny preset (tied LM head) and a wider shape with
    an LM head of its own (the parity tests' TINY_WIDE)."""
    transformers = pytest.importorskip("transformers")  # noqa: F841  (perturbed_hf_model imports it)
    cfg = CONFIGS[request.param]
    hf = perturbed_hf_model(cfg)
    path = tmp_path_factory.mktemp(f"train-{request.param}")
    hf.save_pretrained(path)
    return cfg, hf, qvl.from_pretrained(path, dtype=torch.float32)


@pytest.mark.parametrize("num_items_in_batch", [None, 23])
def test_loss_and_every_gradient_match_transformers(hf_pair, num_items_in_batch):
    cfg, hf, model = hf_pair
    batch = training_batch(cfg)
    extra = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
    hf.zero_grad(set_to_none=True)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    ref = hf(**hf_kwargs(cfg, **inputs), labels=batch["labels"], **extra).loss
    ref.backward()
    loss, grads = loss_and_grads(model, batch, **extra)
    assert rel_err(loss, ref.detach()) <= 1e-4
    assert_grads_match(grads, hf_grads_as_qvl(model, hf), 1e-4)


def test_logits_come_with_the_eager_loss_and_match_the_forward_without_labels():
    model = perturbed("tiny", torch.float32)
    batch = training_batch()
    out = model(**batch)
    with torch.no_grad():
        plain = model(**{k: v for k, v in batch.items() if k != "labels"})
    assert plain.loss is None and out.loss.dim() == 0 and out.loss.dtype == torch.float32
    torch.testing.assert_close(out.logits.detach(), plain.logits)
    assert torch.equal(out.rope_deltas, plain.rope_deltas)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = perturbed("tiny", torch.float32).train()
    batch = training_batch()
    loss, grads = loss_and_grads(model, batch)
    grads = {n: g.clone() for n, g in grads.items()}
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    loss_ckpt, grads_ckpt = loss_and_grads(model, batch)
    assert torch.equal(loss, loss_ckpt)
    assert_grads_match(grads_ckpt, grads, 1e-6)
    model.gradient_checkpointing_disable()
    assert not model.is_gradient_checkpointing


def test_trained_weights_are_saved_and_generation_records_no_gradients(tmp_path):
    model = perturbed("tiny", torch.float32).train()
    batch = training_batch()
    adamw_losses(model, batch, steps=1)
    qvl.save_pretrained(model, tmp_path)
    loaded = qvl.from_pretrained(tmp_path)
    trained = dict(model.named_parameters())
    assert all(torch.equal(p, trained[name]) for name, p in loaded.named_parameters())
    model.zero_grad(set_to_none=True)
    ids = model.generate(torch.tensor([text_ids(8, 60)]), max_new_tokens=2)
    assert not ids.requires_grad and all(p.grad is None for p in model.parameters())


def test_all_ignored_labels_give_zero_loss_and_zero_gradients():
    model = perturbed("tiny", torch.float32)
    batch = training_batch() | {"labels": torch.full_like(training_batch()["labels"], IGNORE_INDEX)}
    loss, grads = loss_and_grads(model, batch)
    assert loss.item() == 0.0
    assert all(g is None or not g.any() for g in grads.values())


def test_bad_labels_say_what_and_where():
    model = perturbed("tiny", torch.float32)
    batch = training_batch()
    labels = batch["labels"]
    with pytest.raises(ValueError, match=r"labels must have the shape of input_ids \(2, \d+\), got \(2, \d+\)"):
        model(**batch | {"labels": labels[:, 1:]})
    with pytest.raises(ValueError, match=r"labels must be a \(batch, length\) integer tensor, got \(2, \d+\) "
                                         "torch.float32"):
        model(**batch | {"labels": labels.float()})
    bad = labels.clone()
    bad[1, 30] = TINY.text.vocab_size
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 1024\).*: 1024 at batch row 1, position 30"):
        model(**batch | {"labels": bad})
    bad[1, 30] = -5
    with pytest.raises(ValueError, match=r"-5 at batch row 1, position 30"):
        model(**batch | {"labels": bad})
    with pytest.raises(ValueError, match=r"loss: divisor must be > 0, got 0"):
        model(**batch, num_items_in_batch=0)


# --- the triton backend (interpreted on a CPU) against eager --------------------------------------------------

triton_reasons = get_backend("triton").unavailable_reasons()
needs_triton = pytest.mark.skipif(bool(triton_reasons), reason=f"triton backend unavailable: {triton_reasons}")


@needs_triton
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_triton_loss_and_every_gradient_match_eager(checkpointing):
    model = perturbed("tiny", torch.float32).train()
    batch = training_batch(images=SMALL_IMAGES, video=SMALL_VIDEO)
    ref_loss, ref_grads = loss_and_grads(model, batch)
    ref_grads = {n: g.clone() for n, g in ref_grads.items()}
    if checkpointing:
        model.gradient_checkpointing_enable()
    model.set_backends("triton")  # strict: every operator, forward and backward, on triton
    loss, grads = loss_and_grads(model, batch)
    assert not model.fallbacks
    assert rel_err(loss, ref_loss) <= 1e-3
    assert_grads_match(grads, ref_grads, 1e-3)


def adamw_losses(model, batch, steps: int) -> list[float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@needs_triton
def test_twenty_adamw_steps_lower_the_loss_alike_on_eager_and_triton():
    # One text layer, one vision block of each kind (windowed, full): the tiny preset made cheaper to step
    # twenty times through the interpreter.
    cfg = TINY.with_overrides({"text.num_hidden_layers": 1, "vision.depth": 2, "vision.fullatt_block_indexes": [1]})
    grid = [[1, 2, 4]]
    ids = torch.tensor([text_ids(4, 50) + placeholders(cfg, cfg.image_token_id, grid[0]) + text_ids(6, 51)])
    batch = {"input_ids": ids, "pixel_values": pixels(grid, 52), "image_grid_thw": torch.tensor(grid),
             "labels": ids.masked_fill(ids == cfg.image_token_id, IGNORE_INDEX)}
    curves = {}
    for backend in ("eager", "triton"):
        model = qvl.from_config(cfg, seed=0, backends=backend).train()
        curves[backend] = adamw_losses(model, batch, steps=20)
    eager, triton = torch.tensor(curves["eager"]), torch.tensor(curves["triton"])
    assert eager[-5:].mean() < 0.8 * eager[:5].mean(), curves["eager"]
    assert ((triton - eager).abs() / eager).max() <= 1e-3, curves
