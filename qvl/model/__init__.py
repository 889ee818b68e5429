from .cache import StaticKVCache
from .qwen2_5_vl import Prompt, Qwen25VL

__all__ = ["Qwen25VL", "Prompt", "StaticKVCache"]
