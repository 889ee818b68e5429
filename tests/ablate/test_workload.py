"""Ablation inputs: processor-style sizing, patch order the vision tower expects, prompts the model accepts."""

import builtins

import pytest
import torch

import qvl
from qvl.ablate.config import ImageSpec, VideoSpec, WorkloadSpec
from qvl.ablate.workload import CLIP_MEAN, CLIP_STD, build_workload, normalize, patchify, smart_resize
from qvl.config import get_preset
from qvl.model.positions import vision_rope_positions
from tests.backends.model_checks import logits

TINY = get_preset("tiny")


@pytest.mark.parametrize("size, expected", [
    ((224, 336), (224, 336)),       # already multiples of 28
    ((100, 150), (112, 140)),       # rounded to the nearest multiple
    ((30, 30), (56, 56)),           # below min_pixels (56 x 56): scaled up
    ((10000, 10000), (3556, 3556)),  # above max_pixels: scaled down (floor), area within bounds
    ((12, 1200), (28, 560)),         # a side rounding to 0: the area rule scales both up
])
def test_smart_resize(size, expected):
    h, w = smart_resize(*size, max_pixels=12845056)  # the published checkpoints' preprocessor_config.json
    assert (h, w) == expected
    assert h % 28 == 0 and w % 28 == 0 and 56 * 56 <= h * w <= 12845056


def test_smart_resize_refuses_extreme_aspect_ratio():
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(28, 28 * 201)


def test_patch_rows_follow_the_vision_towers_order():
    """Each row holds the pixels of the patch at the (h, w) the tower's rotary positions give that row."""
    t, h, w, p = 2, 4 * 14, 6 * 14, 14
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    frames = torch.stack([ys.float(), xs.float(), torch.zeros(h, w)]).expand(t, 3, h, w)
    frames = frames + torch.arange(t).view(t, 1, 1, 1) * 1000  # channel 2 carries the frame index
    rows, grid = patchify(frames.clone(), TINY)
    assert grid == (1, 4, 6) and rows.shape == (24, TINY.vision.patch_dim)
    pos = vision_rope_positions(torch.tensor([grid]), TINY.vision.spatial_merge_size)
    cube = rows.view(24, 3, 2, p, p)  # (channel, temporal, y, x), the patch embedding kernel's layout
    for r in range(24):
        assert int(cube[r, 0, 0, 0, 0]) == pos[0, r] * p and int(cube[r, 1, 0, 0, 0]) == pos[1, r] * p
        assert torch.equal(cube[r, 0, 0, :, 0] - cube[r, 0, 0, 0, 0], torch.arange(p).float())  # rows within patch
        assert torch.equal(cube[r, 1, 0, 0, :] - cube[r, 1, 0, 0, 0], torch.arange(p).float())  # columns
        assert int(cube[r, 2, 1, 0, 0]) - int(cube[r, 2, 0, 0, 0]) == 1000  # temporal patch = consecutive frames


def test_image_is_one_frame_repeated_and_normalized():
    img = torch.rand(1, 3, 56, 56)
    rows, grid = patchify(normalize(img), TINY)
    assert grid == (1, 4, 4)
    cube = rows.view(-1, 3, 2, 14, 14)
    assert torch.equal(cube[:, :, 0], cube[:, :, 1])
    mean, std = torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD)
    assert torch.allclose(normalize(torch.ones(1, 3, 1, 1)).flatten(), (1 - mean) / std)


def test_workload_prompt_matches_the_grids_and_runs():
    spec = WorkloadSpec(images=(ImageSpec(size=(56, 84)), ImageSpec(size=(112, 112))),
                        videos=(VideoSpec(size=(56, 56), frames=3, fps=4.0),), prompt_tokens=6, decode_tokens=2,
                        batch_size=2, seed=1)
    work = build_workload(spec, TINY)
    x = work.inputs
    assert x["image_grid_thw"].tolist() == [[1, 4, 6], [1, 8, 8]] * 2
    assert x["video_grid_thw"].tolist() == [[2, 4, 4]] * 2  # 3 frames padded to 4: 2 temporal patches
    assert x["second_per_grid_ts"].tolist() == [0.5, 0.5]
    ids = x["input_ids"]
    assert ids.shape == (2, work.prompt_length)
    assert ((ids == TINY.image_token_id).sum(1) == (24 + 64) // 4).all()
    assert ((ids == TINY.video_token_id).sum(1) == 32 // 4).all()
    assert work.vision_tokens == (24 + 64 + 32) // 4 and work.text_tokens == 6
    assert work.prompt_length == 6 + work.vision_tokens + 2 * 3
    assert not torch.equal(ids[0], ids[1])  # rows differ in text, share the layout
    assert torch.equal(ids[0] == TINY.image_token_id, ids[1] == TINY.image_token_id)
    model = qvl.from_config(TINY, backends="eager")
    assert logits(model, **x).shape == (2, work.prompt_length, TINY.text.vocab_size)
    again = build_workload(spec, TINY)
    assert all(torch.equal(again.inputs[k], v) for k, v in x.items())


def test_text_avoids_special_tokens():
    work = build_workload(WorkloadSpec(prompt_tokens=500, seed=2), TINY)
    assert int(work.inputs["input_ids"].max()) < TINY.image_token_id
    assert not work.has_vision


def test_too_long_for_the_model():
    with pytest.raises(ValueError, match="exceeds the model's max_position_embeddings"):
        build_workload(WorkloadSpec(prompt_tokens=4090, decode_tokens=8), TINY)


def test_image_file(tmp_path):
    from PIL import Image

    path = tmp_path / "pic.png"
    Image.new("RGB", (150, 100), (255, 0, 0)).save(path)
    work = build_workload(WorkloadSpec(images=(ImageSpec(file=str(path)),), prompt_tokens=2), TINY)
    assert work.inputs["image_grid_thw"].tolist() == [[1, 8, 10]]  # 100x150 -> 112x140
    red = work.inputs["pixel_values"].view(-1, 3, 2, 14, 14)[:, 0]
    assert torch.allclose(red, torch.full_like(red, (1 - CLIP_MEAN[0]) / CLIP_STD[0]), atol=1e-5)


def test_image_file_without_pillow(tmp_path, monkeypatch):
    path = tmp_path / "pic.png"
    path.write_bytes(b"")
    real_import = builtins.__import__

    def no_pil(name, *args, **kwargs):
        if name == "PIL" or name.startswith("PIL."):
            raise ImportError("No module named 'PIL'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pil)
    with pytest.raises(ValueError, match=r"needs Pillow \(pip install pillow\); or give the image as size"):
        build_workload(WorkloadSpec(images=(ImageSpec(file=str(path)),)), TINY)
