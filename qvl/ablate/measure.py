"""Measuring: timers (CUDA events on a GPU, perf_counter on a CPU), peak memory, spread, progress, versions."""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch


class Clock:
    """Times a callable in milliseconds. On CUDA: events around it, then a wait for the end event."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.method = "CUDA events" if self.cuda else "time.perf_counter"

    def time(self, fn: Callable[[], Any]) -> tuple[Any, float]:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            end.synchronize()
            return out, start.elapsed_time(end)
        start = time.perf_counter()
        out = fn()
        return out, (time.perf_counter() - start) * 1e3


class PeakMemory:
    """Peak allocated memory over a variant. CUDA: torch.cuda.max_memory_allocated (weights, activations,
    KV cache). CPU: not measured, since torch's CPU allocator is invisible to tracemalloc and the process
    RSS peak never goes down; the process's max RSS so far is recorded next to it, labelled as such.

    The device peak counts everything resident, and an ablation keeps other models resident while a variant
    runs (the base model its weights were copied from, a model in another dtype still needed later). So
    `reset` notes what is allocated when the variant starts, and `variant_peak_mib` reports the variant's
    own need: its weights plus the most its runs allocated on top."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.method = ("torch.cuda.max_memory_allocated above what was resident at the variant's start, plus "
                       "the variant's weights" if self.cuda else
                       "not measured on CPU (process max RSS so far is recorded as process_max_rss_mib)")
        self.resident_mib = 0.0

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.resident_mib = torch.cuda.memory_allocated(self.device) / 2**20

    def read_mib(self) -> float | None:
        """The device's peak since `reset`, everything resident included."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return None

    def variant_peak_mib(self, weights_mib: float, device_peak_mib: float | None) -> float | None:
        """The variant's own peak from the device's (`read_mib`): its weights plus its runs' largest
        allocation above the start."""
        return None if device_peak_mib is None else weights_mib + device_peak_mib - self.resident_mib

    @staticmethod
    def process_max_rss_mib() -> float | None:
        try:
            import resource
        except ImportError:  # pragma: no cover - Windows
            return None
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


def summarize(samples: list[float]) -> dict[str, Any] | None:
    """Median and spread of repeated measurements."""
    if not samples:
        return None
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "n": len(samples),
            "samples": list(samples)}


class Progress:
    """A one-line progress bar on stderr; silent when stderr is not a terminal or when disabled."""

    def __init__(self, total: int, enabled: bool | None = None, stream=None):
        self.stream = stream or sys.stderr
        if enabled is None:
            enabled = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.enabled, self.total, self.done, self.label = enabled, max(total, 1), 0, ""
        self.start = time.monotonic()

    def update(self, label: str | None = None, advance: int = 0) -> None:
        self.done = min(self.total, self.done + advance)
        if label is not None:
            self.label = label
        if not self.enabled:
            return
        width = 24
        filled = int(width * self.done / self.total)
        elapsed = time.monotonic() - self.start
        line = (f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
                f"{int(elapsed // 60):02d}:{int(elapsed % 60):02d} {self.label}")
        columns = shutil.get_terminal_size((100, 20)).columns
        self.stream.write(line[: columns - 1].ljust(columns - 1))
        self.stream.flush()

    def message(self, text: str) -> None:
        """A line above the bar."""
        if self.enabled:
            columns = shutil.get_terminal_size((100, 20)).columns
            self.stream.write("\r" + " " * (columns - 1) + "\r")
        self.stream.write(text + "\n")
        self.stream.flush()
        self.update()

    def close(self) -> None:
        if self.enabled:
            columns = shutil.get_terminal_size((100, 20)).columns
            self.stream.write("\r" + " " * (columns - 1) + "\r")
            self.stream.flush()


def _package_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def git_commit() -> dict[str, Any]:
    """The commit of the qvl source tree, and whether it had uncommitted changes."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": None}
    return {"commit": commit or "unknown", "dirty": bool(dirty) if commit else None}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device, clock: Clock, memory: PeakMemory) -> dict[str, Any]:
    from .. import __version__

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{cpu_name()} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _package_version("triton"),
        "xformers": _package_version("xformers"),
        "qvl": __version__,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "platform": platform.platform(),
        "device": str(device),
        "device_name": name,
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
        "git": git_commit(),
        "timer": clock.method,
        "peak_memory": memory.method,
    }


__all__ = ["Clock", "PeakMemory", "Progress", "environment", "git_commit", "summarize"]
