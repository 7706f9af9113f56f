"""Selection metrics, VQA soft accuracy and the baseline selectors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from stages.evaluate import (
    BASELINES,
    SelectorAllocator,
    binarise,
    centre_scores,
    hard_iou,
    kept_mask,
    recall,
    soft_iou_loss,
    swapped_allocator,
    topk_indices,
    vqa_soft_accuracy,
)


def test_hard_iou_and_recall_of_kept_set():
    target = torch.tensor([1, 1, 0, 0, 0, 0], dtype=torch.bool)
    kept = kept_mask(torch.tensor([1, 2]), 6)
    assert kept.tolist() == [False, True, True, False, False, False]
    assert hard_iou(kept, target) == pytest.approx(1 / 3)
    assert recall(kept, target) == pytest.approx(1 / 2)
    assert hard_iou(target, target) == 1.0 and recall(target, target) == 1.0
    empty = torch.zeros(6, dtype=torch.bool)
    assert recall(kept, empty) == 0.0 and hard_iou(empty, empty) == 0.0


def test_binarise_keeps_best_cell_of_a_tiny_object():
    coverage = torch.tensor([[0.0, 0.6], [0.5, 0.49]])
    assert binarise(coverage).tolist() == [False, True, True, False]
    tiny = torch.tensor([0.0, 0.2, 0.1, 0.0])
    assert binarise(tiny).tolist() == [False, True, False, False]
    assert not binarise(torch.zeros(4)).any()


def test_soft_iou_loss_is_differentiable_and_lower_for_matching_scores():
    mask = torch.tensor([1.0, 1.0, 0.0, 0.0])
    good = torch.tensor([6.0, 6.0, -6.0, -6.0], requires_grad=True)
    bad = torch.tensor([-6.0, -6.0, 6.0, 6.0])
    loss = soft_iou_loss(good, mask)
    assert loss.item() < 0.01 < 0.99 < soft_iou_loss(bad, mask).item()
    loss.backward()
    assert good.grad is not None and good.grad[2] > 0 > good.grad[0]


def test_vqa_soft_accuracy_uses_official_normalisation():
    answers = ["two", "2", "2.", "Two", "3", "3", "three", "3", "3", "3"]
    assert vqa_soft_accuracy("2", answers) == 1.0  # four annotators after normalisation
    assert vqa_soft_accuracy("three", answers) == 1.0
    assert vqa_soft_accuracy("4", answers) == 0.0
    assert vqa_soft_accuracy("Yes", ["yes", "no", "no"]) == pytest.approx(1 / 3)
    assert vqa_soft_accuracy("yes", [{"answer": "yes."}, {"answer": "Yes"}]) == pytest.approx(2 / 3)


def test_topk_indices_are_raster_ordered():
    scores = torch.tensor([0.1, 0.9, 0.3, 0.8, 0.0])
    assert topk_indices(scores, 2).tolist() == [1, 3]


def _scene(grid=(4, 4), cell=8):
    """Grey background with one bright square in cell (0, 3)."""
    image = torch.full((3, grid[0] * cell, grid[1] * cell), 0.5)
    image[:, 1 : cell - 1, 3 * cell + 1 : 4 * cell - 1] = torch.tensor([1.0, 0.1, 0.1]).view(3, 1, 1)
    return image


@pytest.mark.parametrize("kind", BASELINES)
def test_selectors_return_k_ascending_with_positions(kind):
    grid = (4, 4)
    tokens = torch.randn(16, 8)
    allocation = SelectorAllocator(kind, seed=1)(_scene(grid), grid, tokens, torch.randn(8), 5)
    assert allocation.indices.shape == (5,) and allocation.budget == 5
    assert torch.all(allocation.indices[1:] > allocation.indices[:-1])
    assert allocation.positions[1].tolist() == (allocation.indices // 4).tolist()
    assert allocation.positions[2].tolist() == (allocation.indices % 4).tolist()
    assert torch.equal(allocation.gate, torch.ones(5))
    with pytest.raises(ValueError, match="budget"):
        SelectorAllocator(kind)(_scene(grid), grid, tokens, torch.randn(8), 17)


def test_selectors_pick_what_they_claim():
    grid = (4, 4)
    query = torch.zeros(8)
    centre = SelectorAllocator("centre")(_scene(grid), grid, torch.zeros(16, 8), query, 4)
    assert centre.indices.tolist() == [5, 6, 9, 10]
    assert centre_scores(grid).argmax().item() in (5, 6, 9, 10)
    saliency = SelectorAllocator("saliency")(_scene(grid), grid, torch.zeros(16, 8), query, 1)
    assert saliency.indices.tolist() == [3]  # the bright square's cell
    tokens = torch.zeros(16, 8)
    tokens[11] = 5.0
    norm = SelectorAllocator("vision_norm")(_scene(grid), grid, tokens, query, 1)
    assert norm.indices.tolist() == [11]
    first = SelectorAllocator("random", seed=3)(_scene(grid), grid, tokens, query, 4).indices
    again = SelectorAllocator("random", seed=3)(_scene(grid), grid, tokens, query, 4).indices
    assert torch.equal(first, again)


def test_swapped_allocator_restores_the_original():
    model = nn.Module()
    model.allocator = nn.Linear(2, 2)
    original = model.allocator
    selector = SelectorAllocator("centre")
    with swapped_allocator(model, selector):
        assert model.allocator is selector
    assert model.allocator is original
    with swapped_allocator(model, None):
        assert model.allocator is original


def test_unknown_baseline_is_a_value_error():
    with pytest.raises(ValueError, match="kind"):
        SelectorAllocator("oracle")
