"""The xformers backend's paths on the CPU: xFormers' kernel entry points replaced by small torch references.

xFormers' kernels (memory_efficient_attention's CUDA kernels, the Triton rms_norm and rope_padded) need a GPU,
but everything qvl does around them runs anywhere: the translation of masks into xFormers' bias objects, the
packed and strided layouts, GQA's stride-0 expansion, the cache slots rope_padded writes. The references here
take the very tensors and bias objects the backend passes (xFormers' own input validation runs first) and
compute what the kernel computes, so those paths can be tested against eager on the CPU.

Use from any test module (xFormers' Python package must be installed, `can_simulate()`; its compiled extension
need not load):

    from tests.ops.xformers_sim import needs_xformers, register_simulated_backend

    @needs_xformers
    def test_norm_on_the_xformers_paths(monkeypatch):
        name, calls = register_simulated_backend(monkeypatch)   # "xformers-sim", {operator: call count}
        ops = Ops(resolve_plan(name))                           # or get_backend(name).impls["norm"]
        ...                                                     # compare with eager
        assert calls["norm"] > 0

`install_reference_kernels(monkeypatch)` alone replaces the kernels and leaves the real `xformers` backend as it
is (e.g. to call `qvl.backends.xformers.BACKEND.impls[...]` directly). Everything is undone when the test ends.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from qvl.backends import OPERATORS, Backend, registry
from qvl.backends import xformers as xfb
from qvl.backends.xformers import installed

SIMULATED = "xformers-sim"


def can_simulate() -> bool:
    """Whether the xformers paths can run here on the CPU: xFormers' Python package imports (its compiled
    extension and a GPU are not needed)."""
    return installed.XF is not None


needs_xformers = pytest.mark.skipif(not can_simulate(), reason=f"xformers unavailable: {installed.STATUS.missing}")


# --- references for xFormers' kernel entry points ------------------------------------------------------------------


def ref_memory_efficient_attention_forward(query, key, value, attn_bias=None, p=0.0, scale=None, *, op=None,
                                           output_dtype=None):
    """softmax(q k^T * scale + attn_bias.materialize(...)) v over the very tensors the backend passes.

    xFormers' own input validation runs first. Rows whose keys are all masked come out NaN, as a kernel's
    might: the backend must zero them itself.
    """
    from xformers.ops.fmha import Inputs

    Inputs(query=query, key=key, value=value, attn_bias=attn_bias, p=p, scale=scale).validate_inputs()
    assert p == 0.0 and op is None and output_dtype is None
    five = query.dim() == 5
    q, k, v = (x if five else x.unsqueeze(3) for x in (query, key, value))  # (B, M, G, H, K)
    b, mq, g, h, d = q.shape
    scale = d**-0.5 if scale is None else scale
    scores = torch.einsum("bqghd,bkghd->bghqk", q.float(), k.float()) * scale
    vf = v.float()
    if attn_bias is not None:
        bias = attn_bias.materialize((b, g, h, mq, k.shape[1]), dtype=torch.float32, device=q.device)
        hidden = bias.isneginf()
        # Like the kernels, never read what the bias hides (gappy keys' gaps may hold anything, NaN included).
        scores = torch.where(hidden, float("-inf"), scores + bias)
        unseen = hidden.all(-2).permute(0, 3, 1, 2)  # (B, Mk, G, H): keys no query sees
        vf = vf.masked_fill(unseen[..., None], 0)
    probs = scores.softmax(-1)
    if torch.is_grad_enabled() and query.requires_grad:  # the autograd entry point: see below
        probs = probs.nan_to_num(0.0)
    out = torch.einsum("bghqk,bkghd->bqghd", probs, vf).to(query.dtype)
    return out if five else out.squeeze(3)


def ref_memory_efficient_attention(query, key, value, attn_bias=None, p=0.0, scale=None, *, op=None,
                                   output_dtype=None):
    """xFormers' autograd entry point: the same reference, differentiable by torch, with rows that see no key
    at 0 (a NaN row would make every gradient NaN through the softmax's backward, which the kernels avoid)."""
    return ref_memory_efficient_attention_forward(query, key, value, attn_bias, p, scale, op=op,
                                                  output_dtype=output_dtype)


def ref_rope_padded(xq, xk, xv, cache_k, cache_v, attn_bias, *, theta=10000.0, linear_scale=1.0,
                    use_dynamic_scaling=False, out_q=None, first_seqpos=None, seqpos=None, adjacents=True,
                    internal_dtype="", **_dynamic):
    """xformers/ops/_triton/rope_padded_kernels.py in torch (4-D inputs): the same checks, positions, frequencies
    (pow(theta, -2j/D) in float32), pair layout and cache slots."""
    assert not use_dynamic_scaling and out_q is None and internal_dtype == "" and xq.dim() == 4
    assert first_seqpos is None or seqpos is None
    qstart = attn_bias.q_seqinfo.seqstart_py
    kstart, klen = attn_bias.k_seqinfo.seqstart_py, attn_bias.k_seqinfo.seqlen_py
    n, dim, hkv = qstart[-1], xq.shape[-1], xk.shape[2]
    assert xq.shape[:2] == (1, n) and xk.shape == xv.shape == (1, n, hkv, dim)
    assert cache_k.shape == cache_v.shape == (1, kstart[-1], hkv, dim)
    assert all(x.stride(-1) == 1 for x in (xq, xk, xv, cache_k, cache_v))
    query_pos = torch.arange(n)
    block = torch.bucketize(query_pos, torch.tensor(qstart[1:]), right=True)
    end_q = torch.tensor(qstart[1:])[block]
    cache_start = torch.tensor(kstart[:-1])[block]
    cache_pos = cache_start + torch.tensor(list(klen))[block] - (end_q - query_pos)
    if seqpos is not None:
        assert seqpos.shape == (n,)
        pos = seqpos.cpu()
    else:
        pos = cache_pos - cache_start + (0 if first_seqpos is None else first_seqpos.cpu()[block])
    powers = torch.arange(dim // 2, dtype=torch.float32) * 2.0
    freqs = torch.pow(torch.tensor(theta, dtype=torch.float32), powers / (-dim))
    angle = pos.to(torch.float32)[:, None] * freqs / linear_scale
    cos, sin = angle.cos()[:, None], angle.sin()[:, None]

    def rotate(x):
        x = x[0].float()
        re_i, im_i = (slice(0, dim, 2), slice(1, dim, 2)) if adjacents else (slice(0, dim // 2), slice(dim // 2, dim))
        out = torch.empty_like(x)
        out[..., re_i] = x[..., re_i] * cos - x[..., im_i] * sin
        out[..., im_i] = x[..., im_i] * cos + x[..., re_i] * sin
        return out

    cache_pos = cache_pos.to(cache_k.device)
    cache_k[0, cache_pos] = rotate(xk).to(cache_k.dtype)
    if cache_v.stride(1) != 0:  # a stride-0 scratch: the kernel's writes there are discarded
        cache_v[0, cache_pos] = xv[0].to(cache_v.dtype)
    return rotate(xq).to(xq.dtype)[None]


def ref_rms_norm(x, weight, eps=1e-6):
    assert x.is_contiguous() and weight.is_contiguous()
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


def ref_rms_norm_add(x, y, weight, eps=1e-6):
    """Like the kernel: x += y in place (stored in x's dtype), then the norm of the stored sum."""
    assert x.is_contiguous() and y.is_contiguous() and weight.is_contiguous()
    a = x.float() + y.float()
    x.copy_(a)
    rstd = torch.rsqrt(a.pow(2).mean(-1, keepdim=True) + eps)
    return (x.float() * rstd * weight.float()).to(x.dtype)


# --- installing them -----------------------------------------------------------------------------------------------


def install_reference_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Replace xFormers' kernel entry points by the references above, for this test (the backend looks them up
    on `installed.XF` at every call). xformers.ops.swiglu stays: 0.0.35 runs it as F.linear + silu anywhere."""
    monkeypatch.setattr(installed.XF.ops, "memory_efficient_attention_forward", ref_memory_efficient_attention_forward)
    monkeypatch.setattr(installed.XF.ops, "memory_efficient_attention", ref_memory_efficient_attention)
    monkeypatch.setattr(installed.XF.ops, "rope_padded", ref_rope_padded)
    monkeypatch.setattr(installed.XF.rmsnorm, "rms_norm", ref_rms_norm)
    monkeypatch.setattr(installed.XF.rmsnorm, "rms_norm_add", ref_rms_norm_add)


def register_simulated_backend(monkeypatch: pytest.MonkeyPatch) -> tuple[str, dict[str, int]]:
    """Register the xformers implementations on the CPU as backend 'xformers-sim', for this test.

    The kernels are replaced by the references. `installed.STATUS` says the extension and the Triton kernels
    loaded, and gives "simulated" as the reason there is no CUDA device, which keeps attention from asking
    xFormers' GPU kernels about a CPU call (they all refuse it): every operator then declares only what it
    declares on a GPU (no GELU, one position per token in rope, ...). The implementations are the backend's
    own classes with `devices = {"cpu"}`, counting their calls.

    Returns the backend's name and the calls per operator, so a test can check that the paths really ran.
    """
    install_reference_kernels(monkeypatch)
    monkeypatch.setattr(installed, "STATUS",
                        dataclasses.replace(installed.STATUS, cuda="simulated", extension=None, triton=None))
    calls = {op: 0 for op in OPERATORS}

    def on_cpu(impl):
        class Sim(type(impl)):
            devices = frozenset({"cpu"})

            def __call__(self, *args, **kwargs):
                calls[self.operator] += 1
                return super().__call__(*args, **kwargs)

        return Sim()

    backend = Backend(SIMULATED, {op: on_cpu(impl) for op, impl in xfb.BACKEND.impls.items()})
    monkeypatch.setitem(registry._BACKENDS, backend.name, backend)
    return backend.name, calls
