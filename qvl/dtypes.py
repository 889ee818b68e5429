"""The floating-point dtypes qvl computes in, by the names configs, the CLI and reports use. One home for both."""

from __future__ import annotations

import torch

# name -> dtype, in the order CLI choices and docs list them
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
FLOAT_DTYPES: frozenset[torch.dtype] = frozenset(DTYPES.values())


def dtype_name(dtype: torch.dtype) -> str:
    """'bfloat16' for torch.bfloat16 (any dtype, not only the supported ones)."""
    return str(dtype).removeprefix("torch.")
