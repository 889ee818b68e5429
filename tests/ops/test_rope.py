"""The rope operator on every registered backend (eager, triton, xformers, ...) against eager, the reference.

Each backend is tested on the inputs it supports: a backend that takes one position per token (xformers'
rope_padded) gets uniform text streams where the others get M-RoPE with distinct streams and the vision
tower's 2-D RoPE.
"""

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from qvl.backends import BackendUnsupportedError, CallInfo, Ops, Rotary, get_backend, resolve_plan
from qvl.backends import xformers as xfb
from qvl.backends.eager import EagerRope
from qvl.kernels import DEVICE_TYPE
from qvl.kernels.rope import rope
from qvl.model.layers import inverse_frequencies
from tests.ops.backends import backend_params, implementation, reference_ops, run
from tests.ops.compare import DTYPES, TOLERANCE, assert_close_rel, assert_grads_close
from tests.ops.xformers_sim import needs_xformers

HEAD_DIMS = [8, 16, 64, 80, 128]  # tiny test models, vision (1280 / 16: not a power of two), text
GQA_RATIOS = [1, 2, 7, 8]  # Hq = Hk * r: 7 is Qwen2.5-VL-7B (28 / 4), 8 is 3B (16 / 2)
LAYOUTS = ["contiguous", "fused", "transposed"]


def make_rotary(mode: str, head_dim: int, gen: torch.Generator, device, uniform: bool = False) -> Rotary:
    """Text M-RoPE: 3 streams over one frequency ladder; vision 2-D: 2 streams, the ladder restarting per stream.
    `uniform`: the caller promises equal streams (`make_positions(..., uniform=True)`)."""
    half = head_dim // 2
    if mode == "vision":
        base = inverse_frequencies(half, 10000.0)
        return Rotary(torch.cat([base, base]).to(device), (half // 2, half // 2), uniform)
    if head_dim == 128:
        sections = (16, 24, 24)  # Qwen2.5-VL's mrope_section
    else:  # a random split of the pairs into 3 non-empty streams
        cuts = sorted((torch.randperm(half - 1, generator=gen)[:2] + 1).tolist())
        sections = (cuts[0], cuts[1] - cuts[0], half - cuts[1])
    return Rotary(inverse_frequencies(head_dim, 1e6).to(device), sections, uniform)


def make_positions(streams: int, batch: int, seq_len: int, max_pos: int, strided: bool, gen, device,
                   uniform: bool = False):
    """(streams, B, L) int64, each stream with its own positions (`uniform`: one stream, expanded, as text has);
    as a permuted view when `strided`."""
    drawn = 1 if uniform else streams
    if strided:
        pos = torch.randint(0, max_pos + 1, (batch, seq_len, drawn), generator=gen).permute(2, 0, 1)
    else:
        pos = torch.randint(0, max_pos + 1, (drawn, batch, seq_len), generator=gen)
    return pos.expand(streams, -1, -1).to(device)


def takes_distinct_streams(ops: Ops, operator: str) -> bool:
    """Whether the backend declares distinct position streams supported (M-RoPE with vision, the vision tower's
    2-D RoPE). xformers' rope_padded takes one position per token and declares them unsupported."""
    call = CallInfo.of(operator, torch.empty(0, device=DEVICE_TYPE), head_dim=16, sections=(2, 3, 3),
                       uniform_streams=False)
    return not get_backend(ops.plan[operator]).reasons(call)


def supported_streams(ops: Ops, operator: str, mode: str, uniform: bool) -> tuple[str, bool]:
    """The drawn (mode, uniform), or uniform text on a backend that takes one position per token: what such a
    backend supports (text's inv_freq is also the theta^(-2j/D) ladder rope_padded derives from theta)."""
    if takes_distinct_streams(ops, operator):
        return mode, uniform
    return "text", True


def tolerance_factor(ops: Ops, operator: str, dtype: torch.dtype, max_pos: int) -> float:
    """The factor on compare.TOLERANCE a backend's rotations are held to, at positions up to max_pos.

    xformers' rope_padded computes its frequencies as pow(theta, -2j/D) where qvl computes 1 / theta^(2j/D)
    (qvl/backends/xformers/rope.py): a few float32 ulps apart, so its angles drift from eager's by up to about
    max_pos * 2^-24 radians (the drift measured on the simulated kernel is a tenth of that). The other backends
    take eager's inv_freq itself and are held to the plain tolerance.
    """
    if not isinstance(implementation(ops, operator), xfb.XformersRope):
        return 1.0
    return 1.0 + max_pos * 2.0**-24 / TOLERANCE[dtype]


def make_heads(batch, seq_len, head_counts, head_dim, layout, dtype, gen, device):
    """Tensors (B, L, H, D) for each H in head_counts, and the storage they live in.

    fused: slices of one (B, L, sum(H) * D) projection output, as the model's qkv split makes them;
    transposed: (L, B, H, D) storage seen as (B, L, H, D); contiguous: separate contiguous tensors.
    """
    if layout == "fused":
        width = sum(head_counts) * head_dim
        storage = torch.randn(batch, seq_len, width, generator=gen).to(device=device, dtype=dtype)
        parts = storage.split([h * head_dim for h in head_counts], -1)
        return [p.view(batch, seq_len, h, head_dim) for p, h in zip(parts, head_counts, strict=True)], [storage]
    shape = (seq_len, batch) if layout == "transposed" else (batch, seq_len)
    storage = [torch.randn(*shape, h, head_dim, generator=gen).to(device=device, dtype=dtype) for h in head_counts]
    views = [s.transpose(0, 1) if layout == "transposed" else s for s in storage]
    return views, storage


# Shared with test_cache.py; dtype is a pytest parameter so every dtype gets its own examples. `uniform`: equal
# position streams (plain text), the only case a backend taking one position per token supports.
case_args = dict(
    mode=st.sampled_from(["text", "vision"]),
    uniform=st.booleans(),
    head_dim=st.sampled_from(HEAD_DIMS),
    batch=st.integers(1, 3),
    seq_len=st.integers(1, 9),
    kv_heads=st.integers(1, 3),
    ratio=st.sampled_from(GQA_RATIOS),
    max_pos=st.sampled_from([7, 300, 30000]),
    layout=st.sampled_from(LAYOUTS),
    seed=st.integers(0, 2**31 - 1),
)


@pytest.mark.parametrize("ops", backend_params("rope"), indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@given(**case_args)
# A 3B decode step (16 / 2 heads).
@example(mode="text", uniform=False, head_dim=128, batch=1, seq_len=1, kv_heads=2, ratio=8, max_pos=30000,
         layout="fused", seed=0)
# 7B prefill (28 / 4 heads) at large positions, where fp32 angle rounding must follow eager's exactly.
@example(mode="text", uniform=False, head_dim=128, batch=3, seq_len=7, kv_heads=1, ratio=7, max_pos=30000,
         layout="fused", seed=1)
# Text-only prefill: all streams equal, every backend's own case.
@example(mode="text", uniform=True, head_dim=128, batch=3, seq_len=7, kv_heads=2, ratio=8, max_pos=300,
         layout="fused", seed=7)
# The vision tower: 2 streams, head dim 80 (40 pairs padded to 64).
@example(mode="vision", uniform=False, head_dim=80, batch=1, seq_len=9, kv_heads=3, ratio=1, max_pos=300,
         layout="fused", seed=2)
@example(mode="vision", uniform=False, head_dim=80, batch=2, seq_len=1, kv_heads=2, ratio=1, max_pos=30000,
         layout="transposed", seed=3)
# Tiny test models.
@example(mode="text", uniform=False, head_dim=8, batch=2, seq_len=3, kv_heads=1, ratio=2, max_pos=30000,
         layout="contiguous", seed=4)
@example(mode="text", uniform=False, head_dim=16, batch=1, seq_len=5, kv_heads=3, ratio=7, max_pos=300,
         layout="fused", seed=5)
@example(mode="text", uniform=False, head_dim=64, batch=2, seq_len=4, kv_heads=2, ratio=2, max_pos=30000,
         layout="transposed", seed=6)
def test_rope_matches_eager(ops, mode, uniform, head_dim, batch, seq_len, kv_heads, ratio, max_pos, layout, dtype,
                            seed):
    device = DEVICE_TYPE
    mode, uniform = supported_streams(ops, "rope", mode, uniform)
    gen = torch.Generator().manual_seed(seed)
    rotary = make_rotary(mode, head_dim, gen, device, uniform)
    positions = make_positions(len(rotary.sections), batch, seq_len, max_pos, layout != "contiguous", gen, device,
                               uniform)
    (q, k), storage = make_heads(batch, seq_len, [kv_heads * ratio, kv_heads], head_dim, layout, dtype, gen, device)
    before = [s.clone() for s in storage]

    q_ref, k_ref = reference_ops().rope(q, k, positions, rotary)
    q_out, k_out = run(ops, "rope", q, k, positions, rotary)

    assert q_out.is_contiguous() and k_out.is_contiguous()
    factor = tolerance_factor(ops, "rope", dtype, max_pos)
    assert_close_rel(q_out, q_ref, dtype, factor)
    assert_close_rel(k_out, k_ref, dtype, factor)
    for s, b in zip(storage, before, strict=True):
        assert torch.equal(s, b), "rope modified its inputs"


@pytest.mark.parametrize("ops", backend_params("rope"), indirect=True)
def test_rope_distinguishes_streams(ops, device):
    """Each pair follows its own stream: moving one stream's positions changes exactly that stream's pairs. A
    backend that takes one position per token declares such a call unsupported instead."""
    gen = torch.Generator().manual_seed(0)
    rotary = make_rotary("text", 128, gen, device)
    positions = make_positions(3, 2, 4, 1000, False, gen, device)
    (q, k), _ = make_heads(2, 4, [4, 2], 128, "fused", torch.float32, gen, device)
    if not takes_distinct_streams(ops, "rope"):
        with pytest.raises(BackendUnsupportedError, match="position streams differ"):
            ops.rope(q, k, positions, rotary)
        return
    q0, _ = ops.rope(q, k, positions, rotary)
    shifted = positions.clone()
    shifted[1] += 5  # the h stream: pairs 16..39
    q1, _ = ops.rope(q, k, shifted, rotary)
    changed = (q0 != q1).any(dim=(0, 1, 2))  # (D,)
    pairs = changed[:64] | changed[64:]
    expected = torch.zeros(64, dtype=torch.bool, device=pairs.device)
    expected[16:40] = True
    assert torch.equal(pairs, expected)


def test_rope_rejects_bad_inputs(device):
    """Checked once, by the operator interface, before the triton kernel (or any backend) runs."""
    ops = Ops(resolve_plan("triton"))
    gen = torch.Generator().manual_seed(0)
    rotary = make_rotary("text", 16, gen, device)
    (q, k), _ = make_heads(1, 3, [2, 1], 16, "contiguous", torch.float32, gen, device)
    positions = make_positions(3, 1, 3, 10, False, gen, device)
    with pytest.raises(ValueError, match="inv_freq"):
        ops.rope(q, k, positions, Rotary(rotary.inv_freq[:-1], rotary.sections))
    with pytest.raises(ValueError, match="positions"):
        ops.rope(q, k, positions[:, :, :2], rotary)
    with pytest.raises(ValueError, match="equal B, L, D"):
        ops.rope(q, k[:, :2], positions, rotary)
    with pytest.raises(ValueError, match="positions must be an integer tensor"):
        ops.rope(q, k, positions.float(), rotary)
    with pytest.raises(ValueError, match="dtypes differ"):
        ops.rope(q, k.half(), positions, rotary)


# --- the xformers backend: what only it has ----------------------------------------------------------------------


@needs_xformers
def test_rope_refuses_non_uniform_streams_and_non_ladder_frequencies():
    impl = xfb.BACKEND.impls["rope"]
    call = CallInfo("rope", "cuda", torch.bfloat16, (("head_dim", 128), ("sections", (16, 24, 24)),
                                                      ("uniform_streams", False)))
    assert any("rope_padded takes one position per token" in r for r in impl.not_supported_reasons(call))
    assert any("rope_padded takes one position per token" in r
               for r in xfb.BACKEND.impls["cache"].not_supported_reasons(call))
    gen = torch.Generator().manual_seed(0)
    (q, k), _ = make_heads(1, 3, [2, 2], 16, "contiguous", torch.float32, gen, "cpu")
    positions = make_positions(3, 1, 3, 10, False, gen, "cpu")
    text = Rotary(inverse_frequencies(16, 1e6), (2, 3, 3))
    with pytest.raises(BackendUnsupportedError, match="one position per token"):
        impl(q, k, positions, text)
    half = inverse_frequencies(8, 10000.0)
    vision = Rotary(torch.cat([half, half]), (4, 4), uniform_streams=True)  # restarts per stream: no theta
    with pytest.raises(BackendUnsupportedError, match="not a theta"):
        impl(q, k, positions[:2], vision)


@pytest.mark.parametrize("theta", [10000.0, 1e6, 500000.0, 2.5e4])
@pytest.mark.parametrize("dim", [8, 16, 80, 128])
def test_rope_theta_recovered_from_inv_freq(theta, dim):
    assert xfb.rope_theta(inverse_frequencies(dim, theta)) == theta


def test_rope_theta_refuses_other_frequency_tables():
    inv = inverse_frequencies(128, 1e6)
    scaled = torch.where(torch.arange(64) > 40, inv / 8, inv)  # llama-3 style low-frequency scaling
    assert xfb.rope_theta(scaled) is None
    assert xfb.rope_theta(torch.cat([inverse_frequencies(64, 1e4)] * 2)) is None
    assert xfb.rope_theta(inv * 0.5) is None


# --- backward: the triton rope differentiated (the rotation by minus the angle) against eager autograd -----------


def grad_rotary(mode: str, head_dim: int, gen: torch.Generator, device) -> Rotary:
    """Text M-RoPE (head dim 32: sections (4, 6, 6); otherwise a random 3-way split) or the vision tower's 2-D
    rotary, Rotary(inv_freq, (D/4, D/4)) as qvl/model/vision.py builds it."""
    if mode == "text" and head_dim == 32:
        return Rotary(inverse_frequencies(head_dim, 1e6).to(device), (4, 6, 6))
    return make_rotary(mode, head_dim, gen, device)


def grad_leaves(storage):
    """Fresh leaves requiring grad for each storage tensor, so each backend differentiates its own graph."""
    return [s.detach().clone().requires_grad_() for s in storage]


def heads_of(leaves, batch, seq_len, head_counts, head_dim, layout):
    """q and k as `make_heads` lays them out, taken from the given leaves (a fused qkv or separate tensors)."""
    if layout == "fused":
        parts = leaves[0].split([h * head_dim for h in head_counts], -1)
        return [p.view(batch, seq_len, h, head_dim) for p, h in zip(parts, head_counts, strict=True)]
    return [t.transpose(0, 1) if layout == "transposed" else t for t in leaves]


def rope_grads(ops, storage, shape, layout, positions, rotary, douts, needs=(True, True)):
    """Gradients of <rope(q, k), (dq', dk')> for q and k (None where `needs` says it is not required); through
    a fused storage, the q and k column blocks of its gradient."""
    batch, seq_len, head_counts, head_dim = shape
    leaves = grad_leaves(storage)
    q, k = heads_of(leaves, batch, seq_len, head_counts, head_dim, layout)
    if layout != "fused":
        q, k = (t if need else t.detach() for t, need in zip((q, k), needs, strict=True))
    outs = ops.rope(q, k, positions, rotary)
    if layout == "fused":
        (grad,) = torch.autograd.grad(outs, leaves, douts)
        return [g.reshape(batch, seq_len, h, head_dim)
                for g, h in zip(grad.split([h * head_dim for h in head_counts], -1), head_counts, strict=True)]
    used = [i for i, need in enumerate(needs) if need]  # an output of an input without grad may carry none
    grads = iter(torch.autograd.grad([outs[i] for i in used], [(q, k)[i] for i in used], [douts[i] for i in used]))
    return [next(grads) if need else None for need in needs]


def make_douts(batch, seq_len, head_counts, head_dim, layout, dtype, gen, device):
    """Output gradients; (L, B, H, D) storage seen as (B, L, H, D) for the transposed layout, to read strided."""
    shape = (seq_len, batch) if layout == "transposed" else (batch, seq_len)
    douts = [torch.randn(*shape, h, head_dim, generator=gen).to(device=device, dtype=dtype) for h in head_counts]
    return [d.transpose(0, 1) if layout == "transposed" else d for d in douts]


def check_rope_backward(mode, head_dim, batch, seq_len, kv_heads, ratio, layout, dtype, seed, max_pos=300):
    gen = torch.Generator().manual_seed(seed)
    device = DEVICE_TYPE
    rotary = grad_rotary(mode, head_dim, gen, device)
    positions = make_positions(len(rotary.sections), batch, seq_len, max_pos, layout != "contiguous", gen, device)
    head_counts = [kv_heads * ratio, kv_heads]
    _, storage = make_heads(batch, seq_len, head_counts, head_dim, layout, dtype, gen, device)
    douts = make_douts(batch, seq_len, head_counts, head_dim, layout, dtype, gen, device)
    shape = (batch, seq_len, head_counts, head_dim)
    grads = rope_grads(Ops(resolve_plan("triton")), storage, shape, layout, positions, rotary, douts)
    ref_grads = rope_grads(reference_ops(), storage, shape, layout, positions, rotary, douts)
    assert_grads_close(grads, ref_grads, ["q", "k"], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode, head_dim", [("text", 32), ("vision", 32), ("vision", 80)])
def test_rope_backward_matches_eager(mode, head_dim, dtype):
    """As the model calls it: q/k slices of one fused qkv, GQA, text M-RoPE with three distinct streams (sections
    (4, 6, 6)) or the vision 2-D rotary (two streams; head dim 80: 40 pairs padded to 64), large positions."""
    check_rope_backward(mode, head_dim, batch=2, seq_len=5, kv_heads=2, ratio=3, layout="fused", dtype=dtype,
                        seed=head_dim + len(mode), max_pos=30000)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@settings(max_examples=6)
@given(mode=st.sampled_from(["text", "vision"]), head_dim=st.sampled_from([8, 16, 32, 64]), batch=st.integers(1, 3),
       seq_len=st.integers(1, 9), kv_heads=st.integers(1, 3), ratio=st.sampled_from(GQA_RATIOS),
       layout=st.sampled_from(LAYOUTS), seed=st.integers(0, 2**31 - 1))
def test_rope_backward_shapes(mode, head_dim, batch, seq_len, kv_heads, ratio, layout, dtype, seed):
    """Odd B, L and head counts (GQA ratios of the Qwen2.5-VL sizes) in every layout: separate contiguous tensors,
    fused slices, (L, B)-major storage; the output gradients then strided too."""
    check_rope_backward(mode, head_dim, batch, seq_len, kv_heads, ratio, layout, dtype, seed)


@pytest.mark.parametrize("needs", [(True, False), (False, True)], ids=["q only", "k only"])
def test_rope_backward_one_input(needs, device):
    """Only one of q, k requires grad: its gradient matches eager's, the other is None (and left out of the
    backward launch)."""
    gen = torch.Generator().manual_seed(0)
    rotary = grad_rotary("text", 32, gen, device)
    positions = make_positions(3, 2, 4, 300, False, gen, device)
    head_counts, dtype = [4, 2], torch.float32
    _, storage = make_heads(2, 4, head_counts, 32, "contiguous", dtype, gen, device)
    douts = make_douts(2, 4, head_counts, 32, "contiguous", dtype, gen, device)
    shape = (2, 4, head_counts, 32)
    grads = rope_grads(Ops(resolve_plan("triton")), storage, shape, "contiguous", positions, rotary, douts, needs)
    ref_grads = rope_grads(reference_ops(), storage, shape, "contiguous", positions, rotary, douts, needs)
    assert_grads_close(grads, ref_grads, ["q", "k"], dtype)


def test_rope_backward_only_when_needed(device):
    """The autograd.Function only when autograd records the call and q or k requires grad."""
    gen = torch.Generator().manual_seed(0)
    rotary = grad_rotary("vision", 16, gen, device)
    positions = make_positions(2, 1, 3, 10, False, gen, device)
    (q, k), _ = make_heads(1, 3, [2, 1], 16, "contiguous", torch.float32, gen, device)
    args = (positions, rotary.inv_freq, rotary.stream_of_pair)
    assert rope(q, k, *args)[0].grad_fn is None
    with torch.no_grad():
        assert rope(q.requires_grad_(), k, *args)[0].grad_fn is None
    assert type(rope(q, k, *args)[0].grad_fn).__name__ == "_RopeBackward"


@pytest.mark.parametrize("mode", ["text", "vision"])
def test_eager_rope_gradcheck(mode, device):
    """The reference itself: EagerRope's autograd against finite differences in float64. EagerRope rotates in
    float32 whatever the input dtype, so the differences carry float32 rounding: the rotation is linear in q and
    k, so a large step (eps) costs no truncation error and keeps that rounding small against it."""
    gen = torch.Generator().manual_seed(0)
    rotary = grad_rotary(mode, 16, gen, "cpu")
    positions = make_positions(len(rotary.sections), 2, 3, 300, False, gen, "cpu")
    q, k = (torch.randn(2, 3, h, 16, generator=gen, dtype=torch.float64).requires_grad_() for h in (2, 1))
    assert torch.autograd.gradcheck(lambda q, k: EagerRope()(q, k, positions, rotary), (q, k), eps=0.5, atol=1e-5,
                                    rtol=1e-4)
