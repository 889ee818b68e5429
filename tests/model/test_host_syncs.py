"""No layer of the model reads a device value back to the host.

On a GPU the host queues kernels ahead of the device; a host read of a device value (`int(t)`, `.item()`,
`bool(t)`, `.tolist()`: aten._local_scalar_dense) or an op whose output size depends on the data (nonzero,
masked_select, unique) waits until everything queued has run. Once per forward that costs little; once per
layer it serialises host and device, so the time becomes host + device instead of the larger of the two
(the 3b vision tower has 32 blocks, the text decoder 36 layers). Preparing the inputs (grids, positions,
padding) may read the host-side copies it needs; the layers themselves must not.

These checks run on the CPU, where the same ops are dispatched: each recorded op would be a sync on a GPU.
On a GPU they also catch copies between host and device inside a layer, which a CPU run cannot show.
"""

import sys

import pytest
import torch

import qvl.backends.interface as interface
from qvl.backends import get_backend
from qvl.demo import demo_prompt
from qvl.launches import LaunchCounter
from qvl.model.qwen2_5_vl import Qwen25VL
from qvl.model.text import DecoderLayer
from qvl.model.vision import PatchEmbed, PatchMerger, VisionBlock, VisionTower
from tests.backends.model_checks import padded_batch, perturbed

BACKENDS = ["eager"] + ([] if get_backend("triton").unavailable_reasons() else ["triton"])
# aten ops that make the host wait for the device: a value read back, or an output sized by the data.
SYNCING_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "unique_consecutive",
               "equal", "is_nonzero",
               "lift_fresh"}  # torch.tensor(host data): on a GPU a copy to the device, which waits like a read
LAYER_CODE = {cls.forward.__code__: cls.__name__ for cls in (VisionBlock, PatchMerger, DecoderLayer)}
# and all of the vision tower's and the prefill's device work, layers or not: what their CUDA graphs capture
# (qvl/model/graphs.py)
LAYER_CODE[VisionTower.encode.__code__] = "VisionTower.encode"
LAYER_CODE[Qwen25VL.prefill_logits.__code__] = "Qwen25VL.prefill_logits"


class SyncRecorder(LaunchCounter):
    """Records each syncing op dispatched inside a layer's forward, with the layer. The ops the Triton
    interpreter runs to execute a kernel are not the model's (on a GPU they do not exist) and are skipped."""

    def __init__(self):
        super().__init__()
        self.syncs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self._inside_kernel and (func.__name__.split(".")[0] in SYNCING_OPS or _crosses_devices(args, kwargs)):
            layer = _enclosing_layer()
            if layer is not None:
                self.syncs.append(f"{func} in {layer}")
        return func(*args, **kwargs)


def _crosses_devices(args, kwargs) -> bool:
    """A copy between host and device (`.to(device)`, `copy_`): only a GPU run can show these, where the host
    copy waits as a read does."""
    devices = {a.device.type for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)}
    if kwargs.get("device") is not None:
        devices.add(torch.device(kwargs["device"]).type)
    return len(devices) > 1


def _enclosing_layer() -> str | None:
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code in LAYER_CODE:
            return LAYER_CODE[frame.f_code]
        frame = frame.f_back
    return None


def _generate_recording_syncs(model, inputs) -> list[str]:
    with SyncRecorder().counting() as recorder:
        model.generate(**inputs, max_new_tokens=2)  # vision tower, prefill and a decode step
    return recorder.syncs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("inputs", ["image", "padded batch"])
def test_layers_read_nothing_back_from_the_device(backend, inputs):
    model = perturbed("tiny", torch.float32)
    model.set_backends(backend)  # strict: every call on the backend
    syncs = _generate_recording_syncs(model, demo_prompt(model.cfg) if inputs == "image" else padded_batch())
    assert syncs == []


PLANTED = {  # what a vision block's attention input check does to cu_seqlens -> the op recorded
    "read": (lambda cu: int(cu[-1]), "aten._local_scalar_dense.default"),  # as one did before host seqlens
    "copy": (lambda cu: cu.to("meta"), "aten._to_copy.default"),  # a CPU -> device copy, with meta as the device
}


@pytest.mark.parametrize("planted", PLANTED)
def test_a_sync_inside_a_layer_is_caught(monkeypatch, planted):
    """The check can fail: a read or copy of cu_seqlens planted in the attention input check is caught in
    every vision block."""
    model = perturbed("tiny", torch.float32, device="cpu")
    touch, op = PLANTED[planted]
    check = interface.check_attention_inputs

    def check_touching_cu_seqlens(q, k, v, mask):
        if isinstance(mask, interface.BlockDiagonalMask):
            touch(mask.cu_seqlens)
        check(q, k, v, mask)

    monkeypatch.setattr(interface, "check_attention_inputs", check_touching_cu_seqlens)
    syncs = _generate_recording_syncs(model, demo_prompt(model.cfg))
    assert syncs == [f"{op} in VisionBlock"] * model.cfg.vision.depth


# (class, method whose first tensor argument a planted read touches, the prompt, where the read is reported)
OUTSIDE_LAYERS = {
    "vision tower": (PatchEmbed, "forward", demo_prompt, "VisionTower.encode"),  # its patch embedding
    "prefill": (Qwen25VL, "logits", padded_batch, "Qwen25VL.prefill_logits"),  # the last position's logits
}


@pytest.mark.parametrize("where", OUTSIDE_LAYERS)
def test_a_sync_outside_the_layers_of_a_captured_part_is_caught(monkeypatch, where):
    """The whole of `VisionTower.encode` and of `Qwen25VL.prefill_logits` is checked, not only their blocks and
    layers: a read planted outside them is caught once, in that part (the decode step's logits are not a captured
    prefill's)."""
    model = perturbed("tiny", torch.float32, device="cpu")
    cls, name, prompt, part = OUTSIDE_LAYERS[where]
    method = getattr(cls, name)

    def reading_a_value(self, *args):
        next(a for a in args if isinstance(a, torch.Tensor))[0, 0].item()
        return method(self, *args)

    monkeypatch.setattr(cls, name, reading_a_value)
    prompt = prompt(model.cfg) if prompt is demo_prompt else prompt()
    syncs = _generate_recording_syncs(model, prompt)
    assert syncs == [f"aten._local_scalar_dense.default in {part}"]


def test_block_diagonal_mask_keeps_its_lengths_on_the_host():
    mask = interface.BlockDiagonalMask.from_seqlens([3, 0, 5, 2])
    assert mask.seqlens == (3, 0, 5, 2) and mask.max_seqlen == 5 and mask.num_tokens == 10
    assert mask.cu_seqlens.tolist() == [0, 3, 3, 8, 10] and mask.cu_seqlens.dtype == torch.int32
    empty = interface.BlockDiagonalMask.from_seqlens([])
    assert empty.max_seqlen == 0 and empty.num_tokens == 0
    with pytest.raises(ValueError, match=r"segment lengths must be >= 0, got \[3, -1\]"):
        interface.BlockDiagonalMask.from_seqlens([3, -1])


def test_attention_checks_the_sequence_against_the_mask():
    q = torch.randn(1, 7, 2, 8)
    mask = interface.BlockDiagonalMask.from_seqlens([3, 5])
    with pytest.raises(ValueError, match="the mask's segments hold 8 tokens, but the sequence has 7"):
        interface.check_attention_inputs(q, q, q, mask)
