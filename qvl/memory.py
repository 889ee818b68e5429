"""What fits: a device's free memory, and a check that refuses work with its estimate before allocating it."""

from __future__ import annotations

import os

import torch

from .errors import ConfigError, ResourceError

# Headroom left for activations, the allocator and everything else: work is refused above this share of free memory.
USABLE_SHARE = 0.9


def format_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'; binary units, three significant digits."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _host_available() -> int | None:
    """Bytes the host can still give (MemAvailable, else total physical memory); None where unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def available_bytes(device: torch.device | str = "cpu") -> int | None:
    """Free memory on `device` (CUDA: the driver's free bytes; otherwise the host's available memory), or None
    where it cannot be told (then nothing is refused on its account)."""
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return None
        free, _ = torch.cuda.mem_get_info(device)
        return free
    if device.type == "meta":
        return None
    return _host_available()


def _limit_from_env() -> int | None:
    """QVL_MEMORY_LIMIT as bytes, or None when unset."""
    limit = os.environ.get("QVL_MEMORY_LIMIT", "").strip()
    if not limit:
        return None
    if not limit.isdigit() or int(limit) == 0:
        raise ConfigError(f"QVL_MEMORY_LIMIT must be a positive number of bytes, got {limit!r:.40}")
    return int(limit)


def ensure_fits(what: str, nbytes: int, device: torch.device | str = "cpu") -> None:
    """Raise `ResourceError` when `nbytes` exceeds the usable share of `device`'s free memory, naming `what`
    and both sizes: ``a 72b model's weights need 136 GiB; cpu has 21.3 GiB free``. QVL_MEMORY_LIMIT (bytes)
    overrides the free memory, for tests and shared machines."""
    free = _limit_from_env() or available_bytes(device)
    if free is None or nbytes <= USABLE_SHARE * free:
        return
    raise ResourceError(f"{what} need {format_bytes(nbytes)}; {torch.device(device)} has {format_bytes(free)} free "
                        f"(qvl uses at most {USABLE_SHARE:.0%} of it)")
