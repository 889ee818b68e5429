"""qvl: Qwen2.5-VL with every operator on interchangeable backends (eager, xformers, Triton)."""

from . import _env  # noqa: F401  (first: the Triton interpreter switch must precede any triton import)
from .backends import BackendPlan, BackendUnsupportedError, resolve_plan, use_backends
from .checkpoint import from_config, from_pretrained, save_pretrained
from .config import PRESETS, Qwen25VLConfig, TextConfig, VisionConfig, get_preset, load_hf_config
from .errors import (
    CheckpointError,
    ConfigError,
    InputError,
    MediaError,
    NonFiniteError,
    QvlError,
    ResourceError,
    ResultsError,
)
from .model import Qwen25VL

__version__ = "0.1.0"

__all__ = [
    "from_config", "from_pretrained", "save_pretrained", "Qwen25VL", "Qwen25VLConfig", "TextConfig", "VisionConfig",
    "PRESETS", "get_preset", "load_hf_config", "use_backends", "resolve_plan", "BackendPlan",
    "BackendUnsupportedError", "QvlError", "CheckpointError", "ConfigError", "InputError", "MediaError",
    "ResultsError", "ResourceError", "NonFiniteError",
]
