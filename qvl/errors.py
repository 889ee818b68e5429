"""The exceptions qvl raises for what it is given: each names what is wrong and where, in one line.

All subclass `QvlError`, itself a `ValueError`, so code written against plain `ValueError` keeps working. The
CLI prints them as ``qvl: error: <message>`` and exits with their `exit_status`: 2 when what the user gave is
wrong (a file, a config, an argument, an input), 1 when the run itself failed (non-finite numbers met midway,
work that would not fit this machine). README "Errors" lists them.
"""

from __future__ import annotations


class QvlError(ValueError):
    """Something qvl was given cannot be used; the message names what, where, and the value."""

    exit_status = 2


class CheckpointError(QvlError):
    """A checkpoint folder or file that cannot be read as a Qwen2.5-VL / Qwen2-VL checkpoint: a missing,
    truncated, malformed or out-of-folder file, an unexpected tensor, or non-finite weights."""


class ConfigError(QvlError):
    """A model or ablation config that breaks its schema: a wrong type, a size out of range, fields that
    contradict each other; the message names the file (where there is one), the field and what is allowed."""


class InputError(QvlError):
    """An input to the model, the processor or generation that cannot be used: token ids, pixels, positions,
    a cache, sampling or generation arguments, prompt text."""


class MediaError(InputError):
    """An image or video that cannot be decoded or has no usable frames; the message names the file."""


class ResultsError(QvlError):
    """Stored ablation results that cannot be read back: not a results folder, another schema, not UTF-8."""


class ResourceError(QvlError):
    """Work that would not fit this machine: the estimate of what it needs next to what is there."""

    exit_status = 1


class NonFiniteError(QvlError):
    """NaN or infinity met where the computation cannot go on (logits during generation)."""

    exit_status = 1


__all__ = ["QvlError", "CheckpointError", "ConfigError", "InputError", "MediaError", "ResultsError",
           "ResourceError", "NonFiniteError"]


def one_line(e: BaseException | str) -> str:
    """An exception's message (or a text) on one line: its lines joined by '; ' (list bullets dropped)."""
    lines = [line.strip().removeprefix("- ") for line in str(e).splitlines()]
    return "; ".join(line for line in lines if line) or type(e).__name__
