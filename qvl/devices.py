"""Devices named by users (CLI flags, processor settings): parsed and checked against this machine once."""

from __future__ import annotations

import torch

from .errors import InputError

# where qvl's models and preprocessing run: others (meta, mps, xla, ...) fail deep inside torch, or hold no data
DEVICE_TYPES = ("cpu", "cuda")


def parse_device(value: str | torch.device, name: str = "device") -> torch.device:
    """`value` as a torch.device, refused as `InputError` naming `name` when torch cannot parse it, it is not a
    CPU or CUDA device, or it is a CUDA device this machine does not have."""
    if not isinstance(value, (str, torch.device)):
        raise InputError(f"{name} must be a device name such as 'cpu' or 'cuda:0', got {value!r:.60}")
    try:
        device = torch.device(value)
    except RuntimeError as e:
        raise InputError(f"{name} {str(value)!r:.60}: {e}") from None
    if device.type not in DEVICE_TYPES:
        raise InputError(f"{name} {str(value)!r:.60}: qvl runs on {' or '.join(DEVICE_TYPES)} devices, not "
                         f"{device.type}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"{name} {str(value)!r}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"{name} {str(value)!r}: this machine has {torch.cuda.device_count()} CUDA devices")
    return device


__all__ = ["parse_device"]
