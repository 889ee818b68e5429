"""The prefill-graph pool: the prefill's device work captured once per (batch, prompt length, text only or not,
padded or not, cache bucket, plan, dtype, device) on the decode pool's static cache, replayed by later prompts of
that shape, dropped when the backend plan changes or the model moves.

On the CPU the stand-in for `torch.cuda.CUDAGraph` (tests/model/graph_standin.py) replays by calling the captured
prefill again with the very objects it was captured with: another prompt of the same shape gets its own tokens
only if its embeddings, positions and padding reach the prefill through the buffers the graph was captured on.
The checks of what capture needs (the same launches for every prompt of a shape, nothing read back) run on the
CPU too; the real capture and replay, and the 3b time to first token, on a GPU.
"""

import pytest
import torch

import qvl
from benchmarks.harness import median_seconds
from qvl.backends import Backend, OpImpl, get_backend, registry
from qvl.config import get_preset
from qvl.demo import demo_prompt
from qvl.errors import InputError
from qvl.model.graphs import PrefillGraphPool
from tests.backends.model_checks import padded_batch, perturbed
from tests.model.test_decode_graph import LaunchRecorder
from tests.ops.compare import rel_err

CUDA = torch.cuda.is_available()
BACKENDS = ["eager"] + ([] if get_backend("triton").unavailable_reasons() else ["triton"])


@pytest.fixture(scope="module")
def model():
    return perturbed("tiny", torch.float32)


def text_prompt(length: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(3, 1000, (1, length), generator=g)}


def image_moved(inputs: dict) -> dict:
    """The same ids, images and length with the leading text moved to the end: other 3-D positions, no padding."""
    ids = inputs["input_ids"]
    return {**inputs, "input_ids": torch.cat([ids[:, 5:], ids[:, :5]], 1)}


IMAGE = demo_prompt(get_preset("tiny"))
PROMPTS = {  # a prompt, and others of its shape that differ in what the graph reads from its buffers
    "text": (text_prompt(20, seed=1), text_prompt(20, seed=2)),  # the embeddings
    "image": (IMAGE, image_moved(IMAGE)),  # the 3-D positions
    "padded batch": (padded_batch(), {k: v.flip(0) for k, v in padded_batch().items()}),  # padding, positions
}
UNPADDED_BATCH = {"input_ids": torch.tensor([list(range(3, 15)), list(range(40, 52)), list(range(100, 112))])}


def generated(model, inputs, cuda_graph=False, **kwargs):
    """(tokens, the raw logits of the first new token) of a generate, greedy unless `kwargs` sample."""
    out = model.generate(**inputs, max_new_tokens=5, return_dict_in_generate=True, output_logits=True,
                         cuda_graph=cuda_graph, **kwargs)
    return out.sequences.tolist(), out.logits[0]


@pytest.mark.parametrize("kind", PROMPTS)
def test_later_calls_of_a_shape_replay_the_first_capture(model, captures, kind):
    model.clear_graphs()
    inputs = PROMPTS[kind][0]
    tokens, logits = generated(model, inputs)
    for _ in range(2):  # the second call captures nothing
        graphed_tokens, graphed_logits = generated(model, inputs, cuda_graph=True)
        assert graphed_tokens == tokens and torch.equal(graphed_logits, logits)
    assert len(captures) == 2 + (kind == "image")  # the prefill, the decode step, and the tower of the image prompt
    batch, length = inputs["input_ids"].shape
    [stats] = model.prefill_graphs.stats()
    assert stats["capture_seconds"] > 0
    assert {k: stats[k] for k in ("batch", "length", "uniform", "padded", "cache_len", "captured", "calls")} == {
        "batch": batch, "length": length, "uniform": kind != "image", "padded": kind == "padded batch",
        "cache_len": 256, "captured": True, "calls": 2}


@pytest.mark.parametrize("kind", PROMPTS)
def test_another_prompt_of_the_same_shape_gets_its_own_tokens(model, captures, kind):
    """Other ids, image placement or padding in the same shape: the pooled graph reads them from its buffers."""
    model.clear_graphs()
    plain = [generated(model, inputs) for inputs in PROMPTS[kind]]
    assert all(tokens != plain[0][0] for tokens, _ in plain[1:])  # the prompts differ where it shows
    for inputs, (tokens, logits) in zip(PROMPTS[kind], plain, strict=True):
        graphed_tokens, graphed_logits = generated(model, inputs, cuda_graph=True)
        assert graphed_tokens == tokens and torch.equal(graphed_logits, logits)
    assert [s["calls"] for s in model.prefill_graphs.stats()] == [len(PROMPTS[kind])]


def test_sampling_replays_the_prefill_too(model, captures):
    model.clear_graphs()
    inputs = PROMPTS["image"][0]
    sample = {"do_sample": True, "temperature": 1.0, "seed": 7}
    assert generated(model, inputs, cuda_graph=True, **sample)[0] == generated(model, inputs, **sample)[0]
    assert [s["calls"] for s in model.prefill_graphs.stats()] == [1]


def test_text_and_image_prompts_of_one_length_get_their_own_graphs(model, captures):
    """Equal position streams (text only) take other rotary kernels: the key tells them apart."""
    model.clear_graphs()
    image = PROMPTS["image"][0]
    text = text_prompt(image["input_ids"].shape[1], seed=3)
    for inputs in (image, text):
        assert generated(model, inputs, cuda_graph=True)[0] == generated(model, inputs)[0]
    assert [(s["length"], s["uniform"]) for s in model.prefill_graphs.stats()] == [
        (text["input_ids"].shape[1], False), (text["input_ids"].shape[1], True)]
    assert len(model.graphs) == 1  # both prefilled the one pooled decode cache of their shape


def test_padded_and_unpadded_batches_of_one_shape_get_their_own_graphs(model, captures):
    """An unpadded batch keeps the plain prefill's mask (no padding at all)."""
    model.clear_graphs()
    for inputs in (PROMPTS["padded batch"][0], UNPADDED_BATCH):
        assert generated(model, inputs, cuda_graph=True)[0] == generated(model, inputs)[0]
    assert [s["padded"] for s in model.prefill_graphs.stats()] == [True, False]


@pytest.fixture
def host_padding_attention(monkeypatch):
    """A backend whose attention and cache take no lengths on the device (as xformers': it reads the padding
    on the host), eager's implementations otherwise."""
    class HostLengths(OpImpl):
        def __init__(self, operator):
            self.operator, self.inner = operator, get_backend("eager").impls[operator]

        def __call__(self, *args, **kwargs):
            return self.inner(*args, **kwargs)

    backend = Backend("host-padding", {op: HostLengths(op) for op in ("attention", "cache")})
    monkeypatch.setitem(registry._BACKENDS, backend.name, backend)
    return backend.name


def test_a_padded_prefill_runs_plain_when_the_attention_reads_the_padding_on_the_host(host_padding_attention,
                                                                                      captures):
    """A graph would replay the padding it was captured with: such a plan's padded prefill is launched op by op
    into the pooled cache (the decode step still replays, its attention and cache routed to the fallback);
    unpadded prompts are captured."""
    model = perturbed("tiny", torch.float32)
    model.set_backends({"attention": host_padding_attention, "cache": host_padding_attention}, fallback="eager")
    for inputs in PROMPTS["padded batch"]:
        assert generated(model, inputs, cuda_graph=True)[0] == generated(model, inputs)[0]
    assert len(model.prefill_graphs) == 0 and len(model.graphs) == 1
    assert generated(model, UNPADDED_BATCH, cuda_graph=True)[0] == generated(model, UNPADDED_BATCH)[0]
    assert [s["padded"] for s in model.prefill_graphs.stats()] == [False]


def test_the_least_recently_used_entry_goes(model, captures):
    model.clear_graphs()
    pool = PrefillGraphPool(max_entries=2)
    for length in (10, 12, 10, 14):
        prompt = model.prepare(**text_prompt(length, seed=length))
        pool.logits(model, prompt, model.decode_cache(1, length + 4, cuda_graph=True))
    assert len(captures) == 3  # 10 replayed the second time
    assert [(s["length"], s["calls"]) for s in pool.stats()] == [(10, 2), (14, 1)]  # 12 was the least recent


def test_entries_go_with_the_decode_cache_they_write(model, captures):
    """A prefill graph writes its pooled decode cache: when the decode pool lets that cache go, the entry goes
    at the next graphed prefill (rather than filling a cache no decode step continues), and a cache from
    outside the pool is refused."""
    model.clear_graphs()
    inputs = PROMPTS["text"][0]
    model.generate(**inputs, max_new_tokens=2, cuda_graph=True)
    model.graphs.clear()
    model.generate(**PROMPTS["padded batch"][0], max_new_tokens=2, cuda_graph=True)
    assert [s["batch"] for s in model.prefill_graphs.stats()] == [3]
    assert generated(model, inputs, cuda_graph=True)[0] == generated(model, inputs)[0]  # captured anew
    prompt = model.prepare(**inputs)
    with pytest.raises(ValueError, match=r"needs the pooled cache of decode_cache\(..., cuda_graph=True\)"):
        model.prefill(prompt, model.new_cache(1, 30), cuda_graph=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_prefill_device_work_launches_the_same_for_every_prompt_of_a_shape(backend):
    """A graph replays the launches it captured: `prefill_logits` on two prompts of one shape (other padding,
    positions and embeddings) must launch the same ops and kernels with the same non-tensor arguments and tensor
    layouts, and read nothing back to the host."""
    model = perturbed("tiny", torch.float32)
    model.set_backends(backend)
    recorders = []
    for inputs in PROMPTS["padded batch"]:
        prompt = model.prepare(**inputs)
        cache = model.new_cache(3, prompt.embeds.shape[1] + 2)
        with LaunchRecorder().counting() as rec:
            model.prefill_logits(prompt.embeds, prompt.positions, prompt.pad, prompt.uniform, cache)
        recorders.append(rec)
    first, other = recorders
    assert first.launches == other.launches and first.launches
    assert not first.host_reads and not other.host_reads


@pytest.mark.skipif(CUDA, reason="the refusal on a machine without CUDA")
def test_cuda_graph_needs_a_cuda_device():
    model = qvl.from_config("tiny")
    prompt = model.prepare(**PROMPTS["text"][0])
    with pytest.raises(InputError, match="prefill: cuda_graph=True: CUDA graphs need the model on a CUDA device"):
        model.prefill(prompt, model.new_cache(1, 30), cuda_graph=True)
    assert len(model.prefill_graphs) == 0


# --- on a GPU -------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA GPU")
@pytest.mark.parametrize("spec", ["eager", "triton"])
@pytest.mark.parametrize("kind", PROMPTS)
def test_prefill_replayed_from_a_cuda_graph_matches_plain_generation(spec, kind):
    """Captured by the first prompt, replayed for it and for another of its shape: the plain path's tokens and
    first-step logits (the same kernels on the same inputs; the padding a zero tensor where there is none)."""
    reasons = get_backend(spec).unavailable_reasons()
    if reasons:
        pytest.skip(f"{spec} unavailable: {reasons}")
    model = perturbed("tiny", torch.float32)
    model.set_backends(spec, fallback="eager")
    prompts = (*PROMPTS[kind], PROMPTS[kind][0])
    for inputs in prompts:
        tokens, logits = generated(model, inputs)
        graphed_tokens, graphed_logits = generated(model, inputs, cuda_graph=True)
        assert graphed_tokens == tokens
        assert rel_err(graphed_logits, logits) <= 1e-5
    assert [s["calls"] for s in model.prefill_graphs.stats()] == [len(prompts)]


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA GPU")
@pytest.mark.xdist_group("3b")
def test_3b_bf16_triton_time_to_first_token():
    """Issue 23's workload (one 448x448 image, 32 x 32 patches, and 256 text tokens, batch 1): generate's first
    token plain and with cuda_graph (vision tower and prefill replayed), printed; the first-step logits agree to
    bf16 rounding (target: <= 15 ms replayed)."""
    model = perturbed("3b", torch.bfloat16)
    model.set_backends("triton", fallback="eager")
    cfg = model.cfg
    g = torch.Generator().manual_seed(0)
    ids = [*torch.randint(3, 1000, (256,), generator=g).tolist(), cfg.vision_start_token_id,
           *[cfg.image_token_id] * 256, cfg.vision_end_token_id]
    inputs = {"input_ids": torch.tensor([ids]), "image_grid_thw": torch.tensor([[1, 32, 32]]),
              "pixel_values": torch.randn(1024, cfg.vision.patch_dim, generator=g).to(torch.bfloat16).cuda()}

    def first(cuda_graph):
        out = model.generate(**inputs, max_new_tokens=1, return_dict_in_generate=True, output_logits=True,
                             cuda_graph=cuda_graph)
        return out.logits[0]

    plain, graphed = first(False), first(True)
    assert rel_err(graphed, plain) <= 1e-2
    plain_ms = median_seconds(lambda: first(False), reps=20) * 1e3
    graph_ms = median_seconds(lambda: first(True), reps=20) * 1e3
    capture_ms = model.prefill_graphs.stats()[0]["capture_seconds"] * 1e3
    print(f"\n3b bf16 triton TTFT, one 448x448 image + 256 text tokens: plain {plain_ms:.2f} ms, graphed "
          f"{graph_ms:.2f} ms (prefill capture {capture_ms:.0f} ms)")
    assert graph_ms < plain_ms
