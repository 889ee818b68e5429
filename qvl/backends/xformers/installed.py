"""What of xFormers is installed and can run on this machine: `STATUS` (the reasons) and `XF` (its modules).

The whole backend needs xFormers installed and a CUDA device. Without its compiled extension xFormers'
attention refuses every CUDA input ("xFormers wasn't build with CUDA support"), so attention is then
unsupported with xFormers' own explanation, while rms_norm, rope_padded (Triton) and swiglu still run.
rms_norm and rope_padded are Triton kernels, which xFormers switches off by itself in some cases
(`_triton_problem` says which).

`STATUS` and `XF` are worked out once, when this module is imported. They live here only: every other module of
the backend reads them as `installed.STATUS` / `installed.XF` when a call comes, so replacing them here (a test's
monkeypatch, or `STATUS, XF = load()` again) reaches every operator.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import re
import types
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Status:
    """Why parts of xFormers cannot run here; None fields are fine."""

    version: str = ""
    missing: str | None = None  # xformers not installed, or its Python package failed to import
    extension: str | None = None  # its compiled extension did not load: xFormers' own explanation
    cuda: str | None = None  # no CUDA device
    triton: str | None = None  # xFormers' Triton kernels (rms_norm, rope_padded) are disabled


def one_line(text: object) -> str:
    return re.sub(r"\s+", " ", str(text)).strip()


def _import_xformers() -> tuple[types.SimpleNamespace | None, str | None]:
    """Import the pieces of xFormers this backend uses; (None, reason) when that fails.

    xFormers logs a multi-line warning when its extension does not load; it is silenced during the import
    because the same explanation becomes this backend's reason (see `extension_problem`).
    """
    try:
        with _quiet_xformers_log():
            xformers = importlib.import_module("xformers")
            xops = importlib.import_module("xformers.ops")
            mods = types.SimpleNamespace(
                xformers=xformers, ops=xops,
                fmha=importlib.import_module("xformers.ops.fmha"),
                attn_bias=importlib.import_module("xformers.ops.fmha.attn_bias"),
                rmsnorm=importlib.import_module("xformers.ops.rmsnorm"),
            )
    except ModuleNotFoundError as e:
        if e.name == "xformers":
            return None, "xformers is not installed (pip install xformers)"
        return None, f"xformers failed to import: {type(e).__name__}: {e}"
    except Exception as e:  # a broken install must become a reason, never an import error of qvl
        return None, f"xformers failed to import: {type(e).__name__}: {one_line(e)}"
    return mods, None


@contextlib.contextmanager
def _quiet_xformers_log():
    xf_log = logging.getLogger("xformers")
    level = xf_log.level
    xf_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        xf_log.setLevel(level)


def extension_problem(mods: types.SimpleNamespace) -> str | None:
    """xFormers' own explanation when its compiled extension (xformers/_C) did not load, else None.

    The only place qvl reads private names of xFormers: it keeps the exception that stopped its extension
    from loading in `xformers._cpp_lib._cpp_library_load_exception` (and the outcome in
    `xformers._has_cpp_library`) and offers no public way to read either. Both are read defensively: a
    release without them reads as "the extension loaded", and the attention support check (public API)
    still refuses what cannot run.
    """
    xformers = mods.xformers
    cpp_lib = getattr(xformers, "_cpp_lib", None)
    exc = getattr(cpp_lib, "_cpp_library_load_exception", None)
    if exc is None:
        if getattr(xformers, "_has_cpp_library", True):
            return None
        return "xformers' compiled extension did not load (xformers._has_cpp_library is False)"
    detail = one_line(exc)
    cause = exc.__cause__
    if cause is not None and one_line(cause) not in detail:
        detail += f" [{type(cause).__name__}: {one_line(cause)}]"
    return f"xformers' compiled extension did not load: {detail}"


def _cuda_problem() -> str | None:
    if torch.cuda.is_available():
        return None
    cpu_only = torch.version.cuda is None and torch.version.hip is None
    why = f"torch {torch.__version__} is built without CUDA" if cpu_only else "torch sees no GPU"
    return f"no CUDA device ({why}): xformers' kernels run on GPUs only"


def _triton_problem(cuda: str | None) -> str | None:
    """Why xFormers' Triton kernels (rms_norm, rope_padded) are disabled here, else None.

    xFormers' own conditions, restated so the reason can say which one holds; its verdict, from its public
    feature report, is asked last.
    """
    if os.environ.get("XFORMERS_ENABLE_TRITON", "0") == "1":
        return None
    if cuda is not None:
        return cuda
    if os.environ.get("XFORMERS_FORCE_DISABLE_TRITON", "0") == "1":
        return "XFORMERS_FORCE_DISABLE_TRITON=1 disables xformers' Triton kernels (rms_norm, rope_padded)"
    capability = torch.cuda.get_device_capability()
    if capability < (8, 0):
        return (f"xformers enables its Triton kernels (rms_norm, rope_padded) only on compute capability >= 8.0; "
                f"this GPU has {capability[0]}.{capability[1]}")
    try:
        importlib.import_module("triton")
    except Exception as e:
        return f"xformers' Triton kernels (rms_norm, rope_padded) need triton, which failed to import: {e}"
    if _features().get("is_triton_available", "True") == "False":
        return "xformers.info says is_triton_available False: its Triton kernels (rms_norm, rope_padded) are disabled"
    return None


def _features() -> dict[str, str]:
    """xFormers' public feature report (what `python -m xformers.info` prints); {} where it cannot be read."""
    try:
        with _quiet_xformers_log():
            return dict(importlib.import_module("xformers.info").get_features_status())
    except Exception as e:
        logging.getLogger("qvl.backends").debug("xformers.info.get_features_status() failed: %s", e)
        return {}


def load() -> tuple[Status, types.SimpleNamespace | None]:
    """Import xFormers and work out what of it can run on this machine."""
    mods, missing = _import_xformers()
    if mods is None:
        return Status(missing=missing), None
    cuda = _cuda_problem()
    return Status(version=str(getattr(mods.xformers, "__version__", "?")), extension=extension_problem(mods),
                  cuda=cuda, triton=_triton_problem(cuda)), mods


STATUS, XF = load()


def availability() -> list[str]:
    """Reasons no operator of this backend can run here."""
    if STATUS.missing:
        return [STATUS.missing]
    if STATUS.cuda:  # nothing runs; the extension's state is worth knowing all the same
        return [STATUS.cuda] + ([STATUS.extension] if STATUS.extension else [])
    return []


def note() -> str:
    """Shown by `qvl backends` next to 'ok' when only some operators are off."""
    off = []
    if STATUS.extension:
        off.append("attention off: compiled extension not loaded")
    if STATUS.triton:
        off.append("norm/rope/cache off: Triton kernels disabled")
    return "; ".join(off)
