"""The LM head fused with cross-entropy (the `loss` operator), forward + backward: the training step's last layer.

The eager backend builds the whole (tokens x vocabulary) logits; triton walks the tokens in chunks and never
holds them. Peers on a GPU: Liger-Kernel's fused linear cross-entropy, and torch.compile of the eager operator.
"""

import pytest
import torch

from benchmarks import harness
from qvl.backends import IGNORE_INDEX, get_backend

DT = torch.bfloat16 if harness.CUDA else torch.float32
# (tokens, hidden, vocabulary): a 3b training batch against Qwen2.5-VL's vocabulary; tiny on the CPU
SHAPES = [(4096, 2048, 151936)] if harness.FULL else [(32, 64, 1000)]
OPS = harness.backend_ops("loss")


def peers():
    if not harness.CUDA:
        return {}
    out = {"torch.compile": torch.compile(lambda h, w, t: get_backend("eager").impls["loss"](h, w, t)[0])}
    if (liger := harness.optional("liger_kernel.ops.fused_linear_cross_entropy")) is not None:
        out["liger"] = lambda h, w, t: liger.LigerFusedLinearCrossEntropyFunction.apply(h, w, t)[0]
    return out


def loss_of(ops):
    """The operator's loss alone (its logits, when a backend returns them, are not part of the step)."""
    return lambda h, w, t: ops.loss(h, w, t)[0]


def impls():
    return {f"qvl[{spec}]": loss_of(ops) for spec, ops in OPS.items()} | peers()


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("impl", list(impls()))
def test_loss_backward(measure, impl, shape):
    tokens, hidden, vocab = shape
    dev = harness.DEVICE
    h = torch.randn(tokens, hidden, device=dev, dtype=DT)
    w = torch.randn(vocab, hidden, device=dev, dtype=DT) * hidden**-0.5
    targets = torch.randint(0, vocab, (tokens,), device=dev)
    targets[: tokens // 4] = IGNORE_INDEX  # a prompt's share of ignored positions
    fn = impls()[impl]
    measure(harness.forward_backward(fn, h, w, targets), flops=3 * 2 * tokens * hidden * vocab)
