"""qvl.launches.LaunchCounter: deterministic counts, free metadata ops, one Triton launch counted once."""

import torch

from qvl.launches import LaunchCounter


def test_launch_counter_is_deterministic_and_sees_extra_work():
    x = torch.randn(8, 8)

    def work(extra):
        y = (x @ x).relu()
        if extra:
            y = y * 2
        return y.view(-1).sum()

    counts = []
    for extra in (False, False, True):
        with LaunchCounter().counting() as c:
            work(extra)
        counts.append(c.total)
    assert counts[0] == counts[1] > 0
    assert counts[2] == counts[0] + 1  # the view is free, the extra multiply is one launch
    with LaunchCounter().counting() as c:
        torch.promote_types(torch.bfloat16, torch.float32)  # dtype arithmetic dispatches, but launches nothing
    assert c.total == 0


def test_launch_counter_counts_a_triton_launch_once():
    import triton  # qvl, imported above, has already switched on the interpreter on CPU
    import triton.language as tl

    @triton.jit
    def _double_kernel(x_ptr, n, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        v = tl.load(x_ptr + i, mask=i < n)
        tl.store(x_ptr + i, v * 2, mask=i < n)

    x = torch.ones(5, device="cuda" if torch.cuda.is_available() else "cpu")
    with LaunchCounter().counting() as c:
        _double_kernel[(1,)](x, 5, BLOCK=8)
    assert c.triton == 1 and c.aten == 0
    assert x.tolist() == [2.0] * 5
