"""Run an ablation: build the model once, measure every variant, compare each with the reference.

Per variant (warm-up runs first, then `repeats` timed runs; median and min/max reported):
  vision_ms      the vision tower alone (`model.vision_features` on every image and video); a cuda_graph variant
                 replays it from a graph captured before the first run (vision_graph_capture_ms)
  prefill_ms     time to first token: `prepare` (vision tower, embedding, positions) + `prefill` into a
                 fresh KV cache + argmax of the last position; a cuda_graph variant replays the tower and the
                 prefill's device work from graphs captured before the first run (prefill_graph_capture_ms)
  decode_tok_s   batch * (decode_tokens - 1) / time of the greedy `decode_step` loop after the prefill; a
                 variant with cuda_graph = true replays the step from a CUDA graph, captured after the
                 prefill and outside the timed loop (two warm-up steps and the capture, per run)
  peak_memory    on a GPU the variant's own need: its weights plus the most torch.cuda.max_memory_allocated
                 rose above what was resident when it started (other variants' models stay resident; the
                 device-wide figure is kept as device_peak_mib); not measured on a CPU
  launches_per_decode_step  aten ops + Triton kernels of one decode step (qvl.launches; the same count on a
                 CPU as on a GPU): the host's share of a batch-1 step; for cuda_graph, the step the graph replays
Then one more, untimed pass compares with the reference variant (which runs first):
  logits_rel_err ||L - L_ref|| / ||L_ref|| (Frobenius, float32) over the logits of all decode_tokens steps
  logits_max_err max |L - L_ref|
                 the variant is teacher-forced with the reference's greedy tokens, so every step sees the
                 same context and its logits are comparable even after the free-running tokens diverge
  token_agreement  fraction of the variant's own greedy tokens (timed runs) equal to the reference's
  first_divergence the first step (0 = the token out of the prefill) where any row differs, or None
Variants with architecture overrides or another dtype get their own model, with the same weights wherever
parameter shapes agree (copied, cast to the variant's dtype, from the base model), so their error is the
effect of the ablation itself. Variants whose prompt differs from the reference's (other patch or merge
size) or whose vocabulary differs are not compared.

With [model] tp = N > 1 every model is split over N ranks (`qvl.from_config(tp=N)`): outside torchrun `execute`
starts N local workers (`qvl.parallel.launch.run_workers`), each running the same ablation (SPMD: the model's
layers run collectives, so every rank makes the same calls in the same order); under torchrun the ranks are its
processes. The logits are gathered on every rank, so every rank computes the same comparisons; rank 0 alone
writes results.json, report.md and the plot, and its peak memory and launch counts are the ones recorded. After
each variant the ranks compare their outcomes over a gloo group of their own (`_agree`): a variant failing on
every rank is recorded and the run goes on; on some ranks only, the run stops, since the ranks' states differ,
and a rank left waiting in a collective stops it after AGREE_TIMEOUT_S instead of hanging.

With [run] mode = "train" the variant is measured training instead (`qvl.ablate.train`: step time, tokens/s,
peak memory, the first step's loss, gradients against the reference's, a loss curve); the same models are
shared, and given back with their weights, mode and checkpointing unchanged. Under tp > 1 the gradients are
gathered whole on rank 0 alone (`whole_gradients`: they are the model's size), which compares them.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
import time
import traceback
from dataclasses import fields
from typing import Any

import torch

from ..backends import resolve_plan
from ..checkpoint import from_config, from_pretrained
from ..dtypes import DTYPES, dtype_name
from ..errors import ConfigError, QvlError, ResultsError, one_line
from ..files import read_json, reworded, write_json
from ..parallel.group import check_rank_device, join, local_device, torchrun_rank, under_torchrun
from .config import TRAIN, AblationConfig, ModelSpec, RunSpec, Variant, check_key
from .measure import Clock, PeakMemory, Progress, environment, summarize
from .report import FORMAT, check_results, render_run
from .train import compare_gradients, loss_curve, measure_steps, training, training_batch, whole_gradients
from .workload import Workload, build_workload


def resolve_device(name: str) -> torch.device:
    """A device name (auto, cpu, cuda, cuda:N; the [model] device key's rule) as a device this machine has."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(check_key(ModelSpec, "device", name, "device"))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} requested, but CUDA is not available on this machine "
                              "(use device = \"auto\" or \"cpu\", or --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {name!r} requested, but only {torch.cuda.device_count()} CUDA devices exist")
    return device


# tp > 1: how long a rank that finished a variant waits for the others to finish it too. The ranks leave a variant
# together (its last collective), so only a rank that failed alone, its peers blocked in a collective, waits long.
AGREE_TIMEOUT_S = 300.0


def make_run_dir(root: str, name: str) -> str:
    """A new folder root/name/<timestamp> (``-2``, ``-3`` ... when taken). A root that is a file, lies under a
    file or cannot be written to raises the OSError with a message naming the folder."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = os.path.join(root, name, stamp)
    path, n = base, 1
    while True:
        try:
            os.makedirs(path)
            return path
        except FileExistsError:
            n += 1
            path = f"{base}-{n}"
        except OSError as e:
            raise reworded(e, f"cannot create the run folder {path} under the results folder {root}: "
                              f"{e.strerror}") from None


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _order(config: AblationConfig) -> list[Variant]:
    """The reference first (every comparison needs it), then the others as listed."""
    ref = config.variant(config.reference)
    return [ref] + [v for v in config.variants if v.name != config.reference]


# --- one variant --------------------------------------------------------------------------------------------------


def check_backends(variant: Variant) -> None:
    """A backend that cannot run on this machine at all fails the variant, fallback or not: its plan resolved
    strict (the fallback covers single calls, not a whole backend) raises the registry's own errors, a
    ValueError for a name qvl does not know and a BackendUnsupportedError for a backend unavailable here."""
    resolve_plan(variant.backends)


def _vision_inputs(work: Workload) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(pixels, grid_thw) of the workload's images and of its videos, each present."""
    x = work.inputs
    return [(x[pixels], x[grid]) for pixels, grid in (("pixel_values", "image_grid_thw"),
                                                      ("pixel_values_videos", "video_grid_thw"))
            if x.get(pixels) is not None]


@torch.no_grad()
def _run_vision(model, work: Workload, cuda_graph: bool = False) -> None:
    for pixels, grid in _vision_inputs(work):
        model.vision_features(pixels, grid, cuda_graph=cuda_graph)


def _generation_pass(model, work: Workload, forced: torch.Tensor | None = None, keep_logits: bool = False,
                     cuda_graph: bool = False):
    """Prefill then greedy decode; `forced` (B, N) feeds those tokens instead of the model's own.

    Returns (tokens (B, N), logits (B, N, V) float32 on the CPU or None)."""
    cache = model.decode_cache(work.batch_size, work.total_length, cuda_graph)
    prompt = model.prepare(**work.inputs, cuda_graph=cuda_graph)
    logits = model.prefill(prompt, cache, cuda_graph)
    decode = model.decoder(prompt, cache, cuda_graph)
    tokens, kept = [logits.argmax(-1)], [logits.float().cpu()] if keep_logits else None
    for step in range(1, work.decode_tokens):
        feed = forced[:, step - 1].to(model.device) if forced is not None else tokens[-1]
        logits = decode(feed)
        tokens.append(logits.argmax(-1))
        if keep_logits:
            kept.append(logits.float().cpu())
    return torch.stack(tokens, 1).cpu(), (torch.stack(kept, 1) if keep_logits else None)


def _timed_generation(model, work: Workload, clock: Clock, cuda_graph: bool):
    """One timed run: (tokens, time to first token ms, decode loop ms)."""
    # allocated outside the timed region; with cuda_graph the pooled cache whose graph later runs replay
    cache = model.decode_cache(work.batch_size, work.total_length, cuda_graph)

    def first():
        prompt = model.prepare(**work.inputs, cuda_graph=cuda_graph)
        return prompt, model.prefill(prompt, cache, cuda_graph).argmax(-1)

    (prompt, token), ttft_ms = clock.time(first)
    decode = model.decoder(prompt, cache, cuda_graph)  # the first run of a shape captures its graph here, untimed

    def rest():
        tokens = [token]
        for _ in range(work.decode_tokens - 1):
            tokens.append(decode(tokens[-1]).argmax(-1))
        return torch.stack(tokens, 1)

    tokens, decode_ms = clock.time(rest)
    return tokens.cpu(), ttft_ms, decode_ms


def measure_timings(model, work: Workload, clock: Clock, warmup: int, repeats: int, tick,
                    cuda_graph: bool = False) -> tuple[dict, torch.Tensor]:
    """Warm-up then timed runs; `tick(label or None, steps done)` reports progress. Returns the figures and the
    greedy tokens of the last run."""
    vision, ttft, decode = [], [], []
    tokens = None
    if cuda_graph:  # the vision and prefill graphs captured first, outside every timing
        cache = model.decode_cache(work.batch_size, work.total_length, cuda_graph)
        prompt = model.prepare(**work.inputs, cuda_graph=cuda_graph)
        model.prefill(prompt, cache, cuda_graph)
        prefill_graph = model.prefill_graphs.captured(model, prompt, cache)  # None: a prefill the plan cannot replay
    for i in range(warmup + repeats):
        timed = i >= warmup
        tick(f"repeat {i - warmup + 1}/{repeats}" if timed else f"warm-up {i + 1}/{warmup}", 0)
        if work.has_vision:
            _, ms = clock.time(lambda: _run_vision(model, work, cuda_graph))
            if timed:
                vision.append(ms)
        tokens, ttft_ms, decode_ms = _timed_generation(model, work, clock, cuda_graph)
        if timed:
            ttft.append(ttft_ms)
            decode.append(decode_ms)
        tick(None, 1)
    steps = work.decode_tokens - 1
    figures = {"vision_ms": summarize(vision), "prefill_ms": summarize(ttft),
               "decode_tok_s": summarize([work.batch_size * steps / (ms / 1e3) for ms in decode if ms > 0])
               if steps else None,
               "decode_ms_per_step": summarize([ms / steps for ms in decode]) if steps else None}
    if cuda_graph:  # paid once per shape by the first run (a warm-up when there is one), apart from the timings
        graph = model.graphs.captured(model, work.batch_size, work.total_length)
        figures["graph_capture_ms"] = graph.capture_seconds * 1e3 if graph else None
        towers = [model.vision_graphs.captured(model, grid, pixels.dtype) for pixels, grid in _vision_inputs(work)]
        figures["vision_graph_capture_ms"] = (sum(t.capture_seconds for t in towers) * 1e3
                                              if towers and all(towers) else None)
        figures["prefill_graph_capture_ms"] = prefill_graph.capture_seconds * 1e3 if prefill_graph else None
    return figures, tokens


def decode_step_launches(model, work: Workload, cuda_graph: bool) -> int:
    """Kernel launches (aten ops and Triton kernels, `qvl.launches`) of one decode step at the workload's batch:
    what a step costs the host, which bounds decoding at small batches. With cuda_graph, the step a graph
    captures (lengths held on the device) and then replays as one launch. The count depends on neither the
    prompt nor the cache length, so a one-token text prompt stands in for the workload's (no vision tower)."""
    from ..launches import LaunchCounter

    token = min({0, 1, 2} - {model.cfg.image_token_id, model.cfg.video_token_id})  # not a vision placeholder
    prompt = model.prepare(torch.full((work.batch_size, 1), token, dtype=torch.long))
    cache = model.new_cache(work.batch_size, 3)
    model.prefill(prompt, cache)
    tokens = torch.zeros(work.batch_size, dtype=torch.long, device=model.device)
    length = torch.ones((), dtype=torch.long, device=model.device) if cuda_graph else None
    model.decode_step(tokens, prompt, cache, length=length)  # warm: a first call may decide or build something
    cache.length = 1
    with LaunchCounter().counting() as launches:
        model.decode_step(tokens, prompt, cache, length=length)
    return launches.total


def compare(tokens: torch.Tensor, logits: torch.Tensor, ref_tokens: torch.Tensor, ref_logits: torch.Tensor) -> dict:
    diff = (logits - ref_logits).abs()
    ref_norm = ref_logits.norm().item()
    agree = tokens == ref_tokens
    differing_steps = (~agree).any(0).nonzero().flatten().tolist()
    return {"logits_rel_err": (logits - ref_logits).norm().item() / ref_norm if ref_norm else float("nan"),
            "logits_max_err": diff.max().item(),
            "token_agreement": agree.float().mean().item(),
            "first_divergence": differing_steps[0] if differing_steps else None}


# --- the run ------------------------------------------------------------------------------------------------------


class AblationRun:
    """Create the results folder at construction (so `dir` is known), then `execute()`."""

    def __init__(self, config: AblationConfig, *, results_root: str = "results", device: str | None = None,
                 repeats: int | None = None, warmup: int | None = None, quiet: bool = False,
                 progress: bool | None = None, run_dir: str | None = None):
        """`run_dir`: an existing results folder to write to instead of a new one under `results_root` (a local
        worker's: the folder its parent made)."""
        self.config = config
        self.tp = config.model.tp
        # the arguments a local worker builds its own AblationRun from
        self._options = {"device": device, "repeats": repeats, "warmup": warmup, "quiet": quiet, "progress": progress}
        # overrides of [run] keys obey those keys' rules (ConfigError: "repeats: must be an integer >= 1, got 0")
        repeats = config.run.repeats if repeats is None else check_key(RunSpec, "repeats", repeats, "repeats")
        warmup = config.run.warmup if warmup is None else check_key(RunSpec, "warmup", warmup, "warmup")
        self.rank = torchrun_rank(self.tp, f"tp {self.tp} ([model] tp or --tp)")
        self.writes = self.rank == 0  # rank 0 alone writes the results (and is the parent of local workers)
        self.device = resolve_device(device or config.model.device)
        check_rank_device(self.device, self.tp, f"tp {self.tp}")
        self.device = local_device(self.device)
        if self.device.type == "cuda" and self.device.index is not None:
            torch.cuda.set_device(self.device)
        self.repeats = repeats or (10 if self.device.type == "cuda" else 3)
        self.warmup = warmup
        self.quiet = quiet or not self.writes
        self.clock, self.memory = Clock(self.device), PeakMemory(self.device)
        self.order = _order(config)
        self.progress = Progress(len(self.order) * (self.warmup + self.repeats + 1),
                                 enabled=False if self.quiet else progress)
        made = run_dir is None and self.writes
        self.dir = make_run_dir(results_root, config.name) if made else run_dir
        self._agreement = None  # tp > 1: the ranks' gloo group for `_agree`, made by `execute`
        self._models: dict[Any, Any] = {}
        self._model_info: dict[Any, dict] = {}
        self._base_key = None
        self._workloads: dict[Any, Workload] = {}
        self._ref: dict[str, Any] | None = None
        self.results = {
            "format": FORMAT,
            "name": config.name,
            "description": config.description,
            "status": "running",
            "started": _now(),
            "finished": None,
            "results_dir": self.dir,
            "config_path": config.path,
            "config": config.to_dict(),
            "config_source": config.source,
            "run": self._run_info(),
            "environment": environment(self.device, self.clock, self.memory),
            "reference": config.reference,
            "workload": None,
            "variants": [self._pending(v) for v in config.variants],
            "plot": None,
        }
        try:
            self.save()
        except OSError:
            if made:
                with contextlib.suppress(OSError):
                    os.rmdir(self.dir)  # nothing of this run is anywhere: leave no empty folder behind
            raise

    # -- bookkeeping -------------------------------------------------------------------------------------------

    @property
    def training(self) -> bool:
        return self.config.run.mode == TRAIN

    def _run_info(self) -> dict:
        run = self.config.run
        info = {"device": str(self.device), "repeats": self.repeats, "warmup": self.warmup, "mode": run.mode,
                "tp": self.tp}
        if self.training:
            info.update(train_steps=run.train_steps, learning_rate=run.learning_rate)
        return info

    def _pending(self, v: Variant) -> dict:
        return {"name": v.name, "status": "pending", "reference": v.name == self.config.reference,
                "description": v.description, "backends": v.spec,
                "requested": {"backends": v.backends, "fallback": v.fallback, "dtype": self.config.dtype_of(v),
                              "overrides": v.overrides, "cuda_graph": v.cuda_graph,
                              "gradient_checkpointing": v.gradient_checkpointing},
                "plan": None, "model": None, "workload": None, "figures": None, "comparison": None,
                "fallbacks": [], "error": None, "traceback": None, "seconds": None}

    def _entry(self, name: str) -> dict:
        return next(e for e in self.results["variants"] if e["name"] == name)

    @property
    def results_file(self) -> str:
        return os.path.join(self.dir, "results.json")

    def save(self) -> None:
        """results.json rewritten whole (atomically: a reader or a killed run sees the old file or the new one);
        by rank 0 alone."""
        if self.writes:
            write_json(self.results_file, self.results)  # an OSError names the file

    def _say(self, text: str) -> None:
        if not self.quiet:
            self.progress.message(text)

    # -- models and workloads ----------------------------------------------------------------------------------

    def _key(self, v: Variant | None):
        cfg = self.config.model_config(v)
        return cfg, self.config.dtype_of(v) if v else self.config.model.dtype

    def _model(self, v: Variant):
        """The model for a variant: built once per (architecture, dtype), reused by every variant that shares it."""
        key = self._key(v)
        if key not in self._models:
            m = self.config.model
            cfg, dtype = key
            if m.checkpoint:
                start = time.perf_counter()
                overrides = {**m.overrides, **v.overrides}
                model = from_pretrained(m.checkpoint, dtype=DTYPES[dtype], device=self.device, backends="eager",
                                        overrides=overrides or None, tp=self.tp)
                self._store(key, model, "loaded from the checkpoint", start)
            else:
                base = self._base_model()
                if key != self._base_key:
                    start = time.perf_counter()
                    model = from_config(cfg, dtype=DTYPES[dtype], device=self.device, seed=m.seed, backends="eager",
                                        tp=self.tp)
                    self._store(key, model, self._share_weights(base, model), start)
            return self._models[key], dict(self._model_info[key])
        info = dict(self._model_info[key], build_s=0.0)
        info["weights"] += " (the model of an earlier variant)"
        return self._models[key], info

    def _base_model(self):
        """Presets: the model as [model] describes it, the weight source of every other build."""
        if self._base_key is None:
            self._base_key = self._key(None)
        if self._base_key not in self._models:
            start = time.perf_counter()
            cfg, dtype = self._base_key
            model = from_config(cfg, dtype=DTYPES[dtype], device=self.device, seed=self.config.model.seed,
                                backends="eager", tp=self.tp)
            self._store(self._base_key, model, f"seed {self.config.model.seed}", start)
        return self._models[self._base_key]

    def _store(self, key, model, weights: str, start: float) -> None:
        cfg, dtype = key
        self._models[key] = model
        self._model_info[key] = {
            "source": self.config.model.describe(), "dtype": dtype,
            "architecture_overrides": {**self.config.model.overrides, **_config_diff(cfg, self.config.model_config())},
            "weights": weights, "parameters": sum(p.numel() for p in model.parameters()),
            "build_s": time.perf_counter() - start}
        if self.tp > 1:  # the model's parameters are this rank's piece (rank 0's in the results)
            self._model_info[key].update(rank_parameters=self._model_info[key]["parameters"],
                                         parameters=cfg.num_parameters())

    @staticmethod
    def _share_weights(base, model) -> str:
        src = dict(base.named_parameters())
        fresh = []
        with torch.no_grad():
            for name, p in model.named_parameters():
                s = src.get(name)
                if s is not None and s.shape == p.shape:
                    p.copy_(s)
                else:
                    fresh.append(name)
        text = f"copied from the base model ({dtype_name(base.dtype)})"
        if fresh:
            text += (f"; {len(fresh)} parameters with other shapes drawn fresh: " + ", ".join(fresh[:6])
                     + (" ..." if len(fresh) > 6 else ""))
        return text

    def _workload(self, v: Variant) -> Workload:
        cfg = self.config.model_config(v)
        vis = cfg.vision  # what the pixel rows and placeholder counts depend on
        key = (vis.patch_size, vis.temporal_patch_size, vis.spatial_merge_size, vis.in_channels, cfg.image_token_id,
               cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id, cfg.bos_token_id,
               cfg.eos_token_id, cfg.pad_token_id, cfg.text.vocab_size, cfg.text.max_position_embeddings)
        if key not in self._workloads:
            self._workloads[key] = build_workload(self.config.workload, cfg).to(self.device)
        return self._workloads[key]

    def _release_unneeded(self, remaining: list[Variant]) -> None:
        needed = {self._key(v) for v in remaining}
        if self.config.model.preset and any(k != self._base_key for k in needed):
            needed.add(self._base_key)  # still the weight source
        for key in [k for k in self._models if k not in needed]:
            del self._models[key]
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # -- running -----------------------------------------------------------------------------------------------

    def execute(self) -> dict:
        """Every variant in turn (a variant's own failure is recorded and the run goes on), then report.md and
        the plot. Interrupted (Ctrl-C, SIGTERM): what was measured is written, then KeyboardInterrupt again.
        An error of the run itself (results that cannot be written: a full disk) stops it: see `_stopped`.
        tp > 1 outside torchrun: run in local workers (`_execute_in_workers`)."""
        if self.tp > 1 and not under_torchrun():
            return self._execute_in_workers()
        try:
            try:
                if self.tp > 1:
                    self._join()
                with torch.no_grad():
                    for i, v in enumerate(self.order):
                        self._run_variant(v, i)
                        self._agree(v)
                        self._release_unneeded(self.order[i + 1:])
            except KeyboardInterrupt:
                self._mark_running("interrupted", "KeyboardInterrupt: the run was interrupted here")
                self.results["status"] = "interrupted"
                self._finish()
                raise
            self.results["status"] = "complete"
            self._finish()
        except Exception as e:
            error = self._stopped(e)
            if error is e:
                raise
            raise error from e
        return self.results

    # -- tensor parallelism ------------------------------------------------------------------------------------

    def _join(self) -> None:
        """Join the group of tp ranks (torchrun's variables; a local worker has them too) and make the gloo group
        the ranks compare their outcomes over: apart from the model's, so a rank waiting there never pairs with a
        collective a peer is blocked in, and with a timeout of its own."""
        import torch.distributed as dist

        join(self.tp, self.device)
        self._agreement = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=AGREE_TIMEOUT_S))

    def _agree(self, v: Variant) -> None:
        """tp > 1: the ranks' outcomes of variant `v`, compared before the next variant starts. All ok, or all
        failed (a registry's refusal, the same error on every rank): the run goes on. Failed on some ranks only,
        or a rank not done within AGREE_TIMEOUT_S (blocked in a collective its failed peer never joined): the run
        stops with a RuntimeError naming the variant and the rank, since the ranks' states may differ."""
        if self._agreement is None:
            return
        import torch.distributed as dist

        entry = self._entry(v.name)
        mine = (entry["status"] == "ok", entry["error"])
        outcomes: list = [None] * self.tp
        try:
            dist.all_gather_object(outcomes, mine, group=self._agreement)
        except RuntimeError as e:  # AGREE_TIMEOUT_S passed, or a peer's process ended
            here = f"failed on rank {self.rank} ({entry['error']})" if not mine[0] else f"finished on rank {self.rank}"
            message = (f"variant {v.name!r} {here}, but not every rank reached its end ({one_line(e)}); the run "
                       "stops")
        else:
            failed = [(r, error) for r, (ok, error) in enumerate(outcomes) if not ok]
            if len(failed) in (0, self.tp):
                return
            message = (f"variant {v.name!r} failed on rank {failed[0][0]} only ({failed[0][1]}); the ranks' states "
                       "differ, so the run stops")
        entry["status"], entry["error"] = "failed", message
        raise RuntimeError(message)

    def _execute_in_workers(self) -> dict:
        """tp > 1 outside torchrun: `tp` local workers run this ablation into this run's folder, rank 0 writing
        it; returns rank 0's results. Interrupted or failed, whatever rank 0 left in flight is marked so."""
        from ..parallel.launch import run_workers

        try:
            run_workers(self.tp, _ablate_worker, (self.config, self.dir, self._options))
        except BaseException as e:
            interrupted = isinstance(e, KeyboardInterrupt)
            with contextlib.suppress(QvlError, OSError):  # the workers' error is the one to report
                self._adopt("interrupted" if interrupted else "failed", None if interrupted else
                            f"{type(e).__name__}: {one_line(e)}")
            raise
        self._adopt("failed", "the workers ended without finishing the run")
        if self.results["status"] == "interrupted":  # a worker's SIGTERM, not the parent's
            raise KeyboardInterrupt("a worker was interrupted")
        return self.results

    def _adopt(self, status: str, error: str | None) -> None:
        """Rank 0's results.json read back; a run it left running (a worker killed, or failed before it could
        write) is marked `status` (with the run's `error`, if any, on it and its variant in flight) and written
        with its report."""
        self.results = check_results(read_json(self.results_file, error=ResultsError), self.results_file)
        if self.results["status"] != "running":
            return
        self._mark_running(status, f"the run stopped here: {error}" if error else
                           "KeyboardInterrupt: the run was interrupted here")
        self.results.update(status=status, finished=_now())
        if error:
            self.results["error"] = error
        self.save()
        self.results["plot"] = render_run(self.results, self.dir)
        self.save()

    def _mark_running(self, status: str, error: str) -> None:
        for e in self.results["variants"]:
            if e["status"] == "running":
                e["status"], e["error"] = status, error

    def _finish(self) -> None:
        self.progress.close()
        self._models.clear()
        self.results["finished"] = _now()
        self.save()
        if self.writes:
            self.results["plot"] = render_run(self.results, self.dir)
            self.save()

    def _stopped(self, e: Exception) -> Exception:
        """The run stopped on an error of its own, outside any variant (results.json, report.md or the plot
        could not be written, a bug): the variant in flight and the run are marked failed and results.json is
        written once more, keeping every finished variant; if even that fails, the results.json written last
        stays as it was (writes are atomic). Returns the error to raise: for an OSError (a full disk, a folder
        made read-only) the same class and errno, its message saying where the results are."""
        self.progress.close()
        self._models.clear()
        what = f"{type(e).__name__}: {e.strerror or e}" if isinstance(e, OSError) else f"{type(e).__name__}: {e}"
        done = sum(v["status"] in ("ok", "failed") for v in self.results["variants"])  # measured, in memory
        self._mark_running("failed", f"the run stopped here: {what}")
        self.results.update(status="failed", error=what, finished=_now())
        stopped = f"the run stopped with {done} of {len(self.order)} variants measured"
        try:
            self.save()
            where = f"{stopped}; " + (f"{self.results_file} marks it failed and keeps them" if self.writes else
                                      "rank 0's results.json marks it failed and keeps them")
        except OSError as again:
            why = f" ({os.strerror(again.errno)})" if again.errno else ""
            where = f"{stopped}; {self.results_file} could not be updated either{why}, the one written last is intact"
        if not isinstance(e, OSError):
            return e
        return reworded(e, f"{e.strerror or e}; {where}")

    def _run_variant(self, v: Variant, index: int) -> None:
        entry = self._entry(v.name)
        entry["status"] = "running"
        self.save()
        per_variant = self.warmup + self.repeats + 1
        done_before = self.progress.done
        label = f"{index + 1}/{len(self.order)} {v.name}"
        start = time.perf_counter()
        model = None
        try:
            self.progress.update(f"{label}: building")
            check_backends(v)
            model, info = self._model(v)
            entry["model"] = info
            model.set_backends(v.backends, fallback=v.fallback)
            entry["plan"] = {"choices": model.plan.as_dict(), "fallback": model.plan.fallback, "text": str(model.plan)}
            work = self._workload(v)
            entry["workload"] = work.describe()
            if v.name == self.config.reference:
                self.results["workload"] = work.describe()

            def tick(what, n):
                self.progress.update(None if what is None else f"{label}: {what}", advance=n)

            if self.training:
                self._measure_training(entry, v, model, work, tick)
            else:
                self._measure_generation(entry, v, model, work, tick)
            self.progress.update(advance=1)
            entry["fallbacks"] = _fallbacks(model)
            entry["status"] = "ok"
            self._say(f"[{index + 1}/{len(self.order)}] {v.name}: " + _one_line(entry))
        except KeyboardInterrupt:
            entry["fallbacks"] = _fallbacks(model) if model is not None else []
            raise
        except Exception as e:  # out of memory, unsupported call in strict mode, a kernel bug: record, go on
            entry["status"] = "failed"
            entry["error"] = f"{type(e).__name__}: {e}"
            entry["traceback"] = traceback.format_exc(limit=-12)
            if model is not None:
                entry["fallbacks"] = _fallbacks(model)
            if v.name == self.config.reference:
                self._ref = None
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self._say(f"[{index + 1}/{len(self.order)}] {v.name}: FAILED: {entry['error'].splitlines()[0]}")
            self.progress.update(advance=max(0, done_before + per_variant - self.progress.done))
        finally:
            entry["seconds"] = time.perf_counter() - start
            self.save()

    def _comparable(self, work: Workload) -> tuple[dict | None, str | None]:
        """The reference's stored pass, or why a variant with this workload cannot be compared with it."""
        ref = self._ref
        if ref is None:
            return None, f"not compared: the reference variant {self.config.reference!r} failed"
        if not work.same_prompt(ref["workload"]):
            return None, ("not compared: this architecture gives another prompt (placeholder count or pixel layout) "
                          "than the reference's")
        return ref, None

    def _memory_figures(self, model) -> dict:
        """Peak memory since `self.memory.reset()` (see PeakMemory) and the model's own size."""
        model_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
        device_peak = self.memory.read_mib()
        return {"model_mib": model_mib, "device_peak_mib": device_peak,
                "peak_memory_mib": self.memory.variant_peak_mib(model_mib, device_peak),
                "process_max_rss_mib": self.memory.process_max_rss_mib()}

    def _measure_generation(self, entry: dict, v: Variant, model, work: Workload, tick) -> None:
        self.memory.reset()
        figures, tokens = measure_timings(model, work, self.clock, self.warmup, self.repeats, tick,
                                          cuda_graph=v.cuda_graph)
        figures.update(self._memory_figures(model))
        figures["launches_per_decode_step"] = decode_step_launches(model, work, v.cuda_graph)
        entry["figures"] = figures
        tick(f"comparing with {self.config.reference}", 0)
        entry["comparison"] = self._compare(v, model, work, tokens)

    def _measure_training(self, entry: dict, v: Variant, model, work: Workload, tick) -> None:
        """Steps at the initial weights (timed; peak memory over them), the gradient comparison, then the loss
        curve; the shared model comes back unchanged."""
        run = self.config.run
        batch = training_batch(work, model.cfg)
        with training(model, v.gradient_checkpointing):
            self.memory.reset()
            figures, grads = measure_steps(model, batch, self.clock, self.warmup, self.repeats, tick)
            figures.update(self._memory_figures(model))
            entry["figures"] = figures
            grads = whole_gradients(model, grads)  # tp > 1: on rank 0 only, None elsewhere
            entry["comparison"] = self._compare_training(v, work, figures["loss"], grads)
            del grads  # the reference's are kept in self._ref
            tick(f"loss curve ({run.train_steps} AdamW steps)", 0)
            figures["loss_curve"] = loss_curve(model, batch, run.train_steps, run.learning_rate)

    def _compare_training(self, v: Variant, work: Workload, loss: float, grads) -> dict | None:
        """The comparison with the reference's gradients and loss; None on a rank without whole gradients (tp > 1,
        not rank 0: rank 0 compares, and writes the results)."""
        if grads is None:
            return None
        ref_name = self.config.reference
        if v.name == ref_name:
            self._ref = {"grads": grads, "loss": loss, "workload": work}
            return {"compared_to": ref_name, "grad_rel_err": 0.0, "grad_rel_err_param": None, "loss_abs_err": 0.0,
                    "note": "the reference"}
        ref, why_not = self._comparable(work)
        if why_not:
            return {"compared_to": None, "note": why_not}
        out = compare_gradients(grads, ref["grads"])
        if "note" in out:
            return out
        return {"compared_to": ref_name, **out, "loss_abs_err": abs(loss - ref["loss"]),
                "note": "gradients of one step at the same initial weights"}

    def _compare(self, v: Variant, model, work: Workload, tokens: torch.Tensor) -> dict:
        ref_name = self.config.reference
        if v.name == ref_name:
            ref_tokens, ref_logits = _generation_pass(model, work, keep_logits=True, cuda_graph=v.cuda_graph)
            self._ref = {"tokens": ref_tokens, "logits": ref_logits, "workload": work}
            return {"compared_to": ref_name, "logits_rel_err": 0.0, "logits_max_err": 0.0, "token_agreement": 1.0,
                    "first_divergence": None, "note": "the reference", "deterministic":
                        bool(torch.equal(tokens, ref_tokens))}
        ref, why_not = self._comparable(work)
        if why_not:
            return {"compared_to": None, "note": why_not}
        if model.cfg.text.vocab_size != ref["logits"].shape[-1]:
            return {"compared_to": None, "note": f"not compared: vocabulary {model.cfg.text.vocab_size} vs "
                                                 f"{ref['logits'].shape[-1]} in the reference"}
        _, logits = _generation_pass(model, work, forced=ref["tokens"], keep_logits=True, cuda_graph=v.cuda_graph)
        out = {"compared_to": ref_name, **compare(tokens, logits, ref["tokens"], ref["logits"])}
        out["note"] = "teacher-forced logits, free-running tokens"
        return out


def _config_diff(cfg, base) -> dict[str, Any]:
    """Dotted names and values of the fields where `cfg` differs from `base`."""
    out = {}
    for prefix, a, b in (("", cfg, base), ("text.", cfg.text, base.text), ("vision.", cfg.vision, base.vision)):
        for f in fields(a):
            if f.name not in ("text", "vision") and getattr(a, f.name) != getattr(b, f.name):
                out[prefix + f.name] = getattr(a, f.name)
    return out


def _fallbacks(model) -> list[dict]:
    seen, out = set(), []
    for f in model.fallbacks:
        key = (f.operator, f.requested, f.used, f.call, f.reasons)
        if key not in seen:
            seen.add(key)
            out.append({"operator": f.operator, "requested": f.requested, "used": f.used, "call": f.call,
                        "reasons": list(f.reasons)})
    return out


def _one_line(entry: dict) -> str:
    f, c = entry["figures"] or {}, entry["comparison"] or {}
    parts = []
    if f.get("step_ms"):
        parts.append(f"step {f['step_ms']['median']:.1f} ms")
    if f.get("loss") is not None:
        parts.append(f"loss {f['loss']:.4f}")
    if c.get("grad_rel_err") is not None:
        parts.append(f"grad rel err {c['grad_rel_err']:.2e}")
    if f.get("prefill_ms"):
        parts.append(f"prefill {f['prefill_ms']['median']:.1f} ms")
    if f.get("decode_tok_s"):
        parts.append(f"decode {f['decode_tok_s']['median']:.1f} tok/s")
    if c.get("logits_rel_err") is not None:
        parts.append(f"rel err {c['logits_rel_err']:.2e}")
    if entry["fallbacks"]:
        parts.append(f"{len(entry['fallbacks'])} fallbacks")
    return ", ".join(parts)


def _interrupt_once(signum, frame):
    """A worker's handler of SIGTERM (the parent stopping it) and SIGINT (Ctrl-C, or its parent's death): the
    first raises KeyboardInterrupt, so rank 0 writes what was measured; the ones after it, while it writes, are
    ignored (the parent's SIGKILL after its grace period still ends a worker that does not finish)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt(f"signal {signum}")


def _ablate_worker(config: AblationConfig, run_dir: str, options: dict) -> None:
    """One rank of a tp > 1 ablation started by `qvl.parallel.launch.run_workers`: the same ablation as every
    other rank, rank 0 writing it into `run_dir`."""
    signal.signal(signal.SIGTERM, _interrupt_once)
    signal.signal(signal.SIGINT, _interrupt_once)
    AblationRun(config, run_dir=run_dir, **options).execute()


def run_ablation(config: AblationConfig, **kwargs) -> dict:
    """Run and return the results (also in results/<name>/<timestamp>/results.json)."""
    return AblationRun(config, **kwargs).execute()


__all__ = ["AblationRun", "check_backends", "run_ablation", "resolve_device", "write_json", "compare"]
