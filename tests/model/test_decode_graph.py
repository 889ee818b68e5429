"""The decode step with its length held on the device (what CUDA-graph capture needs), and `DecodeGraph`.

On the CPU: the device-length step gives the eager and triton backends' own results, token for token; it
launches the same work with the same arguments at every length and reads nothing back to the host (what makes
replaying a captured graph valid); backends that cannot take device lengths are routed or refused with the
reason. On a GPU: generation replayed from a captured graph against plain generation.
"""

import pytest
import torch

import qvl
from qvl.backends import Backend, BackendUnsupportedError, OpImpl, get_backend, registry
from qvl.demo import demo_prompt
from qvl.launches import LaunchCounter
from qvl.model.graphs import DecodeGraph
from tests.backends.model_checks import padded_batch, perturbed
from tests.ops.compare import rel_err

CUDA = torch.cuda.is_available()
BACKENDS = ["eager"] + ([] if get_backend("triton").unavailable_reasons() else ["triton"])


def decode_logits(model, prompt, steps, on_device: bool):
    """Greedy decode from the prefill of a prepared prompt; the logits of every step, (steps, B, vocab)."""
    batch, length = prompt.embeds.shape[:2]
    cache = model.new_cache(batch, length + steps)
    logits = model.prefill(prompt, cache)
    length = torch.zeros((), dtype=torch.long, device=model.device)
    out = []
    for _ in range(steps):
        tokens = logits.argmax(-1)
        if on_device:
            length.fill_(cache.length)
            logits = model.decode_step(tokens, prompt, cache, length=length)
            cache.length += 1
        else:
            logits = model.decode_step(tokens, prompt, cache)
        out.append(logits.float())
    return torch.stack(out)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("inputs", ["image", "padded batch"])
def test_length_on_device_decodes_as_the_length_in_python(backend, inputs):
    model = perturbed("tiny", torch.float32)
    model.set_backends(backend)  # strict: every call on the backend, none routed elsewhere
    prompt = model.prepare(**(demo_prompt(model.cfg) if inputs == "image" else padded_batch()))  # vision tower once
    plain = decode_logits(model, prompt, 6, on_device=False)
    on_device = decode_logits(model, prompt, 6, on_device=True)
    assert not model.fallbacks
    assert rel_err(on_device, plain) <= 1e-5
    assert torch.equal(on_device.argmax(-1), plain.argmax(-1))


class _HostLengthsOnly(OpImpl):
    """Eager's implementation, without the device_lengths declaration (as xformers' attention and cache)."""

    def __init__(self, operator):
        self.operator = operator
        self.inner = get_backend("eager").impls[operator]

    def __call__(self, *args, **kwargs):
        return self.inner(*args, **kwargs)


@pytest.fixture
def host_lengths_only(monkeypatch):
    backend = Backend("host-lengths", {op: _HostLengthsOnly(op) for op in ("attention", "cache")})
    monkeypatch.setitem(registry._BACKENDS, backend.name, backend)
    return backend.name


def test_a_backend_without_device_lengths_is_routed_or_refused_with_the_reason(host_lengths_only):
    model = perturbed("tiny", torch.float32)
    prompt = model.prepare(**demo_prompt(model.cfg))
    model.set_backends({"attention": host_lengths_only, "cache": host_lengths_only}, fallback="eager")
    decode_logits(model, prompt, 2, on_device=False)
    assert not model.fallbacks  # lengths in Python: the backend runs everything
    decode_logits(model, prompt, 2, on_device=True)
    assert {fb.operator for fb in model.fallbacks} == {"attention", "cache"}
    assert all("lengths held on the device" in r for fb in model.fallbacks for r in fb.reasons)
    model.set_backends({"attention": host_lengths_only, "cache": host_lengths_only})
    with pytest.raises(BackendUnsupportedError, match="lengths held on the device"):
        decode_logits(model, prompt, 1, on_device=True)


@pytest.mark.skipif(CUDA, reason="the refusal on a machine without CUDA")
def test_cuda_graph_needs_a_cuda_device():
    model = qvl.from_config("tiny")
    inputs = demo_prompt(model.cfg)
    with pytest.raises(ValueError, match="cuda_graph=True: CUDA graphs need the model on a CUDA device; it is on cpu"):
        model.generate(**inputs, max_new_tokens=3, cuda_graph=True)
    prompt = model.prepare(**inputs)
    with pytest.raises(ValueError, match="CUDA graphs need the model on a CUDA device"):
        DecodeGraph(model, prompt, model.new_cache(1, inputs["input_ids"].shape[1] + 2))


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA GPU")
@pytest.mark.parametrize("spec", ["eager", "triton", "xformers"])
@pytest.mark.parametrize("inputs", ["image", "padded batch"])
def test_generation_replayed_from_a_cuda_graph_matches_plain_generation(spec, inputs):
    reasons = get_backend(spec).unavailable_reasons()
    if reasons:
        pytest.skip(f"{spec} unavailable: {reasons}")
    model = perturbed("tiny", torch.float32)
    model.set_backends(spec, fallback="eager")  # xformers: attention and cache go to eager in the graph
    inputs = demo_prompt(model.cfg) if inputs == "image" else padded_batch()  # prepare() moves them
    plain = model.generate(**inputs, max_new_tokens=12)
    replayed = model.generate(**inputs, max_new_tokens=12, cuda_graph=True)
    assert replayed.tolist() == plain.tolist()


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA GPU")
@pytest.mark.xdist_group("3b")
def test_3b_bf16_triton_decode_graph_logits():
    """At the real size the graph's decode attention splits the whole cache, not the written part: the same
    sums in another order, so the logits agree to bf16 rounding rather than bit for bit."""
    model = perturbed("3b", torch.bfloat16)
    model.set_backends("triton")
    inputs = demo_prompt(model.cfg)
    prompt = model.prepare(**inputs)
    steps = 8
    length = inputs["input_ids"].shape[1]
    tokens = torch.randint(0, model.cfg.text.vocab_size, (steps, 1), device="cuda")
    results = []
    for cuda_graph in (False, True):
        cache = model.new_cache(1, length + steps)
        model.prefill(prompt, cache)
        step = model.decoder(prompt, cache, cuda_graph=cuda_graph)
        results.append(torch.stack([step(t).float().clone() for t in tokens]))
    assert rel_err(results[1], results[0]) <= 1e-2


# --- what capture needs, checked without a GPU ----------------------------------------------------------------------


class LaunchRecorder(LaunchCounter):
    """Every aten op and Triton launch of a step, described by what a captured graph would freeze: the op or
    kernel, its grid, its non-tensor arguments and its tensors' shapes, strides and dtypes. A host read of a
    device value (`.item()`, `int(t)`, `bool(t)`: aten._local_scalar_dense) is recorded as such."""

    def __init__(self):
        super().__init__()
        self.launches, self.host_reads = [], []

    @staticmethod
    def _frozen(value):
        if isinstance(value, torch.Tensor):
            return ("tensor", tuple(value.shape), value.stride(), value.dtype)
        if isinstance(value, (list, tuple)):
            return tuple(LaunchRecorder._frozen(v) for v in value)
        return value

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self._inside_kernel:
            if func.__name__.startswith("_local_scalar_dense"):
                self.host_reads.append(str(func))
            self.launches.append((str(func), self._frozen(args), self._frozen(sorted((kwargs or {}).items()))))
        return func(*args, **(kwargs or {}))

    def on_triton_launch(self, kernel, grid, args, kwargs) -> None:
        name = getattr(getattr(kernel, "fn", kernel), "__name__", repr(kernel))
        self.launches.append((name, grid, self._frozen(args), self._frozen(sorted(kwargs.items()))))


@pytest.mark.parametrize("backend", BACKENDS)
def test_device_length_step_launches_the_same_work_at_every_length(backend):
    """A graph replays the launches it captured, arguments and all: the device-length step must launch the
    same ops and kernels with the same non-tensor arguments and tensor layouts at every length, and never
    read a device value on the host. The Python-length step does not (the check can fail)."""
    model = perturbed("tiny", torch.float32)
    model.set_backends(backend)
    inputs = padded_batch()
    prompt = model.prepare(**inputs)
    cache = model.new_cache(3, inputs["input_ids"].shape[1] + 8)
    model.prefill(prompt, cache)
    tokens = torch.tensor([5, 6, 7], device=model.device)
    length = torch.zeros((), dtype=torch.long, device=model.device)

    def record(on_device):
        steps = []
        for slot in (cache.length, cache.length + 3):
            length.fill_(slot)  # what DecodeGraph.step does before each replay, outside the graph
            saved, cache.length = cache.length, slot
            with LaunchRecorder().counting() as rec:
                if on_device:
                    model.decode_step(tokens, prompt, cache, length=length)
                else:
                    model.decode_step(tokens, prompt, cache)
            cache.length = saved
            steps.append(rec)
        return steps

    first, later = record(on_device=True)
    assert first.launches == later.launches and first.launches
    assert not first.host_reads and not later.host_reads
    first, later = record(on_device=False)
    assert first.launches != later.launches  # lengths in Python show up in the launches


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA GPU")
def test_decode_graph_refuses_a_wrong_batch_and_a_full_cache():
    model = perturbed("tiny", torch.float32)
    prompt = model.prepare(**padded_batch())
    cache = model.new_cache(3, prompt.embeds.shape[1] + 1)
    model.prefill(prompt, cache)
    graph = DecodeGraph(model, prompt, cache)
    with pytest.raises(ValueError, match=r"tokens must be \(3,\), got \(1,\)"):
        graph.step(torch.zeros(1, dtype=torch.long, device="cuda"))
    graph.step(torch.zeros(3, dtype=torch.long, device="cuda"))
    with pytest.raises(ValueError, match="the cache is full"):
        graph.step(torch.zeros(3, dtype=torch.long, device="cuda"))
