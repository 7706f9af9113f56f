"""Held-out metrics shared by the stages and ``bench/budget_curve.py``.

* Token selection against a box mask (stage 1): hard IoU and recall of the kept set
  (the top-K tokens) against the binarised mask at the merged token grid.
* VQA soft accuracy (stages 2, 3, mining): ``min(#annotators who gave the answer / 3, 1)``
  after the official VQA answer normalisation from ``data_prep``.
* Baseline selectors that stand in for the allocator (``SelectorAllocator``): random,
  centre prior, saliency only (image contrast, no query) and vision-token norm (the
  frozen encoder's features, no query). They have the allocator's call signature, so
  the same model code runs with the learned allocator or a baseline.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from arr_coc.layer import Allocation, grid_positions

# A token counts as "inside" the queried object when at least this share of its cell is covered.
MASK_THRESHOLD = 0.5

BASELINES = ("random", "centre", "saliency", "vision_norm")


def kept_mask(indices: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Boolean ``[N]`` mask of the kept token indices."""
    mask = torch.zeros(num_tokens, dtype=torch.bool, device=indices.device)
    mask[indices] = True
    return mask


def binarise(coverage: torch.Tensor, threshold: float = MASK_THRESHOLD) -> torch.Tensor:
    """Token cells whose box coverage reaches ``threshold``; the largest cell if none does.

    A tiny object may cover no cell by half; its best-covered cell is still the right
    answer, so it is kept as the target instead of leaving the sample without one.
    """
    flat = coverage.flatten()
    target = flat >= threshold
    if not bool(target.any()) and bool((flat > 0).any()):
        target = flat >= flat.max()
    return target


def hard_iou(kept: torch.Tensor, target: torch.Tensor) -> float:
    """|kept ∩ target| / |kept ∪ target| of two boolean ``[N]`` masks."""
    union = (kept | target).sum().item()
    return (kept & target).sum().item() / union if union else 0.0


def recall(kept: torch.Tensor, target: torch.Tensor) -> float:
    """Share of the target tokens that were kept."""
    total = target.sum().item()
    return (kept & target).sum().item() / total if total else 0.0


def soft_iou_loss(scores: torch.Tensor, coverage: torch.Tensor) -> torch.Tensor:
    """``1 - sum(p*m) / sum(p + m - p*m)`` with ``p = sigmoid(scores)``: differentiable IoU."""
    prob = torch.sigmoid(scores.flatten())
    mask = coverage.flatten().to(prob.dtype)
    intersection = (prob * mask).sum()
    union = (prob + mask - prob * mask).sum().clamp_min(1e-6)
    return 1.0 - intersection / union


def topk_indices(scores: torch.Tensor, budget: int) -> torch.Tensor:
    """The ``budget`` highest-scoring token indices, ascending (raster order)."""
    return torch.topk(scores.flatten(), budget).indices.sort().values


# ----------------------------------------------------------------------------- VQA accuracy


def _normalize_answer(text: str) -> str:
    from data_prep.vqa_norm import normalize_answer

    return normalize_answer(text)


def vqa_soft_accuracy(prediction: str, annotator_answers: Sequence) -> float:
    """``min(#annotators whose normalised answer equals the prediction / 3, 1)``.

    ``annotator_answers``: strings, or VQAv2 answer records ``{"answer": ...}``.
    """
    predicted = _normalize_answer(prediction)
    texts = [a["answer"] if isinstance(a, dict) else a for a in annotator_answers]
    matches = sum(_normalize_answer(text) == predicted for text in texts)
    return min(matches / 3.0, 1.0)


@torch.no_grad()
def generate_answers(
    model,
    processor,
    samples: Sequence[dict],
    budget,
    batch_size: int,
    max_new_tokens: int,
    device: torch.device,
) -> list[str]:
    """Greedy answers of ``model`` (an ``ARRCOCQwen``) for VQA samples, in order."""
    from stages.common import vqa_inputs

    was_training = model.training
    model.eval()
    answers: list[str] = []
    try:
        for start in range(0, len(samples), batch_size):
            chunk = samples[start : start + batch_size]
            inputs = vqa_inputs(processor, chunk, device, with_answers=False)
            ids = model.generate_ids(
                **inputs,
                budget=_chunk_budget(budget, inputs, processor.merge_size),
                max_new_tokens=max_new_tokens,
            )
            answers.extend(processor.decode(row) for row in ids)
    finally:
        model.train(was_training)
    return answers


def _chunk_budget(budget, inputs, merge: int) -> int | list[int] | None:
    """An int K is clipped to each image's N (images may differ in size); ``None`` keeps all."""
    if budget is None:
        return None
    counts = [int(t * h * w) // (merge * merge) for t, h, w in inputs["image_grid_thw"].tolist()]
    return [min(int(budget), n) for n in counts]


def vqa_scores(
    model,
    processor,
    samples: Sequence[dict],
    budget,
    batch_size: int,
    max_new_tokens: int,
    device: torch.device,
) -> list[float]:
    """Per-sample VQA soft accuracy of generated answers."""
    predictions = generate_answers(model, processor, samples, budget, batch_size, max_new_tokens, device)
    return [vqa_soft_accuracy(p, s["json"]["answers"]) for p, s in zip(predictions, samples)]


def vqa_accuracy(
    model,
    processor,
    samples: Sequence[dict],
    budget,
    batch_size: int,
    max_new_tokens: int,
    device: torch.device,
) -> float:
    """Mean VQA soft accuracy of generated answers at ``budget`` (``None``: all tokens)."""
    return mean(vqa_scores(model, processor, samples, budget, batch_size, max_new_tokens, device))


# ----------------------------------------------------------------------------- baselines


def centre_scores(grid_hw: tuple[int, int]) -> torch.Tensor:
    """Higher for cells nearer the image centre (negative squared distance)."""
    gh, gw = grid_hw
    ys = (torch.arange(gh, dtype=torch.float32) + 0.5) / gh - 0.5
    xs = (torch.arange(gw, dtype=torch.float32) + 0.5) / gw - 0.5
    return -(ys[:, None] ** 2 + xs[None, :] ** 2).flatten()


def saliency_scores(image: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
    """Sum of the texture array's three saliency maps (spectral residual, centre-surround
    colour contrast, global colour distance): bottom-up saliency that never sees the query."""
    from arr_coc.texture import TEXTURE_CHANNELS, texture_array

    texture = texture_array(image.float(), grid_hw)
    channels = [
        TEXTURE_CHANNELS.index(n) for n in ("saliency_spectral", "saliency_contrast", "saliency_global")
    ]
    return texture[channels].sum(0).flatten()


class SelectorAllocator(nn.Module):
    """A fixed, parameter-free token selector with ``ARRCOCLayer``'s call signature.

    ``kind`` is one of ``BASELINES``. Swap it in for ``model.allocator`` to evaluate the
    same model with a baseline selection (``swapped_allocator``).
    """

    def __init__(self, kind: str, seed: int = 0):
        super().__init__()
        if kind not in BASELINES:
            raise ValueError(f"kind: unknown baseline {kind!r}; expected one of {', '.join(BASELINES)}")
        self.kind = kind
        self.generator = torch.Generator().manual_seed(seed)

    def scores_for(self, image: torch.Tensor, grid_hw: tuple[int, int], vision_tokens: torch.Tensor):
        num_tokens = grid_hw[0] * grid_hw[1]
        if self.kind == "random":
            return torch.rand(num_tokens, generator=self.generator)
        if self.kind == "centre":
            return centre_scores(grid_hw)
        if self.kind == "saliency":
            return saliency_scores(image, grid_hw)
        return vision_tokens.detach().float().norm(dim=-1).cpu()

    def forward(self, image, grid_hw, vision_tokens, query=None, budget=None) -> Allocation:
        grid_hw = (int(grid_hw[0]), int(grid_hw[1]))
        num_tokens = grid_hw[0] * grid_hw[1]
        budget = num_tokens if budget is None else int(budget)
        if not 1 <= budget <= num_tokens:
            raise ValueError(f"budget: K={budget} must be in [1, {num_tokens}]")
        device = vision_tokens.device
        scores = self.scores_for(image, grid_hw, vision_tokens).to(device)
        indices = topk_indices(scores, budget)
        return Allocation(
            indices=indices,
            positions=grid_positions(indices, grid_hw),
            scores=scores,
            gate=torch.ones(budget, dtype=vision_tokens.dtype, device=device),
            budget=budget,
            components={},
            grid_hw=grid_hw,
        )


class swapped_allocator:  # noqa: N801 - used as a context manager, reads like a statement
    """``with swapped_allocator(model, selector): ...`` evaluates with another selector."""

    def __init__(self, model: nn.Module, selector: nn.Module | None):
        self.model = model
        self.selector = selector
        self.original: nn.Module | None = None

    def __enter__(self):
        if self.selector is not None:
            self.original = self.model.allocator
            self.model.allocator = self.selector
        return self.model

    def __exit__(self, *exc):
        if self.original is not None:
            self.model.allocator = self.original
        return False


def mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else math.nan


def summarise(per_sample: dict[str, list[float]], prefix: str = "") -> dict[str, float]:
    """Means of per-sample metric lists, keys prefixed."""
    return {f"{prefix}{key}": mean(values) for key, values in per_sample.items()}
