"""Process-wide setup that must happen before triton is imported by anyone (torch imports it lazily).

On a machine without a CUDA device the triton backend runs through the Triton interpreter, which has to
be switched on before triton's own `@triton.jit` library functions are created, i.e. before the first
`import triton` anywhere in the process. qvl does that here, as the first thing `import qvl` runs.
"""

from __future__ import annotations

import os
import sys

import torch  # does not import triton

HAS_CUDA = torch.cuda.is_available()
# triton imported before qvl, with the interpreter off, on a machine that needs it: cannot be repaired.
TRITON_IMPORTED_TOO_EARLY = (not HAS_CUDA and "triton" in sys.modules
                             and os.environ.get("TRITON_INTERPRET", "0") != "1")
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
