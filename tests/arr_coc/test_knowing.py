import math

import torch

from arr_coc.knowing import (
    InformationScorer,
    ParticipatoryScorer,
    PerspectivalScorer,
    cell_entropies,
    cell_histograms,
)
from arr_coc.texture import texture_array


def noisy_cell_image() -> torch.Tensor:
    """4x4 grid of 8-px cells, flat grey except uniform colour noise in cell (1, 2)."""
    image = torch.full((3, 32, 32), 0.5)
    image[:, 8:16, 16:24] = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0))
    return image


def test_cell_histograms_count_pixels_per_cell():
    values = torch.zeros(2, 4, 6)
    values[0, :2, :3] = torch.tensor([0.0, 0.3, 0.99])  # cell (0, 0): three levels
    values[1] = 1.0  # the top edge lands in the last bin
    probs = cell_histograms(values, (2, 2), bins=4)
    assert probs.shape == (2, 4, 4)
    assert torch.allclose(probs.sum(-1), torch.ones(2, 4))
    assert torch.allclose(probs[0, 0], torch.tensor([2, 2, 0, 2]) / 6)
    assert torch.allclose(probs[0, 1:], torch.tensor([1.0, 0, 0, 0]).expand(3, 4))
    assert torch.allclose(probs[1], torch.tensor([0, 0, 0, 1.0]).expand(4, 4))


def test_cell_entropy_zero_for_flat_high_for_noise():
    entropy = cell_entropies(noisy_cell_image(), (4, 4))
    assert entropy.shape == (3, 16)
    noisy = 1 * 4 + 2
    assert entropy[:, noisy].min() > 0.5
    flat = torch.arange(16) != noisy
    assert entropy[:, flat].abs().max() < 1e-6
    # Two equally common levels in a cell: one bit out of log2(16) = 4 bits.
    halves = torch.zeros(3, 8, 8)
    halves[:, :, 4:] = 1.0
    assert math.isclose(float(cell_entropies(halves, (1, 1))[0, 0]), 1 / 4, abs_tol=1e-5)


def test_information_scorer_prefers_busy_cells_at_init():
    scores = InformationScorer()(noisy_cell_image(), (4, 4))
    assert scores.shape == (16,)
    assert scores.argmax() == 6


def test_perspectival_scorer_shape_and_context():
    torch.manual_seed(0)
    scorer = PerspectivalScorer(hidden=16)
    texture = texture_array(torch.rand(3, 48, 64), (6, 8))
    scores = scorer(texture)
    assert scores.shape == (48,) and torch.isfinite(scores).all()
    changed = texture.clone()
    changed[:, 0, 0] += 1.0
    delta = (scorer(changed) - scores).view(6, 8).abs()
    assert delta[0, 0] > 0 and delta[0, 1] > 0  # a token sees its neighbours
    assert delta[5, 7] == 0  # but not the far corner (receptive field 7x7)


def test_participatory_scorer_couples_query_and_content():
    torch.manual_seed(0)
    scorer = ParticipatoryScorer(vision_dim=24, query_dim=20, coupling_dim=8, hidden=16)
    tokens, query = torch.randn(12, 24), torch.randn(20)
    scores = scorer(tokens, query)
    assert scores.shape == (12,)
    other_query = scorer(tokens, torch.randn(20))
    assert not torch.allclose(scores, other_query)
    # The *ranking* depends on the query (not just an offset shared by all tokens).
    assert not torch.allclose(scores - scores.mean(), other_query - other_query.mean())
    changed_tokens = tokens.clone()
    changed_tokens[3] = torch.randn(24)
    changed = scorer(changed_tokens, query)
    assert changed[3] != scores[3]
    assert torch.equal(changed[torch.arange(12) != 3], scores[torch.arange(12) != 3])


def test_participatory_scorer_is_scale_robust_and_dtype_follows_params():
    torch.manual_seed(0)
    scorer = ParticipatoryScorer(vision_dim=16, query_dim=16, coupling_dim=4, hidden=8)
    tokens, query = torch.randn(5, 16), torch.randn(16)
    # Layer norm first: a vision encoder with 100x larger activations scores the same.
    assert torch.allclose(scorer(100 * tokens, query), scorer(tokens, query), atol=1e-4)
    scorer.to(torch.bfloat16)
    assert scorer(tokens, query).dtype == torch.bfloat16
