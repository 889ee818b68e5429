from .qwen2_5_vl import Prompt, Qwen25VL
from .cache import StaticKVCache

__all__ = ["Qwen25VL", "Prompt", "StaticKVCache"]
