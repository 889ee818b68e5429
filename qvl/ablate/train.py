"""Train mode: what one training step of a variant costs, and how its gradients and loss curve compare.

Per variant (the batch is the workload's prompt, its labels `training_labels`):
  step_ms        forward with labels (loss included) + backward of the batch; warm-up runs first, then
                 `repeats` timed ones, the gradients cleared between them, outside the timed region
  tokens_per_s   tokens in the batch (batch x prompt length) / step time
  loss           the loss of the first step, at the initial weights
  grad_rel_err   max over parameters of ||g - g_ref|| / ||g_ref|| (float32) against the reference variant's
                 gradients of the same step, with the parameter where it is worst
  loss_curve     the loss before each of `train_steps` AdamW steps from the initial weights (its first point is
                 `loss`)
Under tensor parallelism (a model with `parallel`) each rank times the same steps on its piece of the model; the
loss is the same on every rank, and `whole_gradients` gathers the gradient pieces on rank 0 into tp 1's whole
gradients, which rank 0 compares. The loss curve's AdamW updates each rank's piece: elementwise, they are tp 1's
updates split.
The model is shared between variants: `training` gives it back in its train/eval mode and checkpointing, with
no gradients left on it, and `weights_restored` puts back the weights the loss curve changed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

from ..backends import IGNORE_INDEX
from ..parallel.shard import assemble, split_style
from .measure import Clock, summarize
from .workload import Workload, training_labels

Grads = dict[str, torch.Tensor]  # parameter name -> its gradient (zeros where backward left none)


def training_batch(work: Workload, cfg) -> dict:
    """The forward's keyword arguments for one training step: the workload's inputs and their labels."""
    inputs = work.inputs
    return {**inputs, "labels": training_labels(inputs["input_ids"], cfg, inputs.get("attention_mask"))}


def counted_tokens(labels: torch.Tensor) -> int:
    """Targets the loss counts: labels after the first position (the model shifts them) that are not ignored."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


@contextmanager
def training(model, gradient_checkpointing: bool) -> Iterator[None]:
    """The model in train mode, with the variant's gradient checkpointing and autograd on (the runner measures
    under no_grad). Afterwards its mode and checkpointing are as before and no gradients are left on it."""
    was_training, was_checkpointing = model.training, model.is_gradient_checkpointing
    model.train()
    model.set_gradient_checkpointing(gradient_checkpointing)
    try:
        with torch.enable_grad():
            yield
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
        model.set_gradient_checkpointing(was_checkpointing)


@contextmanager
def weights_restored(model) -> Iterator[None]:
    """Whatever happens inside to the weights (optimizer steps), afterwards they are exactly the ones before."""
    saved = [p.detach().clone() for p in model.parameters()]
    try:
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(model.parameters(), saved, strict=True):
                p.copy_(s)


def _step(model, batch: dict) -> torch.Tensor:
    """Forward with labels and backward: the gradients accumulate on the parameters; returns the loss."""
    loss = model(**batch).loss
    loss.backward()
    return loss


def measure_steps(model, batch: dict, clock: Clock, warmup: int, repeats: int,
                  tick: Callable[[str | None, int], None]) -> tuple[dict, Grads]:
    """Warm-up then timed steps at the model's current weights (nothing is updated); `tick(label or None, steps
    done)` reports progress. Returns the figures and the gradients of the last step, by parameter name."""
    times, first_loss = [], None
    for i in range(warmup + repeats):
        timed = i >= warmup
        tick(f"step {i - warmup + 1}/{repeats}" if timed else f"warm-up {i + 1}/{warmup}", 0)
        model.zero_grad(set_to_none=True)
        loss, ms = clock.time(lambda: _step(model, batch))
        if first_loss is None:
            first_loss = loss.item()
        if timed:
            times.append(ms)
        tick(None, 1)
    grads = {name: torch.zeros_like(p) if p.grad is None else p.grad for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)  # the tensors live on in `grads`, not on the shared model
    tokens = batch["input_ids"].numel()
    figures = {"step_ms": summarize(times),
               "tokens_per_s": summarize([tokens / (ms / 1e3) for ms in times if ms > 0]),
               "tokens": tokens, "counted_tokens": counted_tokens(batch["labels"]), "loss": first_loss}
    return figures, grads


def whole_gradients(model, grads: Grads) -> Grads | None:
    """The whole gradients, as at tp 1: `grads` itself for a model in one process. Under tensor parallelism each
    rank's split gradients are gathered on rank 0 and put in place (`qvl.parallel.shard.assemble`), and
    replicated parameters keep rank 0's own (the same whole gradient on every rank); the other ranks get None.
    Every rank calls it: one gather per split parameter, in the model's order."""
    parallel = model.parallel
    if parallel is None:
        return grads
    vision, whole = model.vision_parallel, {}
    for name, grad in grads.items():
        if split_style(name, vision) == "replicated":
            whole[name] = grad
            continue
        pieces = [torch.empty_like(grad) for _ in range(parallel.size)] if parallel.rank == 0 else None
        dist.gather(grad.contiguous(), pieces, group=parallel.group, group_dst=0)
        if pieces is not None:
            whole[name] = assemble(name, pieces, model.cfg, vision)
    return whole if parallel.rank == 0 else None


def loss_curve(model, batch: dict, steps: int, learning_rate: float) -> list[float]:
    """The loss before each of `steps` AdamW updates on the batch; the weights are restored afterwards."""
    with weights_restored(model):
        optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
        losses = []
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            losses.append(_step(model, batch).item())
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return losses


def _relative_error(grad: torch.Tensor, ref: torch.Tensor) -> float:
    """||g - g_ref|| / ||g_ref|| in float32 (0 when both are zero, inf when only the reference's is)."""
    r = ref.float()
    diff, norm = (grad.float() - r).norm().item(), r.norm().item()
    if norm == 0:
        return 0.0 if diff == 0 else math.inf
    return diff / norm


def compare_gradients(grads: Grads, ref_grads: Grads) -> dict:
    """The worst parameter's relative gradient error against the reference's (nan first: a gradient that is
    not a number is the worst there is), and that parameter's name; a note instead when the parameters differ
    (names or shapes: an architecture override)."""
    if set(grads) != set(ref_grads) or any(grads[n].shape != g.shape for n, g in ref_grads.items()):
        return {"compared_to": None, "note": "not compared: this architecture has other parameters than the "
                                             "reference's"}
    worst, worst_name = 0.0, None  # no name when every gradient equals the reference's
    for name, ref in ref_grads.items():
        err = _relative_error(grads[name], ref)
        if err > worst or math.isnan(err):
            worst, worst_name = err, name
            if math.isnan(err):
                break
    return {"grad_rel_err": worst, "grad_rel_err_param": worst_name}


__all__ = ["compare_gradients", "counted_tokens", "loss_curve", "measure_steps", "training", "training_batch",
           "weights_restored", "whole_gradients"]
