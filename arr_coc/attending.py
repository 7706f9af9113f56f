"""Attending: keep the K best-scoring vision tokens, and let gradient through the choice.

Top-K is discrete, so the allocator learns from the downstream loss only through the *gate*
that multiplies each kept token's embedding:

* ``frozen``: the gate is ones with no gradient; the allocator is trained by other losses
  (stage 1's box supervision) or not at all.
* ``straight_through``: ``gate = 1 + (s - s.detach())`` with ``s = sigmoid(score)`` of the kept
  tokens. The forward value is exactly 1 (``s - s.detach()`` is exactly zero), so the language
  model sees unmodified embeddings, while the backward pass gives each kept token's score the
  gradient of "scale this token up or down".
* ``gumbel``: during training, Gumbel noise is added to the scores before the top-K (sampling
  K tokens without replacement in proportion to ``softmax(score)``), so tokens just outside the
  top-K get tried and receive gradient; the gate is the straight-through one on the perturbed
  scores. In eval mode it is deterministic and equals ``straight_through``.

K is either the caller's budget (fixed) or, with ``adaptive``, the expected number of relevant
tokens under the allocator's own probabilities, ``round(sum(sigmoid(scores)))``, clamped to
``[budget_min, min(budget_max, budget)]``: an image where the question touches a large region
keeps more tokens. Kept indices are always returned ascending (raster order), because the
language model must see the image tokens in their original order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

GRAD_MODES = ("frozen", "straight_through", "gumbel")


@dataclass
class Selection:
    indices: Tensor  # [K] ascending
    gate: Tensor  # [K]
    budget: int  # K


def check_budget(budget: int | None, num_tokens: int) -> None:
    """``ValueError`` naming ``budget`` unless it is ``None`` or an int in ``[1, num_tokens]``."""
    if budget is None:
        return
    if isinstance(budget, bool) or not isinstance(budget, int):
        raise ValueError(f"budget must be an int or None, got {budget!r}")
    if budget < 1:
        raise ValueError(f"budget must be >= 1, got {budget}")
    if budget > num_tokens:
        raise ValueError(f"budget {budget} exceeds the {num_tokens} vision tokens of this image")


class TokenAllocator(nn.Module):
    """Chooses K and the kept token indices from ``[N]`` relevance logits; no parameters."""

    def __init__(
        self,
        grad_mode: str = "straight_through",
        adaptive: bool = False,
        budget_min: int = 1,
        budget_max: int = 1_000_000,
        gumbel_scale: float = 1.0,
    ):
        super().__init__()
        if grad_mode not in GRAD_MODES:
            raise ValueError(f"grad_mode must be one of {', '.join(GRAD_MODES)}, got {grad_mode!r}")
        if not 1 <= budget_min <= budget_max:
            raise ValueError(f"need 1 <= budget_min <= budget_max, got {budget_min}, {budget_max}")
        self.grad_mode = grad_mode
        self.adaptive = adaptive
        self.budget_min = budget_min
        self.budget_max = budget_max
        self.gumbel_scale = gumbel_scale

    def choose_k(self, scores: Tensor, budget: int | None) -> int:
        """K for this image: N for ``budget=None``, the budget when fixed, else the adaptive count."""
        num_tokens = scores.shape[0]
        check_budget(budget, num_tokens)
        if budget is None:
            return num_tokens
        if not self.adaptive:
            return budget
        upper = min(self.budget_max, budget)
        lower = min(self.budget_min, upper)
        expected = int(torch.sigmoid(scores.detach().float()).sum().round().item())
        return max(lower, min(upper, expected))

    def ranking_scores(self, scores: Tensor) -> Tensor:
        """The scores the top-K ranks: Gumbel-perturbed in ``gumbel`` mode while training."""
        if self.grad_mode == "gumbel" and self.training:
            uniform = torch.rand_like(scores, dtype=torch.float32).clamp(1e-6, 1.0 - 1e-6)
            gumbel = -torch.log(-torch.log(uniform))
            return scores + self.gumbel_scale * gumbel.to(scores.dtype)
        return scores

    def gate(self, kept_scores: Tensor) -> Tensor:
        """Forward value exactly 1; gradient of ``sigmoid(score)`` unless frozen."""
        if self.grad_mode == "frozen":
            return torch.ones_like(kept_scores, requires_grad=False).detach()
        probability = torch.sigmoid(kept_scores)
        return 1.0 + (probability - probability.detach())

    def forward(self, scores: Tensor, budget: int | None) -> Selection:
        """``scores`` ``[N]`` logits → kept ``indices`` (ascending), ``gate`` ``[K]`` and K."""
        num_tokens = scores.shape[0]
        k = self.choose_k(scores, budget)
        ranking = self.ranking_scores(scores)
        if k == num_tokens:
            indices = torch.arange(num_tokens, device=scores.device)
        else:
            indices = torch.topk(ranking.detach(), k, sorted=False).indices.sort().values
        return Selection(indices=indices, gate=self.gate(ranking[indices]), budget=k)
