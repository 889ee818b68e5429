"""The online softmax both flash-attention kernels run: attention.py (prefill, vision windows) and
decode_attention.py (split-KV decode).

Keys are visited in blocks; per query row the kernel keeps the running maximum m, the running sum l and the
unnormalised output acc, in float32 and in base 2 (the scores are pre-multiplied by scale * log2(e), so exp2
replaces exp):

    s  = q k^T * scale * log2(e)          (hidden keys -> -inf)
    m' = max(m, rowmax(s));  alpha = 2^(m - m');  p = 2^(s - m')
    l  = l * alpha + rowsum(p);  acc = acc * alpha + p v;  m = m'
    out = acc / l                         (0 for a row that saw no key: l == 0)

so no (queries, keys) matrix ever exists. A row with no visible key yet keeps m = -inf; its exponents are then
taken against 0 instead of m' (never -inf - -inf), which leaves p = 0, alpha = 0, l = 0.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # the launchers pass scale * LOG2E: scores come out in base 2


@triton.jit
def online_softmax_step(scores, row_max, row_sum, acc, v, MAY_SEE_NOTHING: tl.constexpr, ACC_IN_DOT: tl.constexpr,
                        INPUT_PRECISION: tl.constexpr):
    """One key block: (BLOCK_M, BLOCK_N) base-2 scores (hidden keys already -inf) and the block's (BLOCK_N, D)
    values update (acc, row_sum, row_max); returns them in that order.

    MAY_SEE_NOTHING: some row may have seen only hidden keys so far (its max is -inf): take its exponents against
    0. A block every row sees in full skips the guard. ACC_IN_DOT: rescale acc and pass it as tl.dot's
    accumulator (acc * alpha + p v in one product) rather than adding a separate product to it. The two forms
    can round differently in the last bits and compile to different code; each kernel keeps its own.
    """
    new_max = tl.maximum(row_max, tl.max(scores, 1))
    if MAY_SEE_NOTHING:
        new_max_ref = tl.where(new_max == float("-inf"), 0.0, new_max)
    else:
        new_max_ref = new_max
    p = tl.math.exp2(scores - new_max_ref[:, None])
    alpha = tl.math.exp2(row_max - new_max_ref)
    row_sum = row_sum * alpha + tl.sum(p, 1)
    if ACC_IN_DOT:
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=INPUT_PRECISION)
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=INPUT_PRECISION)
    return acc, row_sum, new_max

