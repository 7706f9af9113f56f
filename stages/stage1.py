"""Stage 1, proxy IoU: teach the allocator where the queried object is.

The VLM is frozen (no parameter of it has ``requires_grad``); only the allocator trains.
Each COCO-format image becomes one "find the <category>." query per category in it
(data_prep.masks.stage1_queries, expanded by the shard loader, so resume is exact), and
the allocator's scores over the merged token grid are fitted to that category's box
coverage with a differentiable soft IoU plus a binary cross-entropy term.

Held-out metrics (validation shards, every category of every image, fixed order): hard
IoU and recall of the kept set (top-K at the stage budget) against the binarised mask,
for the trained allocator and for the baselines: random, centre prior, bottom-up
saliency, vision-token norm, and the untrained allocator (the initial weights).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from data_prep.masks import box_mask, stage1_queries
from stages import common
from stages.base import StageContext, StageTask
from stages.data import ensure_data, read_samples, shard_urls
from stages.evaluate import (
    BASELINES,
    SelectorAllocator,
    binarise,
    hard_iou,
    kept_mask,
    recall,
    soft_iou_loss,
    summarise,
    swapped_allocator,
)
from stages.heatmaps import HEATMAP_DIR, write_heatmaps

# Weight of the per-token BCE next to the soft IoU: the IoU shapes the kept set as a
# whole, the BCE gives every token a gradient even when the mask is tiny.
BCE_WEIGHT = 0.5
HEATMAP_SAMPLES = 4


def coverage_mask(record: dict[str, Any], category: str, grid_hw: tuple[int, int]) -> torch.Tensor:
    """``[N]`` coverage of each merged cell by the category's boxes (data_prep.masks)."""
    mask = box_mask(record["objects"], category, record["width"], record["height"], grid_hw)
    return torch.as_tensor(mask, dtype=torch.float32).flatten()


def clipped_budget(budget: int, inputs: dict[str, Any], merge: int) -> list[int]:
    return [min(budget, n) for n in common.token_counts(inputs["image_grid_thw"], merge)]


class Stage1Task(StageTask):
    def __init__(self, ctx: StageContext):
        super().__init__(ctx)
        # Upstream first: a missing artifact is a config error before any data is generated.
        self.upstream = common.upstream_dir(ctx)
        self.base = common.base_of(ctx, self.upstream)
        self.paths = ensure_data(ctx.cfg)
        self.processor = None
        self.initial_allocator: nn.Module | None = None
        self._eval_queries: list[dict[str, Any]] | None = None

    def upstream_required(self) -> bool:
        """The tiny model's base is the stage-0 export; a pretrained base needs no upstream."""
        return self.ctx.cfg.model.source == "tiny"

    # ----------------------------------------------------------------- model and data
    def build_model(self) -> nn.Module:
        model, self.processor = common.build_vlm(self.ctx, self.base)
        model.allocator.requires_grad_(True)
        self.initial_allocator = copy.deepcopy(model.allocator).requires_grad_(False)
        return model

    def train_loader(self):
        from data_prep.loader import ShardLoader

        return ShardLoader(
            shard_urls(self.paths.coco, "train"),
            batch_size=self.ctx.stage.batch_size,
            rank=self.ctx.rank,
            world_size=self.ctx.world_size,
            num_workers=0,
            seed=self.ctx.cfg.seed,
            expand=stage1_queries,
        )

    def _inputs(self, queries: list[dict[str, Any]]):
        inputs = self.processor([q["image"] for q in queries], [q["query"] for q in queries])
        inputs.pop("labels", None)
        return common.to_device(inputs, self.ctx.device)

    def _grids(self, inputs) -> list[tuple[int, int]]:
        return common.merged_grid(inputs["image_grid_thw"], self.processor.merge_size)

    # ----------------------------------------------------------------- training
    def training_step(self, model, batch):
        queries = batch  # one (image, category) query per item: the loader expands images
        inputs = self._inputs(queries)
        module = common.unwrap(model)
        allocations = module.score_tokens(
            **inputs, budget=clipped_budget(self.ctx.stage.budget, inputs, self.processor.merge_size)
        )
        iou_terms, bce_terms = [], []
        for query, allocation, grid in zip(queries, allocations, self._grids(inputs)):
            coverage = coverage_mask(query["json"], query["category"], grid).to(allocation.scores.device)
            iou_terms.append(soft_iou_loss(allocation.scores, coverage))
            bce_terms.append(F.binary_cross_entropy_with_logits(allocation.scores, coverage))
        soft_iou = torch.stack(iou_terms).mean()
        bce = torch.stack(bce_terms).mean()
        loss = soft_iou + BCE_WEIGHT * bce
        logs = {
            "soft_iou_loss": float(soft_iou.detach()),
            "bce": float(bce.detach()),
            "tokens_kept": sum(a.budget for a in allocations) / len(allocations),
        }
        return loss, logs

    # ----------------------------------------------------------------- evaluation
    def eval_queries(self) -> list[dict[str, Any]]:
        """Held-out (image, category) pairs: every category of every validation image, in order."""
        if self._eval_queries is None:
            queries: list[dict[str, Any]] = []
            limit = self.ctx.stage.eval_samples
            for sample in read_samples(self.paths.coco, "val"):
                for query in stage1_queries(sample["json"]):
                    queries.append({"image": sample["image"], "json": sample["json"], **query})
                if len(queries) >= limit:
                    break
            self._eval_queries = queries[:limit]
        return self._eval_queries

    def selectors(self) -> dict[str, nn.Module | None]:
        """``None`` is the model's own allocator; the rest are swapped in for comparison."""
        chosen: dict[str, nn.Module | None] = {"allocator": None, "untrained": self.initial_allocator}
        chosen.update({name: SelectorAllocator(name, seed=self.ctx.cfg.seed) for name in BASELINES})
        return chosen

    @torch.no_grad()
    def selection_metrics(self, model: nn.Module, budget: int | None = None) -> dict[str, float]:
        """IoU and recall of the kept set vs the mask, for the allocator and every baseline."""
        module = common.unwrap(model)
        budget = budget or self.ctx.stage.budget
        queries = self.eval_queries()
        size = self.ctx.stage.batch_size
        chunks = [queries[start : start + size] for start in range(0, len(queries), size)]
        batches = [self._inputs(chunk) for chunk in chunks]
        targets = [
            [
                binarise(coverage_mask(q["json"], q["category"], grid))
                for q, grid in zip(chunk, self._grids(inputs))
            ]
            for chunk, inputs in zip(chunks, batches)
        ]
        metrics: dict[str, float] = {}
        was_training = module.training
        module.eval()
        try:
            for name, selector in self.selectors().items():
                per_sample: dict[str, list[float]] = {"iou": [], "recall": []}
                with swapped_allocator(module, selector):
                    for inputs, chunk_targets in zip(batches, targets):
                        allocations = module.score_tokens(
                            **inputs, budget=clipped_budget(budget, inputs, self.processor.merge_size)
                        )
                        for allocation, target in zip(allocations, chunk_targets):
                            kept = kept_mask(allocation.indices.cpu(), target.numel())
                            per_sample["iou"].append(hard_iou(kept, target))
                            per_sample["recall"].append(recall(kept, target))
                suffix = "" if name == "allocator" else f"_{name}"
                metrics.update({f"{key}{suffix}": value for key, value in summarise(per_sample).items()})
        finally:
            module.train(was_training)
        metrics["eval_queries"] = float(len(queries))
        return metrics

    def evaluate(self, model) -> dict[str, float]:
        return self.selection_metrics(model)

    # ----------------------------------------------------------------- export
    def export(self, model, artifact_dir: Path) -> None:
        common.save_allocator(model, artifact_dir, write=common.is_writer(self.ctx))
        self.export_heatmaps(model, artifact_dir)
        if common.is_writer(self.ctx):
            common.write_lineage(self.ctx, artifact_dir, self.base, self.upstream)

    @torch.no_grad()
    def export_heatmaps(self, model, artifact_dir: Path) -> None:
        module = common.unwrap(model)
        chunk = self.eval_queries()[:HEATMAP_SAMPLES]
        inputs = self._inputs(chunk)
        grids = self._grids(inputs)
        allocations = module.score_tokens(
            **inputs, budget=clipped_budget(self.ctx.stage.budget, inputs, self.processor.merge_size)
        )
        if common.is_writer(self.ctx):
            names = [q["query"] for q in chunk]
            write_heatmaps(artifact_dir / HEATMAP_DIR, names, inputs["images"], allocations, grids)
