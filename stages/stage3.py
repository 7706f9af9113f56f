"""Stage 3, hardening: train everything trainable on the mined hard set plus replay.

Starts from the mining artifact (the stage-2 allocator and adapters, and the hard-set
shards). Every batch holds ``round(batch_size * replay_fraction)`` replayed questions
from the normal training shards and the rest from the hard set; the loss is the
per-sample answer cross-entropy weighted ``hard_weight`` for hard samples and 1 for
replayed ones (a weighted mean). The learning rate is the stage's own (lower by default).

Metrics on two held-out validation splits: the questions the data flags as hard cases
and the unflagged ones, plus the combined set stage 2 reports.
"""

from __future__ import annotations

from typing import Any

import torch

from arr_coc.errors import ConfigError
from stages.data import JoinedLoader, iter_samples
from stages.mine import HARD_SHARDS_DIR
from stages.stage0 import vqa_loader
from stages.stage2 import VQATask


def split_counts(batch_size: int, replay_fraction: float) -> tuple[int, int]:
    """(hard, replay) items per batch; at least one hard item."""
    replay = min(batch_size - 1, round(batch_size * replay_fraction))
    return batch_size - replay, replay


def weighted_loss(per_sample: torch.Tensor, hard: list[bool], hard_weight: float) -> torch.Tensor:
    weights = torch.tensor(
        [hard_weight if h else 1.0 for h in hard], dtype=per_sample.dtype, device=per_sample.device
    )
    return (per_sample * weights).sum() / weights.sum()


class Stage3Task(VQATask):
    def __init__(self, ctx):
        super().__init__(ctx)
        self.hard_shards = self.upstream / HARD_SHARDS_DIR
        if not (self.hard_shards / "manifest.json").is_file():
            raise ConfigError(
                f"{self.hard_shards}: no hard-set shards (is {self.upstream} a mining artifact?)"
            )
        self._splits: dict[str, list[dict[str, Any]]] | None = None

    def train_loader(self):
        hard_count, replay_count = split_counts(self.ctx.stage.batch_size, self.ctx.stage.replay_fraction)
        hard = vqa_loader(self.ctx, self.hard_shards, batch_size=hard_count)
        replay = vqa_loader(self.ctx, self.paths.vqav2, batch_size=replay_count) if replay_count else None
        return JoinedLoader({
            "hard": (hard, {"hard": True}),
            "replay": (replay, {"hard": False}) if replay is not None else None,
        })

    def training_step(self, model, batch):
        out, budgets = self.answer_loss(model, batch)
        hard = [bool(item["hard"]) for item in batch]
        loss = weighted_loss(out.per_sample_loss, hard, self.ctx.stage.hard_weight)
        return loss, {
            "answer_ce": float(out.loss.detach()),
            "weighted_ce": float(loss.detach()),
            "hard_share": sum(hard) / len(hard),
            "tokens_kept": sum(budgets) / len(budgets),
        }

    # ----------------------------------------------------------------- evaluation
    def validation_splits(self) -> dict[str, list[dict[str, Any]]]:
        """Up to ``eval_samples`` flagged ("hard") and unflagged ("normal") validation questions."""
        if self._splits is None:
            limit = self.ctx.stage.eval_samples
            splits: dict[str, list[dict[str, Any]]] = {"hard": [], "normal": []}
            for sample in iter_samples(self.paths.vqav2, "val"):
                name = "hard" if sample["json"].get("hard") else "normal"
                if len(splits[name]) < limit:
                    splits[name].append(sample)
                if all(len(s) >= limit for s in splits.values()):
                    break
            self._splits = splits
        return self._splits

    def evaluate(self, model) -> dict[str, float]:
        metrics = super().evaluate(model)
        for name, samples in self.validation_splits().items():
            if samples:
                metrics[f"vqa_accuracy_{name}"] = self.accuracy(model, samples, self.budget)
                metrics[f"eval_samples_{name}"] = float(len(samples))
        return metrics
