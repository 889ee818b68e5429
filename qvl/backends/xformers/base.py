"""What every operator of the xformers backend declares: CUDA only; Triton kernels gated by xFormers itself."""

from __future__ import annotations

from ..registry import CallInfo, OpImpl
from . import installed


class XformersOp(OpImpl):
    devices = frozenset({"cuda"})


class TritonKernelOp(XformersOp):
    """rms_norm and rope_padded are xFormers' Triton kernels: off where xFormers disables its Triton kernels."""

    def not_supported_reasons(self, call: CallInfo) -> list[str]:
        reasons = super().not_supported_reasons(call)
        status = installed.STATUS
        if status.triton and not status.cuda:
            reasons.append(status.triton)
        return reasons
