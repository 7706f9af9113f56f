"""Stage 0: warm the embedded tiny Qwen3-VL up on synthetic VQA, so later stages start
from a base that can answer, as a pretrained Qwen-VL would.

Every image token reaches the language model (budget ``None``: the allocator is not
used), the whole VLM (vision encoder and language model) is trained with answer-token
cross-entropy, and the result is exported with ``arr_coc.tiny.save_vlm`` to
``artifact/base/``. A production config (``model.source`` a real checkpoint) has a
pretrained base already: the task refuses with a ConfigError instead of retraining it.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from arr_coc.errors import ConfigError
from stages import common
from stages.base import StageContext, StageTask
from stages.data import ensure_data, read_samples, shard_urls
from stages.evaluate import vqa_accuracy

BASE_DIR = "base"


def vqa_loader(ctx: StageContext, shard_dir: Path, split: str = "train", batch_size: int | None = None):
    """The resumable shard loader over one split, this rank's share."""
    from data_prep.loader import ShardLoader

    return ShardLoader(
        shard_urls(shard_dir, split),
        batch_size=batch_size or ctx.stage.batch_size,
        rank=ctx.rank,
        world_size=ctx.world_size,
        num_workers=0,
        seed=ctx.cfg.seed,
    )


class Stage0Task(StageTask):
    def __init__(self, ctx: StageContext):
        super().__init__(ctx)
        if ctx.cfg.model.source != "tiny":
            raise ConfigError(
                f"stages.stage0: stage 0 warms up the embedded tiny model only; model.source="
                f"{ctx.cfg.model.source!r} is already pretrained (set stages.stage0.enabled: false)"
            )
        self.paths = ensure_data(ctx.cfg)
        self.processor = None

    def build_model(self) -> nn.Module:
        model, self.processor = common.build_vlm(self.ctx, base="tiny")
        model.processor = self.processor
        model.vlm.requires_grad_(True)  # vision encoder + language model; the allocator stays frozen
        return model

    def train_loader(self):
        return vqa_loader(self.ctx, self.paths.vqav2)

    def training_step(self, model, batch):
        inputs = common.vqa_inputs(self.processor, batch, self.ctx.device, with_answers=True)
        out = model(**inputs, budget=None)
        kept = sum(common.token_counts(inputs["image_grid_thw"], self.processor.merge_size)) / len(batch)
        return out.loss, {"answer_ce": float(out.loss.detach()), "tokens_kept": float(kept)}

    def evaluate(self, model) -> dict[str, float]:
        samples = read_samples(self.paths.vqav2, "val", self.ctx.stage.eval_samples)
        accuracy = vqa_accuracy(
            common.unwrap(model),
            self.processor,
            samples,
            budget=None,
            batch_size=self.ctx.stage.batch_size,
            max_new_tokens=self.ctx.cfg.model.max_answer_tokens,
            device=self.ctx.device,
        )
        return {"vqa_accuracy_all_tokens": accuracy}

    def export(self, model, artifact_dir: Path) -> None:
        vlm = common.unwrap(model).vlm
        with common.full_parameters(vlm):
            if common.is_writer(self.ctx):
                from arr_coc.tiny import save_vlm

                save_vlm(vlm, self.processor, artifact_dir / BASE_DIR)
        if common.is_writer(self.ctx):
            common.write_lineage(self.ctx, artifact_dir, self.ctx.stage_dir / "artifact" / BASE_DIR, None)
