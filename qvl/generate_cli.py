"""`qvl generate`: a prompt with images and videos through a checkpoint (or a random-weight preset),
the answer streamed as it is generated (several answers, from sampling or beam search, printed in turn as
`[i] text`), then prefill time, decode speed and peak memory.

Everything the user can get wrong (paths, corrupt files, a directory without tokenizer.json or weights, a
tokenizer that does not belong to the model, an unavailable backend, a missing optional decoder) is
checked before the weights are loaded where possible and reported as one line, without a traceback.

`--tp N` splits the decoder over N processes (tensor parallelism): started here as local workers
(`qvl.parallel.launch`), or, under torchrun (several nodes), the processes torchrun started. Every rank runs the
same generation; rank 0 alone writes the answer and the figures.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .cli import positive_int
from .devices import parse_device
from .dtypes import DTYPES
from .errors import CheckpointError, InputError


@dataclass
class GenerateResult:
    tokens: list[int]  # the first sequence's new tokens, EOS included when generation stopped on it
    text: str
    prompt_tokens: int
    preprocess_s: float
    prefill_s: float  # generate() call to the first new token: vision tower + prefill + first sample
    decode_s: float  # first to last new token
    peak_memory_mib: float
    memory_kind: str
    chunks: list[str] = field(default_factory=list)  # the streamed pieces, in order
    sequences: list[list[int]] = field(default_factory=list)  # every returned sequence's new tokens
    texts: list[str] = field(default_factory=list)

    @property
    def decode_tokens_per_s(self) -> float | None:
        n = len(self.tokens) - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else None


class TextStream:
    """Incremental detokenization: emit the new suffix of the decoded text, holding back a trailing
    partial UTF-8 character (decoded as U+FFFD) until the next token completes it."""

    def __init__(self, decode: Callable[[list[int]], str], write: Callable[[str], None]):
        self.decode, self.write = decode, write
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, token: int) -> None:
        self.ids.append(token)
        text = self.decode(self.ids)
        if text.endswith("\ufffd"):
            return
        self._emit(text)

    def finish(self) -> str:
        text = self.decode(self.ids)
        self._emit(text)
        return text

    def _emit(self, text: str) -> None:
        if text.startswith(self.emitted) and len(text) > len(self.emitted):
            self.write(text[len(self.emitted):])
            self.emitted = text


def resolve_model_source(name: str) -> tuple[str, object]:
    """('dir', path) or ('preset', config); a clear error for anything else or a directory missing files."""
    from .checkpoint import _weight_files
    from .config import PRESETS, load_hf_config
    from .files import regular_file_size

    if os.path.isdir(name):
        cfg = load_hf_config(name)  # ValueError if config.json is missing or malformed
        tokenizer = os.path.join(name, "tokenizer.json")
        if not os.path.lexists(tokenizer):
            raise CheckpointError(f"checkpoint directory {name!r} has no tokenizer.json: qvl generate needs the "
                                  "checkpoint's tokenizer.json next to its weights")
        regular_file_size(tokenizer, CheckpointError)  # a directory or a FIFO in its place: named
        _weight_files(name)  # ValueError if there are no safetensors weights
        return "dir", cfg
    if name in PRESETS:
        return "preset", PRESETS[name]
    if os.path.exists(name):
        raise InputError(f"--model {name!r} is a file; pass the checkpoint directory")
    raise InputError(f"--model {name!r} is neither a checkpoint directory nor a preset name "
                     f"({', '.join(PRESETS)}, random weights)")


def peak_memory(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "CUDA memory allocated"
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    if sys.platform == "darwin":
        rss_kib /= 1024  # bytes there
    return rss_kib / 1024, "process RSS"


def until_stop(tokens: list[int], stop: set[int]) -> list[int]:
    """New tokens up to and including the first stop id (what follows is padding)."""
    for i, t in enumerate(tokens):
        if t in stop:
            return tokens[: i + 1]
    return tokens


def run_generate(model, processor, prompt: str, images=(), videos=(), *, max_new_tokens: int = 128,
                 temperature: float = 0.0, seed: int | None = None, system: str | None = None,
                 write: Callable[[str], None] | None = None, inputs: dict | None = None,
                 cuda_graph: bool = False, num_beams: int = 1, num_return_sequences: int = 1,
                 top_k: int | None = None, top_p: float | None = None, repetition_penalty: float | None = None,
                 stop: Sequence[str] = ()) -> GenerateResult:
    """Process, generate, time. One sequence is streamed as it is generated; several (num_return_sequences,
    beams) are decoded at the end. `inputs` skips processing (already-made model inputs); cuda_graph replays
    the decode step from a CUDA graph; `stop`: stop strings (`Qwen25VL.generate`). Beam search decides its
    tokens only at the end: its whole time is reported as prefill."""
    chunks: list[str] = []

    def emit(piece: str) -> None:
        chunks.append(piece)
        if write is not None:
            write(piece)

    t0 = time.perf_counter()
    if inputs is None:
        inputs = processor(prompt, images=list(images), videos=list(videos), system=system)
    preprocess_s = time.perf_counter() - t0
    device = model.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    streamed = num_beams == 1 and num_return_sequences == 1
    stream = TextStream(processor.decode, emit)
    stamps: list[float] = []
    stop_ids = set(processor.stop_ids)
    stream_done = not streamed

    def on_token(tokens: torch.Tensor) -> None:
        nonlocal stream_done
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        stamps.append(time.perf_counter())
        if stream_done:
            return  # several answers, or padding after EOS
        token = int(tokens[0])
        if token in stop_ids:
            stream_done = True
        else:
            stream.push(token)

    start = time.perf_counter()
    ids = model.generate(**inputs, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                         eos_token_id=list(processor.stop_ids), on_token=None if num_beams > 1 else on_token,
                         cuda_graph=cuda_graph, num_beams=num_beams, num_return_sequences=num_return_sequences,
                         top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
                         stop_strings=list(stop) or None, tokenizer=processor)
    end = time.perf_counter()
    prompt_tokens = int(inputs["input_ids"].shape[1])
    sequences = [until_stop(row, stop_ids) for row in ids[:, prompt_tokens:].tolist()]
    texts = [processor.decode([t for t in row if t not in stop_ids]) for row in sequences]
    if streamed:
        texts[0] = stream.finish()
    else:
        for i, text in enumerate(texts):
            emit(f"[{i + 1}] {text}\n")
    prefill_s = (stamps[0] - start) if stamps else end - start
    decode_s = (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0
    mem, kind = peak_memory(device)
    return GenerateResult(sequences[0], texts[0], prompt_tokens, preprocess_s, prefill_s, decode_s, mem, kind,
                          chunks, sequences, texts)


def add_generate_parser(sub) -> None:
    p = sub.add_parser(
        "generate", help="answer a prompt about images/videos, streamed, then timing and peak memory",
        description="Answer a prompt about images and videos with a Qwen2.5-VL checkpoint, streaming the answer to "
                    "stdout; prefill time, decode tokens/s and peak memory follow on stderr.")
    p.add_argument("--model", required=True,
                   help="checkpoint directory (config.json, safetensors weights, tokenizer.json, optional "
                        "preprocessor_config.json) or a preset name (tiny, 3b, ...: random weights, for smoke tests)")
    p.add_argument("--image", action="append", default=[], metavar="PATH", help="an image file; repeat for several")
    p.add_argument("--video", action="append", default=[], metavar="PATH",
                   help="a video file (needs PyAV: pip install av) or a folder of frame images; repeatable")
    p.add_argument("--prompt", required=True, help="the user's text")
    p.add_argument("--system", default=None, help="system message (default: the template's own)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (temperature > 0)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="sample among the most likely tokens holding this mass")
    p.add_argument("--repetition-penalty", type=float, default=None,
                   help="divide the scores of tokens already present (> 1 discourages repeats)")
    p.add_argument("--num-beams", type=int, default=1, help="beam search with this many beams (1: none)")
    p.add_argument("--num-return-sequences", type=int, default=1,
                   help="answers to print (sampling, or the best beams: at most --num-beams)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop when the answer contains this text; repeatable")
    p.add_argument("--backends", default=None, metavar="SPEC",
                   help="operator backends, e.g. 'eager' or 'attention=triton,norm=eager' (see `qvl backends`)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: the checkpoint's dtype")
    p.add_argument("--fps", type=float, default=None, help="video frames sampled per second (default 2)")
    p.add_argument("--max-frames", type=int, default=None, help="most video frames kept (default 768)")
    p.add_argument("--min-pixels", type=int, default=None, help="override the image min_pixels")
    p.add_argument("--max-pixels", type=int, default=None, help="override the image max_pixels")
    p.add_argument("--cuda-graph", action="store_true",
                   help="replay the vision tower and the decode step from CUDA graphs, kept per shape (at batch 1 "
                        "both are bound by kernel launches)")
    p.add_argument("--tp", type=positive_int, default=1, metavar="N",
                   help="tensor-parallel degree: N local worker processes (one GPU each on CUDA) each hold 1/N of the "
                        "decoder; under torchrun, N must be its WORLD_SIZE (default 1)")
    p.add_argument("--vision-parallel", choices=("data", "tensor"), default="data",
                   help="with --tp: the vision tower whole on each rank, run data-parallel (default), or split like "
                        "the decoder")
    p.set_defaults(func=cmd_generate)


def flag(name: str) -> str:
    """An argument of `generate` as `qvl generate` spells it: top_k -> --top-k."""
    return "--" + name.replace("_", "-")


def check_generate_args(args: argparse.Namespace) -> None:
    """The search flags (by `generate`'s own rules, named as flags) and the texts, checked before anything is
    loaded. A text that is not UTF-8 on the command line reaches Python as lone surrogates: refused here."""
    from .model.generation import check_generate_args as check_search
    from .processing.tokenizer import check_text

    check_search(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                 top_p=args.top_p, seed=args.seed, num_beams=args.num_beams,
                 num_return_sequences=args.num_return_sequences, repetition_penalty=args.repetition_penalty,
                 cuda_graph=args.cuda_graph, name=flag)
    check_text(args.prompt, "--prompt")
    if args.system is not None:
        check_text(args.system, "--system")
    for text in args.stop:
        if not check_text(text, "--stop"):
            raise InputError("--stop needs a non-empty text")


def _device(args: argparse.Namespace) -> torch.device:
    """--device, checked against this machine, --cuda-graph and --tp."""
    from .parallel.group import check_rank_device

    device = parse_device(args.device, "--device")
    if args.cuda_graph and device.type != "cuda":
        raise InputError(f"--cuda-graph needs a CUDA device (--device cuda); got --device {args.device}")
    check_rank_device(device, args.tp, f"--tp {args.tp}")
    return device


def _model_source(args: argparse.Namespace):
    """(kind, config, processor) of --model: 'dir' or 'preset' (`resolve_model_source`)."""
    from .processing import Processor

    overrides = {"min_pixels": args.min_pixels, "max_pixels": args.max_pixels, "video_fps": args.fps,
                 "video_max_frames": args.max_frames}
    kind, cfg = resolve_model_source(args.model)
    processor = (Processor.from_pretrained(args.model, cfg, **overrides) if kind == "dir"
                 else Processor.for_config(cfg, **overrides))
    return kind, cfg, processor


def _load(args: argparse.Namespace, kind: str, cfg, device: torch.device):
    """The model (this rank's piece of it at --tp > 1)."""
    from .checkpoint import from_config, from_pretrained

    dtype = DTYPES[args.dtype] if args.dtype else None
    if kind == "dir":
        return from_pretrained(args.model, dtype=dtype, device=device, backends=args.backends, tp=args.tp,
                               vision_parallel=args.vision_parallel)
    return from_config(cfg, dtype=dtype or torch.float32, device=device, backends=args.backends, tp=args.tp,
                       vision_parallel=args.vision_parallel)


def _rank() -> int:
    """This process's rank in the tensor-parallel group; 0 outside one."""
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _write(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()


def _answer(args: argparse.Namespace, model, processor, inputs: dict, preprocess_s: float) -> None:
    """Generate, streaming the answer to stdout, then the figures on stderr. Every rank of a group runs it (the
    same calls on every rank, SPMD); only rank 0 writes."""
    writes = _rank() == 0
    result = run_generate(model, processor, args.prompt, max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature, seed=args.seed, write=_write if writes else None,
                          inputs=inputs, cuda_graph=args.cuda_graph, num_beams=args.num_beams,
                          num_return_sequences=args.num_return_sequences, top_k=args.top_k, top_p=args.top_p,
                          repetition_penalty=args.repetition_penalty, stop=args.stop)
    if not writes:
        return
    if len(result.sequences) == 1:
        sys.stdout.write("\n")
    sys.stdout.flush()
    speed = result.decode_tokens_per_s
    print(f"prompt {result.prompt_tokens} tokens ({len(args.image)} images, {len(args.video)} videos), "
          f"preprocess {preprocess_s * 1e3:.1f} ms", file=sys.stderr)
    print(f"prefill {result.prefill_s * 1e3:.1f} ms (vision + prompt + first token)", file=sys.stderr)
    print(f"decode {len(result.tokens)} tokens, " + (f"{speed:.1f} tokens/s" if speed else "n/a tokens/s")
          + " (after the first)", file=sys.stderr)
    rank = f", rank 0 of {args.tp}" if args.tp > 1 else ""  # each rank holds about as much as rank 0
    print(f"peak memory {result.peak_memory_mib:.0f} MiB ({result.memory_kind}, {model.device}{rank})",
          file=sys.stderr)


def _generate_worker(args: argparse.Namespace, inputs: dict, preprocess_s: float) -> None:
    """One rank of `qvl generate --tp N` started by `qvl.parallel.launch`: the parent checked the arguments and
    made the inputs; this rank loads its piece of the model and runs the same generation as the others."""
    from .backends import BackendUnsupportedError

    kind, cfg, processor = _model_source(args)
    try:
        _answer(args, _load(args, kind, cfg, torch.device(args.device)), processor, inputs, preprocess_s)
    except BackendUnsupportedError as e:  # --backends this machine cannot run: exit 2, as in one process
        raise InputError(str(e)) from None


def cmd_generate(args: argparse.Namespace) -> int:
    from .backends import BackendUnsupportedError, resolve_plan
    from .model.generation import check_length
    from .parallel.group import torchrun_rank, under_torchrun
    from .parallel.launch import run_workers
    from .parallel.shard import check_degree
    from .processing import OptionalDependencyError

    check_generate_args(args)
    device = _device(args)
    torchrun_rank(args.tp, f"--tp {args.tp}")  # under torchrun, --tp must be its world size
    local_workers = args.tp > 1 and not under_torchrun()  # under torchrun this process is one of the ranks
    try:
        kind, cfg, processor = _model_source(args)
        check_degree(cfg, args.tp, args.vision_parallel)
        # the inputs first: a bad image fails before gigabytes of weights are read (or workers started)
        t0 = time.perf_counter()
        inputs = processor(args.prompt, images=args.image, videos=args.video, system=args.system)
        preprocess_s = time.perf_counter() - t0
        check_length(inputs["input_ids"].shape[1], args.max_new_tokens, cfg.text.max_position_embeddings)
        if local_workers:
            resolve_plan(args.backends)  # --backends checked here: a worker's failure would be exit 1, not 2
        model = None if local_workers else _load(args, kind, cfg, device)
    except (OptionalDependencyError, BackendUnsupportedError) as e:
        raise ValueError(str(e)) from None
    try:
        if local_workers:  # every worker loads its piece and generates; rank 0 writes
            run_workers(args.tp, _generate_worker, (args, inputs, preprocess_s))
        else:
            _answer(args, model, processor, inputs, preprocess_s)
    except KeyboardInterrupt:
        if _rank() == 0:
            print("\nqvl generate: interrupted", file=sys.stderr)
        return 130
    return 0


__all__ = ["add_generate_parser", "cmd_generate", "run_generate", "GenerateResult", "TextStream",
           "resolve_model_source"]
