"""End to end: vision tower, prefill (time to first token), one decode step, decode tokens/s."""

import pytest
import torch

import qvl
from benchmarks import harness
from qvl.demo import demo_prompt
from qvl.model.graphs import DecodeGraph

PRESET = "3b" if harness.FULL else "tiny"
DT = torch.bfloat16 if harness.CUDA else torch.float32
# Whole-model specs; calls a backend cannot run (xformers has no GELU for the merger) go to eager, as in ablations.
BACKENDS = harness.model_specs()


@pytest.fixture(scope="module")
def model():
    return qvl.from_config(PRESET, dtype=DT, device=harness.DEVICE, seed=0).requires_grad_(False)  # inference


def weight_bytes(model):
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if not n.startswith("visual."))


@pytest.mark.parametrize("backend", BACKENDS)
def test_vision_tower(measure, model, backend):
    model.set_backends(backend, fallback="eager")
    inputs = demo_prompt(model.cfg)
    measure(lambda: model.vision_features(inputs["pixel_values"], inputs["image_grid_thw"]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_prefill(measure, model, backend):
    model.set_backends(backend, fallback="eager")
    inputs = demo_prompt(model.cfg)
    cache = model.new_cache(1, inputs["input_ids"].shape[1] + 8)

    def prefill():
        return model.prefill(model.prepare(**inputs), cache)

    measure(prefill)


def decode_step_at_fixed_slot(model, backend, cuda_graph):
    """A decode step after the demo prompt's prefill, always at the same cache slot: a fixed-size workload."""
    model.set_backends(backend, fallback="eager")
    inputs = demo_prompt(model.cfg)
    prompt = model.prepare(**inputs)
    cache = model.new_cache(1, inputs["input_ids"].shape[1] + 64)
    model.prefill(prompt, cache)
    start = cache.length
    token = torch.zeros(1, dtype=torch.long, device=harness.DEVICE)
    decode = DecodeGraph(model, prompt, cache).step if cuda_graph else (
        lambda t: model.decode_step(t, prompt, cache))

    def step():
        cache.length = start
        return decode(token)

    return step


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_step(measure, model, backend):
    """One token at batch 1 reads every decoder weight once: bandwidth = weight bytes / step time."""
    measure(decode_step_at_fixed_slot(model, backend, cuda_graph=False), nbytes=weight_bytes(model))


@pytest.mark.skipif(not harness.CUDA, reason="CUDA graphs need a CUDA GPU")
@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_step_cuda_graph(measure, model, backend):
    """The same step replayed from a CUDA graph: no per-launch host cost, so the kernels' own time shows."""
    measure(decode_step_at_fixed_slot(model, backend, cuda_graph=True), nbytes=weight_bytes(model))


# The training step on the CPU: eager only (the interpreted triton backward of the whole model takes minutes a
# step); on a GPU every whole-model spec, each with and without gradient checkpointing.
TRAIN = [(spec, ckpt) for spec in (BACKENDS if harness.FULL else ["eager"]) for ckpt in (False, True)]


@pytest.fixture(scope="module")
def train_model():
    return qvl.from_config(PRESET, dtype=DT, device=harness.DEVICE, seed=0).train()


@pytest.mark.parametrize("backend, checkpointing", TRAIN,
                         ids=[f"{spec}{'-checkpointing' if ckpt else ''}" for spec, ckpt in TRAIN])
def test_train_step(measure, train_model, backend, checkpointing):
    """Forward with labels + backward through the whole model on the demo prompt (every token counted)."""
    model = train_model
    model.set_backends(backend, fallback="eager")
    model.set_gradient_checkpointing(checkpointing)
    inputs = demo_prompt(model.cfg)
    labels = inputs["input_ids"]

    def step():
        model.zero_grad(set_to_none=True)
        model(**inputs, labels=labels).loss.backward()

    measure(step)
