import pytest
import torch

from arr_coc.attending import TokenAllocator


def scores_with_gaps(n: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).float() / 10 - 2.5


def test_fixed_k_keeps_the_top_scores_in_raster_order():
    scores = scores_with_gaps()
    selection = TokenAllocator("frozen")(scores, 7)
    indices = selection.indices
    assert selection.budget == 7 and indices.shape == (7,) and indices.dtype == torch.long
    assert torch.equal(indices, indices.sort().values) and indices.unique().numel() == 7
    assert set(indices.tolist()) == set(torch.topk(scores, 7).indices.tolist())


def test_no_budget_keeps_everything_with_gate_exactly_one():
    scores = scores_with_gaps(12).requires_grad_()
    for mode in ("frozen", "straight_through", "gumbel"):
        selection = TokenAllocator(mode).train()(scores, None)
        assert torch.equal(selection.indices, torch.arange(12)) and selection.budget == 12
        assert torch.equal(selection.gate.detach(), torch.ones(12))


def test_straight_through_gate_is_one_forward_sigmoid_backward():
    scores = (torch.randn(20) * 3).requires_grad_()
    selection = TokenAllocator("straight_through")(scores, 5)
    assert torch.equal(selection.gate.detach(), torch.ones(5))  # exactly, not approximately
    selection.gate.sum().backward()
    kept = selection.indices
    probability = torch.sigmoid(scores.detach()[kept])
    assert torch.allclose(scores.grad[kept], probability * (1 - probability))
    dropped = torch.ones(20, dtype=torch.bool)
    dropped[kept] = False
    assert torch.equal(scores.grad[dropped], torch.zeros(int(dropped.sum())))


def test_frozen_gate_carries_no_gradient():
    scores = torch.randn(20, requires_grad=True)
    gate = TokenAllocator("frozen")(scores, 5).gate
    assert torch.equal(gate, torch.ones(5)) and not gate.requires_grad


def test_adaptive_k_follows_the_expected_relevant_count_within_bounds():
    allocator = TokenAllocator("straight_through", adaptive=True, budget_min=4, budget_max=30)
    assert allocator(torch.full((100,), 8.0), 64).budget == 30  # everything relevant: capped at max
    assert allocator(torch.full((100,), -8.0), 64).budget == 4  # nothing relevant: floor at min
    scores = torch.full((100,), -8.0)
    scores[:17] = 8.0
    selection = allocator(scores, 64)
    assert selection.budget == 17 and torch.equal(selection.indices, torch.arange(17))
    assert allocator(torch.full((100,), 8.0), 20).budget == 20  # the caller's budget caps K too
    assert allocator(torch.full((100,), -8.0), 2).budget == 2  # ... even below budget_min
    for seed in range(5):
        k = allocator(torch.randn(100, generator=torch.Generator().manual_seed(seed)) * 4, 64).budget
        assert 4 <= k <= 30


def test_gumbel_explores_in_training_and_is_deterministic_in_eval():
    scores = torch.linspace(0, 0.5, 40).requires_grad_()  # near ties: noise should reorder them
    allocator = TokenAllocator("gumbel").train()
    torch.manual_seed(0)
    draws = {tuple(allocator(scores, 10).indices.tolist()) for _ in range(8)}
    assert len(draws) > 1
    selection = allocator(scores, 10)
    assert torch.equal(selection.indices, selection.indices.sort().values)
    assert torch.equal(selection.gate.detach(), torch.ones(10))
    selection.gate.sum().backward()
    assert scores.grad[selection.indices].abs().min() > 0
    allocator.eval()
    top = torch.topk(scores.detach(), 10).indices.sort().values
    assert all(torch.equal(allocator(scores, 10).indices, top) for _ in range(3))


@pytest.mark.parametrize("budget", [0, -1, 21, 2.5, True])
def test_bad_budget_names_budget(budget):
    with pytest.raises(ValueError, match=r"^budget"):
        TokenAllocator()(torch.randn(20), budget)


def test_bad_construction():
    with pytest.raises(ValueError, match="grad_mode"):
        TokenAllocator("soft")
    with pytest.raises(ValueError, match="budget_min"):
        TokenAllocator(adaptive=True, budget_min=10, budget_max=5)
