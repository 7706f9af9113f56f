"""Tension balancing: how much each way of knowing counts, decided by the question.

"Where is the red circle?" wants the participatory (query-coupled) score; "how many things
are there?" leans on salience and information. The balancer reads the question embedding and
returns softmax weights over the three scorers; the combined score is the weighted sum of the
*standardised* scores (zero mean, unit variance per image), so no scorer wins just by having a
larger scale.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

SCORER_NAMES = ("information", "perspectival", "participatory")
_STD_EPS = 1e-5


def standardize(scores: Tensor) -> Tensor:
    """Zero mean, unit variance over the last dimension; a constant score becomes all zeros."""
    mean = scores.mean(-1, keepdim=True)
    std = scores.std(-1, keepdim=True, unbiased=False) if scores.shape[-1] > 1 else torch.zeros_like(mean)
    return (scores - mean) / (std + _STD_EPS)


class TensionBalancer(nn.Module):
    """Query-conditioned softmax weights over the three standardised scores.

    A linear read-out of the layer-normalised question gives three logits; the weights start
    near uniform (small initial weights, zero bias) and learn per-question emphasis.
    """

    def __init__(self, query_dim: int):
        super().__init__()
        self.query_norm = nn.LayerNorm(query_dim, elementwise_affine=False)
        self.head = nn.Linear(query_dim, len(SCORER_NAMES))
        nn.init.normal_(self.head.weight, std=0.1 / query_dim**0.5)
        nn.init.zeros_(self.head.bias)

    def weights(self, query: Tensor) -> Tensor:
        """``query`` ``[Dq]`` → ``[3]`` non-negative weights summing to 1."""
        dtype = self.head.weight.dtype
        return torch.softmax(self.head(self.query_norm(query.to(dtype))), dim=-1)

    def forward(
        self, query: Tensor, information: Tensor, perspectival: Tensor, participatory: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Returns ``(weights [3], combined [N])``; ``combined = sum_k weights[k] * standardize(score_k)``."""
        weights = self.weights(query)
        stacked = standardize(torch.stack([information, perspectival, participatory]).to(weights.dtype))
        return weights, weights @ stacked
