"""The ARR-COC layer: score every merged vision token for a question and keep K of them.

One image at a time (grids differ per image)::

    image ──> texture array [13, gh, gw] ──> PerspectivalScorer ─┐
    image ──> cell entropies ─────────────> InformationScorer ───┼─> TensionBalancer(query)
    vision tokens [N, Dv] + query [Dq] ───> ParticipatoryScorer ─┘        │ combined [N]
                                                                          v
                            scores = exp(log_scale) * combined + threshold(query)   (logits)
                                                                          │
                                                 TokenAllocator (top-K, gate) ──> Allocation

``scores`` are relevance logits: ``sigmoid(scores)`` is the allocator's probability that a token
matters for the question (stage 1 fits it to box masks with a soft IoU). The learnable scale
sets how confident the logits are, and the query-conditioned threshold how large a share of
the image the question is about; neither changes the ranking, so top-K depends only on the
balanced scores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from arr_coc.attending import TokenAllocator, check_budget
from arr_coc.balancing import TensionBalancer
from arr_coc.config import AllocatorSection
from arr_coc.knowing import InformationScorer, ParticipatoryScorer, PerspectivalScorer
from arr_coc.texture import MIN_CELL_PIXELS, texture_array

# Pixel values may be a rounding step outside [0, 1] after resizing; beyond this they are
# probably the processor's mean/std-normalised pixel_values passed by mistake.
_RANGE_TOLERANCE = 1e-3


@dataclass
class Allocation:
    indices: Tensor  # [K] ascending, into the N merged tokens
    positions: Tensor  # [3, K] (t, h, w) merged-grid coordinates of kept tokens, t = 0
    scores: Tensor  # [N] relevance logits (differentiable)
    gate: Tensor  # [K] multiplier for kept embeddings: exactly ones in value
    budget: int  # K
    components: dict[str, Tensor]  # "information", "perspectival", "participatory" [N], "weights" [3]
    grid_hw: tuple[int, int] = field(default=(0, 0))  # the merged grid the indices refer to


def grid_positions(indices: Tensor, grid_hw: tuple[int, int]) -> Tensor:
    """``[3, K]`` (t, h, w) merged-grid coordinates of raster ``indices`` (one frame: t = 0)."""
    width = grid_hw[1]
    return torch.stack([torch.zeros_like(indices), indices // width, indices % width])


class ARRCOCLayer(nn.Module):
    """Query-aware token allocator for one image; see the module docstring."""

    def __init__(self, config: AllocatorSection, vision_dim: int, query_dim: int):
        super().__init__()
        self.config = config
        self.vision_dim = vision_dim
        self.query_dim = query_dim
        half = max(1, config.hidden // 2)
        self.information = InformationScorer(hidden=8)
        self.perspectival = PerspectivalScorer(hidden=half)
        self.participatory = ParticipatoryScorer(vision_dim, query_dim, config.coupling_dim, hidden=half)
        self.balancer = TensionBalancer(query_dim)
        # Shape [1], not a 0-dim scalar: DeepSpeed's engine broadcasts parameters as byte views,
        # which a 0-dim tensor cannot give (deepspeed.initialize fails on it).
        self.log_scale = nn.Parameter(torch.tensor([math.log(2.0)]))
        self.threshold = nn.Linear(query_dim, 1)
        nn.init.zeros_(self.threshold.weight)
        nn.init.zeros_(self.threshold.bias)
        self.allocator = TokenAllocator(
            grad_mode=config.grad_mode,
            adaptive=config.adaptive,
            budget_min=config.budget_min,
            budget_max=config.budget_max,
            gumbel_scale=config.gumbel_scale,
        )

    @property
    def grad_mode(self) -> str:
        return self.allocator.grad_mode

    @grad_mode.setter
    def grad_mode(self, mode: str) -> None:
        self.allocator.grad_mode = mode

    def validate(self, image: Tensor, grid_hw, vision_tokens: Tensor, query: Tensor, budget) -> tuple[int, int]:
        """Check every argument up front; ``ValueError`` naming the argument. Returns ``(gh, gw)``."""
        try:
            gh, gw = (int(v) for v in grid_hw)
        except (TypeError, ValueError):
            raise ValueError(f"grid_hw must be two ints (gh, gw), got {grid_hw!r}") from None
        if gh < 1 or gw < 1:
            raise ValueError(f"grid_hw must be positive, got {(gh, gw)}")
        if not isinstance(image, Tensor) or image.dim() != 3 or image.shape[0] != 3:
            shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
            raise ValueError(f"image must be a [3, H, W] tensor, got {shape}")
        height, width = image.shape[1:]
        if height < gh * MIN_CELL_PIXELS or width < gw * MIN_CELL_PIXELS:
            raise ValueError(
                f"image of {height}x{width} pixels is smaller than the merged grid {gh}x{gw} needs "
                f"(one merged cell must span at least {MIN_CELL_PIXELS}x{MIN_CELL_PIXELS} pixels)"
            )
        low, high = float(image.min()), float(image.max())
        if low < -_RANGE_TOLERANCE or high > 1.0 + _RANGE_TOLERANCE:
            raise ValueError(
                f"image values must be in [0, 1] (the resized image, not normalised pixel_values), "
                f"got [{low:.3g}, {high:.3g}]"
            )
        num_tokens = gh * gw
        if not isinstance(vision_tokens, Tensor) or tuple(vision_tokens.shape) != (num_tokens, self.vision_dim):
            shape = tuple(vision_tokens.shape) if isinstance(vision_tokens, Tensor) else type(vision_tokens).__name__
            raise ValueError(
                f"vision_tokens must be [gh*gw={num_tokens}, {self.vision_dim}] for grid {gh}x{gw}, got {shape}"
            )
        if not isinstance(query, Tensor) or tuple(query.shape) != (self.query_dim,):
            shape = tuple(query.shape) if isinstance(query, Tensor) else type(query).__name__
            raise ValueError(f"query must be a [{self.query_dim}] embedding, got {shape}")
        check_budget(budget, num_tokens)
        return gh, gw

    def forward(
        self, image: Tensor, grid_hw, vision_tokens: Tensor, query: Tensor, budget: int | None
    ) -> Allocation:
        """Score the ``gh*gw`` merged tokens of one image for ``query`` and keep ``budget`` of them.

        ``budget=None`` keeps all N tokens (gate exactly ones in value).
        """
        grid = self.validate(image, grid_hw, vision_tokens, query, budget)
        device = self.log_scale.device
        image = image.to(device)
        texture = texture_array(image, grid)
        information = self.information(image, grid)
        perspectival = self.perspectival(texture)
        participatory = self.participatory(vision_tokens.to(device), query.to(device))
        weights, combined = self.balancer(query.to(device), information, perspectival, participatory)
        query_param = query.to(device=device, dtype=self.threshold.weight.dtype)
        scores = self.log_scale.exp() * combined + self.threshold(self.balancer.query_norm(query_param)).squeeze(-1)
        selection = self.allocator(scores, budget)
        return Allocation(
            indices=selection.indices,
            positions=grid_positions(selection.indices, grid),
            scores=scores,
            gate=selection.gate,
            budget=selection.budget,
            components={
                "information": information,
                "perspectival": perspectival,
                "participatory": participatory,
                "weights": weights,
            },
            grid_hw=grid,
        )
