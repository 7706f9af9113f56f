"""Stage 0: warm the embedded tiny Qwen3-VL up on synthetic VQA, so later stages start
from a base that can answer, as a pretrained Qwen-VL would.

Every image token reaches the language model (budget ``None``: the allocator is not
used), the whole VLM (vision encoder and language model) is trained with answer-token
cross-entropy, and the result is exported with ``arr_coc.tiny.save_vlm`` to
``artifact/base/``. A production config (``model.source`` a real checkpoint) has a
pretrained base already: the task refuses with a ConfigError instead of retraining it.

Optionally a share of each batch (``caption_fraction``, default 0) are captions of the
COCO-shard images ("what is in the image?" -> "red circle left . blue square top ..."), as
real VLMs are aligned on captions before instruction data. From VQA answers alone the
from-scratch base learns the answer priors first and reads the image only slowly; a caption
names every object. ``bench/stage0_recipes.py`` compares recipes side by side (real-image
minus blank-image first-token accuracy on held-out questions; its docstring has the figures).

A stage 0 short enough for a CPU test run (hundreds of samples) teaches the answer format
but not reading the image. The shipped tiny base (``model.source: tiny-pretrained``, see
``arr_coc.tiny``) is this stage's export after a long run of the same code with captions,
and is what the stage 1-3 learning tests and ``bench/budget_curve.py`` start from.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from arr_coc.errors import ConfigError
from data_prep.synth import CAPTION_QUESTION, describe
from stages import common
from stages.base import StageContext, StageTask
from stages.data import JoinedLoader, ensure_data, read_samples, shard_urls
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


def caption_items(meta: dict) -> list[dict]:
    """One caption item per COCO record with objects (an empty scene has nothing to name)."""
    caption = describe(meta.get("objects") or [], meta["width"], meta["height"])
    return [] if caption is None else [{"caption": caption}]


def as_caption_sample(sample: dict) -> dict:
    return {"__key__": sample["__key__"], "image": sample["image"],
            "json": {"question": CAPTION_QUESTION, "answer": sample["caption"]}}


def caption_count(batch_size: int, caption_fraction: float) -> int:
    """Caption items per batch; at least one VQA item stays."""
    return min(batch_size - 1, round(batch_size * caption_fraction))


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
        from data_prep.loader import ShardLoader

        stage = self.ctx.stage
        n_captions = caption_count(stage.batch_size, stage.caption_fraction)
        vqa = vqa_loader(self.ctx, self.paths.vqav2, batch_size=stage.batch_size - n_captions)
        if not n_captions:
            return JoinedLoader({"vqa": (vqa, {})})
        captions = ShardLoader(
            shard_urls(self.paths.coco, "train"),
            batch_size=n_captions,
            rank=self.ctx.rank,
            world_size=self.ctx.world_size,
            num_workers=0,
            seed=self.ctx.cfg.seed,
            expand=caption_items,
            transform=as_caption_sample,
        )
        return JoinedLoader({"vqa": (vqa, {}), "captions": (captions, {})})

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
