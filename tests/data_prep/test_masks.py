import pytest
import torch

from data_prep.masks import box_mask, stage1_queries


def _obj(category, bbox, iscrowd=False):
    return {"category": category, "bbox": bbox, "iscrowd": iscrowd}


def test_tiny_default_grid_one_cell_is_32_pixels():
    mask = box_mask([_obj("circle", [32, 64, 32, 32])], "circle", 256, 256, (8, 8))
    expected = torch.zeros(8, 8)
    expected[2, 1] = 1.0
    assert torch.equal(mask, expected)


def test_partial_cells_get_their_covered_share():
    mask = box_mask([_obj("bar", [16, 0, 32, 8])], "bar", 256, 256, (8, 8))
    assert mask[0, 0].item() == pytest.approx(0.5 * 0.25)
    assert mask[0, 1].item() == pytest.approx(0.5 * 0.25)
    assert mask.sum().item() == pytest.approx(32 * 8 / 32**2)


def test_overlapping_boxes_count_once_and_other_categories_are_ignored():
    objects = [_obj("ring", [0, 0, 16, 32]), _obj("ring", [0, 0, 16, 32]), _obj("ring", [8, 0, 16, 32]),
               _obj("square", [0, 0, 256, 256])]
    mask = box_mask(objects, "ring", 256, 256, (8, 8))
    assert mask[0, 0].item() == pytest.approx(24 / 32)  # union of [0,16) and [8,24), not a sum
    assert mask.sum().item() == pytest.approx(24 / 32)


def test_grid_and_resize_come_from_the_model_not_a_constant():
    # A 512x256 (w x h) image resized to 256x128 and cut into a 4x8 grid of 32 px cells.
    mask = box_mask([_obj("cross", [0, 0, 128, 64])], "cross", 512, 256, (4, 8), resized_hw=(128, 256))
    assert mask.shape == (4, 8)
    assert mask[0, :2].tolist() == [1.0, 1.0] and mask.sum().item() == 2.0
    # The same box on a 16x16 grid of a bigger model covers 4x4 cells.
    big = box_mask([_obj("cross", [0, 0, 128, 64])], "cross", 512, 256, (16, 16))
    assert big.sum().item() == pytest.approx(16 * 16 / 16)


def test_crowd_regions_and_boxes_outside_the_grid():
    objects = [_obj("person", [0, 0, 64, 64], iscrowd=True), _obj("person", [300, 300, 10, 10])]
    assert box_mask(objects, "person", 256, 256, (8, 8)).sum().item() == 4.0
    assert box_mask(objects, "person", 256, 256, (8, 8), include_crowd=False).sum().item() == 0.0
    with pytest.raises(ValueError, match="grid_hw"):
        box_mask(objects, "person", 256, 256, (0, 8))


def test_stage1_queries_one_per_category():
    meta = {"objects": [_obj("ring", [0, 0, 1, 1]), _obj("bar", [0, 0, 1, 1]), _obj("ring", [2, 2, 1, 1])]}
    assert stage1_queries(meta) == [{"category": "bar", "query": "find the bar."},
                                    {"category": "ring", "query": "find the ring."}]
    assert stage1_queries({"objects": []}) == []
