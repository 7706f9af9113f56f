import pytest
import torch

from arr_coc.config import AllocatorSection
from arr_coc.layer import Allocation, ARRCOCLayer

VISION_DIM, QUERY_DIM = 24, 20
GRID = (6, 8)
N = GRID[0] * GRID[1]


def make_layer(**overrides) -> ARRCOCLayer:
    torch.manual_seed(0)
    config = AllocatorSection(hidden=16, coupling_dim=8, **overrides)
    return ARRCOCLayer(config, vision_dim=VISION_DIM, query_dim=QUERY_DIM)


def inputs(seed: int = 0, grid=GRID, cell: int = 8):
    generator = torch.Generator().manual_seed(seed)
    image = torch.rand(3, grid[0] * cell, grid[1] * cell, generator=generator)
    tokens = torch.randn(grid[0] * grid[1], VISION_DIM, generator=generator)
    query = torch.randn(QUERY_DIM, generator=generator)
    return image, grid, tokens, query


def test_allocation_fields():
    allocation = make_layer()(*inputs(), 10)
    assert isinstance(allocation, Allocation)
    assert allocation.budget == 10 and allocation.grid_hw == GRID
    indices = allocation.indices
    assert indices.shape == (10,) and torch.equal(indices, indices.sort().values) and indices.unique().numel() == 10
    assert allocation.positions.shape == (3, 10) and allocation.positions.dtype == torch.long
    t, h, w = allocation.positions
    assert torch.equal(t, torch.zeros(10, dtype=torch.long)) and torch.equal(h * GRID[1] + w, indices)
    assert allocation.scores.shape == (N,) and allocation.scores.requires_grad
    assert set(indices.tolist()) == set(torch.topk(allocation.scores.detach(), 10).indices.tolist())
    assert torch.equal(allocation.gate.detach(), torch.ones(10))
    components = allocation.components
    assert {k: tuple(v.shape) for k, v in components.items()} == {
        "information": (N,), "perspectival": (N,), "participatory": (N,), "weights": (3,)
    }
    assert abs(components["weights"].detach().sum().item() - 1) < 1e-6


def test_budget_none_keeps_all_tokens_with_unit_gate():
    allocation = make_layer()(*inputs(), None)
    assert allocation.budget == N and torch.equal(allocation.indices, torch.arange(N))
    assert torch.equal(allocation.gate.detach(), torch.ones(N))


def test_scores_depend_on_query_and_are_deterministic_in_eval():
    layer = make_layer().eval()
    image, grid, tokens, query = inputs()
    first = layer(image, grid, tokens, query, 8)
    again = layer(image, grid, tokens, query, 8)
    assert torch.equal(first.scores, again.scores) and torch.equal(first.indices, again.indices)
    other = layer(image, grid, tokens, torch.randn(QUERY_DIM), 8)
    assert not torch.allclose(first.scores, other.scores)


def downstream_loss(allocation: Allocation, tokens: torch.Tensor) -> torch.Tensor:
    """A toy LM: kept token embeddings times the gate, read out against a fixed direction."""
    kept = tokens[allocation.indices] * allocation.gate[:, None]
    target = torch.linspace(-1, 1, tokens.shape[1])
    return (kept @ target).pow(2).mean()


SCORERS = ("information", "perspectival", "participatory", "balancer")


@pytest.mark.parametrize("mode", ["straight_through", "gumbel"])
def test_gradient_reaches_every_scorer_and_the_balancer(mode):
    layer = make_layer(grad_mode=mode).train()
    image, grid, tokens, query = inputs()
    downstream_loss(layer(image, grid, tokens, query, 12), tokens).backward()
    for name in SCORERS:
        module = getattr(layer, name)
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None for g in grads), name
        assert sum(float(g.abs().sum()) for g in grads) > 0, name


def test_frozen_mode_sends_no_gradient_to_the_allocator():
    layer = make_layer(grad_mode="frozen")
    image, grid, tokens, query = inputs()
    tokens.requires_grad_()
    downstream_loss(layer(image, grid, tokens, query, 12), tokens).backward()
    assert tokens.grad is not None  # the loss did backpropagate ...
    assert all(p.grad is None for p in layer.parameters())  # ... but not into the allocator


def test_scores_train_directly_in_any_mode():
    # Stage 1 fits sigmoid(scores) to a box mask whatever the gate mode.
    layer = make_layer(grad_mode="frozen")
    allocation = layer(*inputs(), 5)
    torch.sigmoid(allocation.scores).sum().backward()
    assert layer.log_scale.grad is not None and layer.participatory.vision_proj.weight.grad.abs().sum() > 0


def test_grad_mode_can_be_switched_per_stage():
    layer = make_layer(grad_mode="frozen")
    layer.grad_mode = "straight_through"
    assert layer(*inputs(), 5).gate.requires_grad


def test_adaptive_budget_within_bounds():
    layer = make_layer(adaptive=True, budget_min=3, budget_max=9)
    for seed in range(3):
        allocation = layer(*inputs(seed), 40)
        assert 3 <= allocation.budget <= 9 and allocation.indices.numel() == allocation.budget


def test_bfloat16_parameters_and_float32_inputs():
    layer = make_layer().to(torch.bfloat16)
    allocation = layer(*inputs(), 6)
    assert allocation.scores.dtype == torch.bfloat16 and allocation.gate.dtype == torch.bfloat16
    assert torch.isfinite(allocation.scores.float()).all()


def test_parameter_count_stays_small_at_real_model_width():
    config = AllocatorSection()
    assert sum(p.numel() for p in ARRCOCLayer(config, 2048, 2048).parameters()) < 100_000
    assert sum(p.numel() for p in ARRCOCLayer(config, 64, 64).parameters()) < 20_000


def bad_call(argument: str):
    image, grid, tokens, query = inputs()
    budget = 4
    if argument == "budget_low":
        budget = 0
    elif argument == "budget_high":
        budget = N + 1
    elif argument == "image":
        image = torch.rand(3, 10, 10)  # under 2x2 pixels per merged cell of a 6x8 grid
    elif argument == "image_range":
        image = image * 4 - 2  # normalised pixel_values instead of the [0, 1] image
    elif argument == "image_shape":
        image = image[0]
    elif argument == "vision_tokens":
        tokens = tokens[:-1]
    elif argument == "vision_dim":
        tokens = torch.randn(N, VISION_DIM + 1)
    elif argument == "query":
        query = torch.randn(2, QUERY_DIM)
    elif argument == "query_dim":
        query = torch.randn(QUERY_DIM - 1)
    elif argument == "grid_hw":
        grid = (0, 8)
    return image, grid, tokens, query, budget


@pytest.mark.parametrize(
    "case, name",
    [
        ("budget_low", "budget"),
        ("budget_high", "budget"),
        ("image", "image"),
        ("image_range", "image"),
        ("image_shape", "image"),
        ("vision_tokens", "vision_tokens"),
        ("vision_dim", "vision_tokens"),
        ("query", "query"),
        ("query_dim", "query"),
        ("grid_hw", "grid_hw"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(case, name):
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        make_layer()(*bad_call(case))


def toy_scene(generator: torch.Generator, colour_queries: torch.Tensor, encoder: torch.Tensor):
    """Grey 8x8-cell scene with four 2x2-cell squares of distinct colours; the question names one.

    The "vision encoder" is a fixed linear map of the cell colour plus noise, so only the
    participatory scorer can tell *which* square the question is about.
    """
    colours = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.2, 0.9], [0.9, 0.9, 0.1]])
    grid, cell = 8, 8
    image = 0.45 + 0.05 * torch.rand(3, grid * cell, grid * cell, generator=generator)
    for colour in colours:
        y, x = (cell * v for v in torch.randint(0, grid - 1, (2,), generator=generator).tolist())
        image[:, y : y + 2 * cell, x : x + 2 * cell] = colour[:, None, None]
    cells = torch.nn.functional.avg_pool2d(image[None], cell)[0]
    asked = int(torch.randint(0, 4, (1,), generator=generator))
    mask = ((cells - colours[asked][:, None, None]).abs().sum(0) < 0.2).float().flatten()
    tokens = cells.flatten(1).T @ encoder + 0.1 * torch.randn(grid * grid, encoder.shape[1], generator=generator)
    return image, (grid, grid), tokens, colour_queries[asked], mask


def test_learns_to_find_the_queried_region():
    """Stage-1 in miniature: soft IoU of sigmoid(scores) against the asked square's mask."""
    torch.manual_seed(0)
    layer = ARRCOCLayer(AllocatorSection(hidden=16, coupling_dim=8), vision_dim=32, query_dim=16)
    colour_queries, encoder = torch.randn(4, 16), torch.randn(3, 32)

    def soft_iou_loss(scores, mask):
        p = torch.sigmoid(scores)
        return 1 - (p * mask).sum() / (p + mask - p * mask).sum()

    held_out = [toy_scene(torch.Generator().manual_seed(100 + i), colour_queries, encoder) for i in range(12)]

    def held_out_loss() -> float:
        with torch.no_grad():
            return sum(float(soft_iou_loss(layer(*s[:4], None).scores, s[4])) for s in held_out) / len(held_out)

    before = held_out_loss()
    optimizer = torch.optim.Adam(layer.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(1)
    for _ in range(60):
        *args, mask = toy_scene(generator, colour_queries, encoder)
        loss = soft_iou_loss(layer(*args, 4).scores, mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = held_out_loss()
    assert after < before - 0.25, (before, after)
