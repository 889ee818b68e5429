"""Index arithmetic of the vision windows and the 3-D positions, against transformers and by hand."""

import pytest
import torch

from qvl.config import PRESETS
from qvl.model.positions import left_padding, mrope_positions, vision_rope_positions, vision_window_index

transformers = pytest.importorskip("transformers")
from transformers import vision_utils  # noqa: E402

CFG = PRESETS["tiny"]
IMG, VID = CFG.image_token_id, CFG.video_token_id

GRIDS = [[1, 4, 6], [1, 10, 8], [2, 6, 14], [1, 2, 2], [3, 16, 4]]


@pytest.mark.parametrize("window_size", [56, 112, 224])
def test_window_index_matches_transformers(window_size):
    grid = torch.tensor(GRIDS)
    index, seqlens = vision_window_index(grid, 2, window_size, 14)
    ref_index, ref_cu = vision_utils.get_vision_window_index(grid, spatial_merge_size=2, window_size=window_size,
                                                              patch_size=14)
    assert index.tolist() == ref_index.tolist()
    cu = torch.tensor([0, *seqlens]).cumsum(0)
    assert cu.tolist() == ref_cu.tolist()
    assert len(set(seqlens)) > 1  # unequal windows are exercised


def test_vision_rope_positions_match_transformers():
    grid = torch.tensor(GRIDS)
    ours = vision_rope_positions(grid, 2)
    ref = vision_utils.get_vision_position_ids(grid, 2)
    assert ours.t().tolist() == ref.tolist()


def hf_rope_index(input_ids, mask, image_grid, video_grid, spg):
    model = transformers.Qwen2_5_VLModel.__new__(transformers.Qwen2_5_VLModel)
    model.config = transformers.Qwen2_5_VLConfig(vision_config={"spatial_merge_size": 2, "tokens_per_second": 2})
    mm = (input_ids == IMG).int() + 2 * (input_ids == VID).int()
    return transformers.Qwen2_5_VLModel.get_rope_index(model, input_ids, mm, image_grid, video_grid, spg, mask)


def run(rows, image_grid=None, video_grid=None, spg=None):
    length = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (length - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows])
    pad = left_padding(mask, ids.shape)
    ours = mrope_positions(CFG, ids, pad, image_grid, video_grid, spg)
    return ids, mask, ours


def test_positions_match_transformers_for_images_and_short_videos():
    ig = torch.tensor([[1, 4, 6], [1, 6, 2]])
    vg = torch.tensor([[4, 8, 8]])  # 4 grids x 0.5 s x 2 tokens/s: temporal steps 1 < max(h, w) / 2
    rows = [[5, 6] + [IMG] * 6 + [7] + [VID] * 64 + [8, 9],
            [1] + [IMG] * 3 + [2, 3, 4]]
    ids, mask, (pos, delta) = run(rows, ig, vg, torch.tensor([0.5]))
    ref_pos, ref_delta = hf_rope_index(ids, mask, ig, vg, torch.tensor([0.5]))
    valid = mask.bool()
    assert torch.equal(pos[:, valid], ref_pos[:, valid])
    # transformers counts the delta against the unpadded length, qvl against the padded one, because qvl's
    # decode position is cache slot + delta; both give the same next position.
    assert ((delta + ids.shape[1]) == (ref_delta + mask.sum(1, keepdim=True))).all()


def test_fractional_video_step_is_kept():
    vg = torch.tensor([[4, 2, 2]])
    _, _, (pos, _) = run([[VID] * 4], None, vg, torch.tensor([0.75]))
    assert pos[0, 0].tolist() == [0, 1, 3, 4]  # floor(k * 1.5): never truncated to 0 per step


def test_text_after_long_video_resumes_after_its_largest_position():
    """Released Qwen2.5-VL: text after a vision block starts at max(position) + 1.

    transformers >= 5.17 resumes at start + max(h, w) / merge instead, which differs once the temporal
    positions outrun the spatial ones (long videos); qvl keeps the released behaviour.
    """
    vg = torch.tensor([[6, 2, 2]])  # 6 temporal grids, 1x1 merged: temporal positions 0, 2, 4, 6, 8, 10
    _, _, (pos, delta) = run([[5] + [VID] * 6 + [6, 7]], None, vg, torch.tensor([1.0]))
    assert pos[0, 0].tolist() == [0, 1, 3, 5, 7, 9, 11, 12, 13]
    assert pos[1, 0].tolist() == [0, 1, 1, 1, 1, 1, 1, 12, 13]
    assert int(delta) == 14 - 9


def test_text_only_positions_follow_padding():
    ids, mask, (pos, delta) = run([[1, 2, 3, 4], [5, 6]])
    assert pos[0].tolist() == [[0, 1, 2, 3], [1, 1, 0, 1]]
    assert delta.flatten().tolist() == [0, -2]


QWEN2_VL = PRESETS["tiny_qwen2_vl"]


def test_qwen2_vl_video_positions_are_frame_indexes_as_in_transformers():
    """Qwen2-VL has no second_per_grid_ts: video t positions are the frame group's index (no seconds scaling),
    as transformers' Qwen2VLModel.get_rope_index places them, next to images and left padding."""
    model = transformers.Qwen2VLModel.__new__(transformers.Qwen2VLModel)
    model.config = transformers.Qwen2VLConfig(vision_config={"spatial_merge_size": 2})
    ig, vg = torch.tensor([[1, 4, 6]]), torch.tensor([[3, 6, 8]])  # 3 frame groups <= max(h, w) / 2
    rows = [[5] + [VID] * 36 + [6, 7] + [IMG] * 6 + [8], [1, 2, 3, 4]]
    length = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (length - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows])
    pos, delta = mrope_positions(QWEN2_VL, ids, left_padding(mask, ids.shape), ig, vg, None)
    mm = (ids == IMG).int() + 2 * (ids == VID).int()
    ref_pos, ref_delta = transformers.Qwen2VLModel.get_rope_index(model, ids, mm, ig, vg, mask)
    valid = mask.bool()
    assert torch.equal(pos[:, valid], ref_pos[:, valid])
    assert ((delta + ids.shape[1]) == (ref_delta + mask.sum(1, keepdim=True))).all()
    assert sorted(set(pos[0, 0, 1:37].tolist())) == [1, 2, 3]  # one step per frame group
    # Qwen2.5-VL with its default 2 tokens per second and no seconds given (1 s each) steps by 2 instead.
    assert sorted(set(mrope_positions(CFG, ids, left_padding(mask, ids.shape), ig, vg, None)[0][0, 0, 1:37]
                      .tolist())) == [1, 3, 5]


def test_qwen2_vl_refuses_second_per_grid_ts():
    ids = torch.tensor([[VID] * 4])
    with pytest.raises(ValueError, match="second_per_grid_ts is not an input of qwen2_vl"):
        mrope_positions(QWEN2_VL, ids, None, None, torch.tensor([[1, 4, 4]]), torch.tensor([1.0]))
