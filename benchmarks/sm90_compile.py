"""Compile every Triton kernel for the H100 (sm_90) on a machine without a GPU, and check what only compiled
code shows: register spills, shared memory, and whether matrix products use Hopper's tensor-core path.

    python benchmarks/sm90_compile.py [--quick] [--json PATH] [--sass DIR] [--only TEXT]

The interpreter that runs the kernels in CI executes them with numpy, so it says nothing about how they
compile. Here the launchers run at the model's real shapes (3b/7b decoder, vision tower, 32k decode cache)
on CPU tensors with a stand-in sm_90 driver; a Triton compile hook records each launch's exact
specialization (signature, constants, divisibility, warps, stages) and cancels the launch. Each recorded
kernel is compiled with Triton's own ptxas for sm_90 and read back with cuobjdump and nvdisasm:

  spill bytes   local memory (registers that did not fit): must be 0 for 16-bit inputs; float32 attention
                and GEMM tiles (exact fp32 products, no tensor cores) may spill a little and are reported
  shared        bytes of shared memory per block: must fit sm_90's 227 KB
  wgmma         GEMM and attention with 16-bit inputs must issue HGMMA (warpgroup MMA), not HMMA

The GEMM's and the GEMV's autotuners are replaced by a launcher that compiles every configuration it could pick. --quick
keeps one configuration per GEMM or GEMV family, bfloat16 and float32 only, and the GEMV at batch 1 only (for CI);
exit status 1 when any check fails. --sass DIR writes each
compiled kernel's SASS (nvdisasm) to one file per kernel, so two runs (before and after a kernel change) can
be diffed; the JSON rows carry each kernel's SASS instruction count too.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from functools import partial

# Compiled, not interpreted: this must precede every triton import (qvl keeps an explicit 0).
os.environ["TRITON_INTERPRET"] = "0"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

SM90 = GPUTarget("cuda", 90, 32)
SHARED_LIMIT = 227 * 1024  # per block, after opting in (cudaFuncAttributeMaxDynamicSharedMemorySize)
NVIDIA_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


class Sm90Driver:
    """Just enough of a Triton driver for the JIT to specialize and compile for sm_90 without a device."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return SM90

    def get_active_torch_device(self):
        return torch.device("cpu")


class Recorder:
    """A jit_cache_hook: keeps each launch's specialization and returns True, which skips compile and launch."""

    def __init__(self):
        self.launches: list[dict] = []
        self.case = ""

    def __call__(self, *, key, repr, fn, compile, is_manual_warmup, already_compiled):
        self.launches.append({"case": self.case, "fn": fn.jit_function, "spec": compile})
        return True


SASS_INSTRUCTION = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s", re.MULTILINE)  # "/*0a30*/  HGMMA.64x..." lines


def compile_sm90(fn, spec) -> dict:
    options = {k: spec[k] for k in ("num_warps", "num_stages", "num_ctas", "enable_fp_fusion")}
    kernel = triton.compile(ASTSource(fn, spec["signature"], spec["constants"], spec["configs"][0]), target=SM90,
                            options=options)
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        with open(cubin, "wb") as f:
            f.write(kernel.asm["cubin"])
        # ptxas again, verbose, on Triton's own PTX: the report Triton discards (sm_90a: wgmma needs it)
        report = subprocess.run([os.path.join(NVIDIA_BIN, "ptxas"), "-v", "--gpu-name=sm_90a", ptx, "-o",
                                 os.path.join(tmp, "v.cubin")], capture_output=True, text=True, check=True).stderr
        sass = subprocess.run([os.path.join(NVIDIA_BIN, "nvdisasm"), "-c", cubin],
                              capture_output=True, text=True, check=True).stdout

    def figure(pattern):
        found = re.search(pattern, report)
        return int(found.group(1)) if found else 0

    return {
        "regs": figure(r"Used (\d+) registers"),
        "spill_bytes": figure(r"(\d+) bytes spill stores"),
        "stack_bytes": figure(r"(\d+) bytes stack frame"),
        "shared": kernel.metadata.shared,
        "wgmma": "HGMMA" in sass,
        "mma": "HMMA" in sass or "HGMMA" in sass,
        "sass_instructions": len(SASS_INSTRUCTION.findall(sass)),
        "sass": sass,
    }


def constants(spec) -> dict:
    names = list(spec["signature"])
    return {names[k[0]]: v for k, v in spec["constants"].items() if spec["signature"][names[k[0]]] == "constexpr"}


def storage_dtype(spec) -> str:
    return next((t[1:] for t in spec["signature"].values() if t[1:] in ("bf16", "fp16", "fp32")), "")


def describe(spec) -> str:
    shown = {k: v for k, v in constants(spec).items() if k.startswith(("BLOCK", "GROUP", "ACTIVATION", "HAS_"))}
    return " ".join(f"{k}={v}" for k, v in shown.items()) + f" warps={spec['num_warps']} stages={spec['num_stages']}"


def problems(row: dict, spec) -> list[str]:
    if "error" in row:
        return [row["error"]]
    found = []
    if row["spill_bytes"]:
        found.append(f"{row['spill_bytes']} bytes of registers spilled")
    if row["shared"] > SHARED_LIMIT:
        found.append(f"{row['shared']} bytes of shared memory > {SHARED_LIMIT}")
    # wgmma takes 64-row tiles per warpgroup (4 warps); narrower tiles (decode) rightly use mma.sync (HMMA).
    wgmma_shape = constants(spec).get("BLOCK_M", 0) >= 64 and spec["num_warps"] % 4 == 0
    if storage_dtype(spec) != "fp32" and row["mma"] and wgmma_shape and not row["wgmma"]:
        found.append("64-row tensor-core tiles without wgmma (HMMA, not HGMMA)")
    return found


# --- the launches: the model's real shapes ------------------------------------------------------------------------

def cases(quick: bool):
    """(name, thunk) pairs; each thunk calls one launcher at one real shape."""
    from qvl.backends.interface import BlockDiagonalMask, Rotary
    from qvl.dtypes import dtype_name
    from qvl.kernels import gemm, gemv
    from qvl.kernels.activation import gelu, quick_gelu, swiglu
    from qvl.kernels.attention import causal_attention, varlen_attention
    from qvl.kernels.cross_entropy import fused_linear_cross_entropy
    from qvl.kernels.decode_attention import decode_attention
    from qvl.kernels.layer_norm import layer_norm
    from qvl.kernels.rms_norm import rms_norm
    from qvl.kernels.rope import rope, rope_and_cache

    class EveryConfig:  # stands in for an autotuner: launches each configuration it could pick
        def __init__(self, kernel, configs):
            self.kernel, self.configs = kernel, configs[:1] if quick else configs

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                for config in self.configs:
                    self.kernel[(1,)](*args, **kwargs, **config.all_kwargs())
            return launch

    for module, kernel in ((gemm, gemm._linear_kernel), (gemv, gemv._gemv_kernel)):
        module._TUNED = {family: EveryConfig(kernel, configs) for family, configs in module._FAMILIES.items()}

    def t(*shape, dtype):
        return torch.empty(*shape, dtype=dtype)

    def backward(fn, *inputs):
        """A training step of a launcher: its forward on inputs that require grad (saving what backward needs),
        then the backward kernels. Launches are cancelled, so the tensors are never read."""
        leaves = [x.detach().requires_grad_(x.is_floating_point()) for x in inputs]
        outs = fn(*leaves)
        outs = [o for o in (outs if isinstance(outs, tuple) else (outs,)) if o.requires_grad]
        torch.autograd.backward(outs, [torch.empty_like(o) for o in outs])

    text, vision = Rotary(torch.ones(64), (16, 24, 24)), Rotary(torch.ones(40), (20, 20))
    pos = torch.zeros(3, 1, 64, dtype=torch.long)
    slot = torch.tensor(100)  # a decode step for CUDA-graph capture: the slot is read on the device
    out = []
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        name = dtype_name(dt)
        for hidden in (2048, 3584, 1280, 20000):  # 3b, 7b, vision; and a row wider than one pass
            x, w = t(64, hidden, dtype=dt), t(hidden, dtype=dt)
            out.append((f"rms_norm {name} H={hidden}", lambda x=x, w=w: rms_norm(x, w, 1e-6)))
            out.append((f"rms_norm+residual {name} H={hidden}", lambda x=x, w=w: rms_norm(x, w, 1e-6, x.clone())))
            out.append((f"rms_norm+residual backward {name} H={hidden}", lambda x=x, w=w: backward(
                lambda x, w, r: rms_norm(x, w, 1e-6, r), x, w, x.clone())))
        for hidden in (1280, 8192):  # Qwen2-VL's vision width; the widest row the LayerNorm kernel holds
            x, w = t(64, hidden, dtype=dt), t(hidden, dtype=dt)
            out.append((f"layer_norm+residual {name} H={hidden}", lambda x=x, w=w: layer_norm(x, w, w, 1e-6,
                                                                                              x.clone())))
            out.append((f"layer_norm+residual backward {name} H={hidden}", lambda x=x, w=w: backward(
                lambda x, w, shift, r: layer_norm(x, w, shift, 1e-6, r), x, w, w.clone(), x.clone())))
        h = t(64, 2 * 11008, dtype=dt)
        out.append((f"swiglu {name}", lambda h=h: swiglu(h)))
        out.append((f"gelu {name}", lambda h=h: gelu(h)))
        out.append((f"swiglu backward {name}", lambda h=h: backward(swiglu, h)))
        out.append((f"gelu backward {name}", lambda h=h: backward(gelu, h)))
        out.append((f"quick_gelu {name}", lambda h=h: quick_gelu(h)))
        out.append((f"quick_gelu backward {name}", lambda h=h: backward(quick_gelu, h)))

        q, k, qv = t(1, 64, 16, 128, dtype=dt), t(1, 64, 2, 128, dtype=dt), t(1, 64, 16, 80, dtype=dt)
        out.append((f"rope {name} d=128", lambda q=q, k=k: rope(q, k, pos, text.inv_freq, text.stream_of_pair)))
        kc, vc = t(1, 4096, 2, 128, dtype=dt), t(1, 4096, 2, 128, dtype=dt)
        out.append((f"rope+cache {name} d=128", lambda q=q, k=k, kc=kc, vc=vc: rope_and_cache(
            q, k, k, pos, text.inv_freq, text.stream_of_pair, kc, vc, 0)))
        out.append((f"rope+cache {name} d=128, start on device", lambda q=q, k=k, kc=kc, vc=vc: rope_and_cache(
            q[:, :1], k[:, :1], k[:, :1], pos[:, :, :1], text.inv_freq, text.stream_of_pair, kc, vc, slot)))
        k1, kc1 = t(1, 64, 1, 128, dtype=dt), t(1, 4096, 1, 128, dtype=dt)  # one kv head: Triton makes it a constant
        out.append((f"rope+cache {name} d=128, one kv head, start on device",
                    lambda q=q, k1=k1, kc1=kc1: rope_and_cache(q[:, :1], k1[:, :1], k1[:, :1], pos[:, :, :1],
                                                               text.inv_freq, text.stream_of_pair, kc1, kc1, slot)))
        out.append((f"rope {name} d=80 (vision)", lambda qv=qv: rope(
            qv, qv, pos[:2], vision.inv_freq, vision.stream_of_pair)))
        out.append((f"rope backward {name} d=128", lambda q=q, k=k: backward(
            partial(rope, positions=pos, inv_freq=text.inv_freq, stream_of_pair=text.stream_of_pair), q, k)))

        for d, heads in ((128, (16, 2)), (128, (28, 4)), (64, (16, 16)), (256, (8, 1))):
            q, k = t(1, 1024, heads[0], d, dtype=dt), t(1, 1024, heads[1], d, dtype=dt)
            pad = torch.zeros(1, dtype=torch.long)
            out.append((f"causal attention {name} d={d} {heads[0]}/{heads[1]} heads",
                        lambda q=q, k=k, d=d: causal_attention(q, k, k, None, d ** -0.5)))
            out.append((f"causal attention {name} d={d} padded",
                        lambda q=q, k=k, d=d, pad=pad: causal_attention(q, k, k, pad, d ** -0.5)))
            out.append((f"causal attention backward {name} d={d} {heads[0]}/{heads[1]} heads padded",
                        lambda q=q, k=k, d=d, pad=pad: backward(
                            partial(causal_attention, pad=pad, scale=d ** -0.5), q, k, k.clone())))
            kc = t(1, 32768, heads[1], d, dtype=dt)
            out.append((f"decode attention {name} d={d} 32k cache",
                        lambda q=q, kc=kc, d=d: decode_attention(q[:, :1], kc, kc, None, d ** -0.5)))
            out.append((f"decode attention {name} d={d} 32k cache, length on device",
                        lambda q=q, kc=kc, d=d: decode_attention(q[:, :1], kc, kc, None, d ** -0.5,
                                                                 kv_len=torch.tensor(20000))))
        for d in (80, 64, 128):
            qv = t(1, 1024, 16, d, dtype=dt)
            mask = BlockDiagonalMask.from_seqlens([64] * 16)
            out.append((f"varlen attention {name} d={d}", lambda qv=qv, d=d, mask=mask:
                        varlen_attention(qv, qv, qv, mask.cu_seqlens, mask.max_seqlen, d ** -0.5)))
            out.append((f"varlen attention backward {name} d={d}", lambda qv=qv, d=d, mask=mask: backward(
                partial(varlen_attention, cu_seqlens=mask.cu_seqlens, max_seqlen=mask.max_seqlen, scale=d ** -0.5),
                qv, qv.clone(), qv.clone())))

        # 16 tokens, one chunk: the kernel's constants follow the vocabulary, not the token count, while the chunks'
        # logits are torch matmuls run here on the CPU (a minute of them at 2048 tokens, whose later chunks only
        # add the same kernel for targets not 16-byte aligned)
        hidden_states, lm_head = t(16, 2048, dtype=dt), t(151936, 2048, dtype=dt)
        targets = torch.zeros(16, dtype=torch.long)
        out.append((f"fused linear cross-entropy {name} V=151936", lambda h=hidden_states, w=lm_head, y=targets:
                    backward(partial(fused_linear_cross_entropy, targets=y), h, w)))

        for rows in (4096, 4, 1):  # prefill; decode at batch 4 and 1 (the GEMV, qvl/kernels/gemv.py)
            for k_dim, n, act, bias in ((2048, 2 * 11008, "swiglu", False), (11008, 2048, "none", False),
                                        (1280, 2 * 3420, "swiglu", True), (3420, 1280, "none", True),
                                        (5120, 5120, "gelu", True)):
                x, w = t(rows, k_dim, dtype=dt), t(n, k_dim, dtype=dt)
                b = t(n, dtype=dt) if bias else None
                out.append((f"gemm {name} M={rows} K={k_dim} N={n} {act}",
                            lambda x=x, w=w, b=b, act=act: gemm.linear(x, w, b, act)))
    if quick:  # float16's kernels are bfloat16's tiles and instructions in another type; the GEMV at batch 4 is
        # batch 1's configurations with more rows (both left to the full run)
        out = [(n, f) for n, f in out if " float16 " not in n and " M=4 " not in n]
    return out


def write_sass(folder: str, row: dict, sass: str, written: set[str]) -> None:
    """One file per compiled kernel, named after its case, kernel and configuration (stable across runs)."""
    slug = re.sub(r"[^A-Za-z0-9=.]+", "_", f"{row['case']} {row['kernel']} {row['config']}").strip("_")
    name, n = slug, 1
    while name in written:  # the same case and configuration compiled twice with other constants
        n += 1
        name = f"{slug}.{n}"
    written.add(name)
    with open(os.path.join(folder, name + ".sass"), "w") as f:
        f.write(sass)


# The launches to compile, one per specialization: filled before the workers fork, which read it by index.
_UNIQUE: list[dict] = []


def _compile_one(index: int) -> tuple[dict | None, str | None]:
    """(compile_sm90's figures, None) for _UNIQUE[index], or (None, the error): a kernel that does not compile for
    sm_90 is the worst finding of all, reported as its row's problem."""
    launch = _UNIQUE[index]
    try:
        return compile_sm90(launch["fn"], launch["spec"]), None
    except Exception as e:
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one GEMM configuration per family (CI)")
    ap.add_argument("--json", help="write every compiled kernel's figures here")
    ap.add_argument("--only", default="", help="only the cases whose name contains this text, e.g. 'gemm'")
    ap.add_argument("--sass", help="write each compiled kernel's SASS (nvdisasm) to a file in this folder")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="kernels compiled at once (default: CPUs)")
    args = ap.parse_args()
    if args.sass:
        os.makedirs(args.sass, exist_ok=True)

    triton.runtime.driver.set_active(Sm90Driver())
    recorder = Recorder()
    knobs.runtime.jit_cache_hook = recorder
    for name, launch in cases(args.quick):
        if args.only not in name:
            continue
        recorder.case = name
        launch()

    results, seen, failures, sass_written = [], set(), [], set()
    start = time.time()
    for launch in recorder.launches:
        key = (launch["fn"].fn.__name__, launch["spec"]["specialization_data"])
        if key not in seen:  # the same specialization from another case: compiled once
            seen.add(key)
            _UNIQUE.append(launch)
    # compiling is CPU-bound (LLVM, ptxas) and each kernel stands alone: forked workers, results in order
    with multiprocessing.get_context("fork").Pool(max(1, args.jobs)) as pool:
        compiled_rows = pool.imap(_compile_one, range(len(_UNIQUE)))
        for launch, (compiled, error) in zip(_UNIQUE, compiled_rows, strict=True):
            spec, name = launch["spec"], launch["fn"].fn.__name__
            row = {"case": launch["case"], "kernel": name, "dtype": storage_dtype(spec), "config": describe(spec)}
            if error is None:
                sass = compiled.pop("sass")
                row.update(compiled)
                if args.sass:
                    write_sass(args.sass, row, sass, sass_written)
            else:
                row["error"] = error
            row["problems"] = problems(row, spec)
            results.append(row)
            if row["problems"]:
                failures.append(row)
            status = "FAIL: " + "; ".join(row["problems"]) if row["problems"] else "ok"
            print(f"{row['case']:<44} {name:<33} regs {row.get('regs', '-'):>3} spill "
                  f"{row.get('spill_bytes', '-'):>4} smem {row.get('shared', '-'):>6} "
                  f"{'wgmma' if row.get('wgmma') else '     '} {status}  [{row['config']}]", flush=True)

    print(f"\n{len(results)} kernels compiled for sm_90 in {time.time() - start:.0f} s; {len(failures)} failed checks")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "target": "sm_90", "kernels": results}, f, indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
