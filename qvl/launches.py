"""Counting the device work a piece of model code launches: aten ops dispatched and Triton kernels launched.

At batch 1 the model is bound by launching work, not by running it, so the number of launches per decode
step is what a backend mix costs the host. The count is the same on a CPU as on a GPU (each aten compute op
is one kernel there), so it is a deterministic figure: the benchmarks' regression check holds it exactly and
the ablation runner reports it per variant.

    with LaunchCounter().counting() as launches:
        model.decode_step(tokens, prompt, cache)
    launches.total, launches.aten, launches.triton
"""

from __future__ import annotations

import contextlib

from torch.utils._python_dispatch import TorchDispatchMode


class LaunchCounter(TorchDispatchMode):
    """Counts device work items: aten ops dispatched and Triton kernel launches.

    On a GPU each aten compute op is (at least) one kernel launch; on the CPU the counts are the same by
    construction, so they are deterministic figures the regression check holds exactly. Work done inside
    the Triton interpreter (numpy copies) is not counted: one launch is one launch.
    """

    # Ops that only reinterpret metadata launch nothing.
    FREE = {"view", "_unsafe_view", "reshape", "expand", "permute", "transpose", "t", "unsqueeze", "squeeze",
            "slice", "select", "split", "split_with_sizes", "unbind", "as_strided", "alias", "detach", "chunk",
            "_reshape_alias", "lift_fresh", "empty", "empty_strided", "empty_like", "new_empty", "size", "stride",
            "is_same_size", "sym_size", "sym_stride", "sym_numel", "numel", "dim", "_local_scalar_dense",
            "promote_types", "result_type", "can_cast"}  # dtype arithmetic: no tensor, no kernel

    def __init__(self):
        super().__init__()
        self.aten = 0
        self.triton = 0
        self._inside_kernel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self._inside_kernel and func.__name__.split(".")[0] not in self.FREE:
            self.aten += 1
        return func(*args, **(kwargs or {}))

    def on_triton_launch(self, kernel, grid, args, kwargs) -> None:
        self.triton += 1

    @contextlib.contextmanager
    def counting(self):
        with self, _observe_triton_launches(self):
            yield self

    @property
    def total(self) -> int:
        return self.aten + self.triton


@contextlib.contextmanager
def _observe_triton_launches(counter: LaunchCounter):
    """Tell `counter.on_triton_launch` of every `kernel[grid](...)` launch, compiled or interpreted, and keep
    the aten work the launch itself does (the interpreter's) from the counter's view.

    Compiled, interpreted, autotuned and heuristic kernels all launch through KernelInterface.__getitem__
    (the wrappers then call the inner kernel's run directly), so one patch sees each launch once.
    """
    try:
        from triton.runtime.jit import KernelInterface
    except ImportError:
        yield
        return
    original = KernelInterface.__getitem__

    def getitem(kernel, grid):
        launcher = original(kernel, grid)

        def launch(*args, **kwargs):
            counter.on_triton_launch(kernel, grid, args, kwargs)
            counter._inside_kernel += 1
            try:
                return launcher(*args, **kwargs)
            finally:
                counter._inside_kernel -= 1

        return launch

    KernelInterface.__getitem__ = getitem
    try:
        yield
    finally:
        KernelInterface.__getitem__ = original


__all__ = ["LaunchCounter"]
