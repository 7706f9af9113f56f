"""Stage 2, LoRA VQA: answer questions end to end with K of the N image tokens.

Starts from the stage-1 allocator on the same base. peft LoRA adapters go on the
language model's attention projections (and the MLP's when ``lora.target_modules``
names them; the pattern is anchored to the language model so the vision encoder never
gets adapters), the allocator trains through the top-K by ``grad_mode``
(``straight_through`` by default; ``frozen`` keeps it fixed), and the loss is the
answer tokens' cross-entropy at budget K.

ZeRO-3 partitions every parameter, adapters included, so a plain ``save_pretrained``
would write empty adapter tensors. The export gathers the trainable parameters first
(``GatheredParameters``) and hands that full state dict to peft
(``save_pretrained(state_dict=...)``, safetensors). Checkpoints are the runner's
(DeepSpeed ``save_checkpoint`` of the engine that wraps this module, adapters inside).

Metric: VQA soft accuracy of greedy answers on held-out questions at budget K and with
all tokens.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from arr_coc.config import LoraSection
from arr_coc.errors import ConfigError
from stages import common
from stages.base import StageContext, StageTask
from stages.data import ensure_data, read_samples
from stages.evaluate import vqa_accuracy
from stages.heatmaps import HEATMAP_DIR, write_heatmaps
from stages.stage0 import vqa_loader

ADAPTER_DIR = "adapter"
HEATMAP_SAMPLES = 4


# ----------------------------------------------------------------------------- LoRA


def lora_config(lora: LoraSection):
    """A peft ``LoraConfig`` whose targets are the named projections inside the language model."""
    from peft import LoraConfig

    names = "|".join(re.escape(name) for name in lora.target_modules)
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=rf".*language_model\..*\.({names})",
        bias="none",
    )


def add_lora(model: nn.Module, lora: LoraSection) -> None:
    """Wrap ``model.vlm`` in a peft model with fresh adapters (trainable, everything else frozen)."""
    from peft import get_peft_model

    model.vlm = get_peft_model(model.vlm, lora_config(lora))


def load_lora(model: nn.Module, artifact_dir: Path) -> None:
    """Adapters of an upstream artifact (``adapter/``: peft format, safetensors), trainable."""
    from peft import PeftModel

    adapter_dir = Path(artifact_dir) / ADAPTER_DIR
    if not (adapter_dir / "adapter_model.safetensors").is_file():
        raise ConfigError(f"{adapter_dir}: missing adapter_model.safetensors")
    model.vlm = PeftModel.from_pretrained(model.vlm, str(adapter_dir), is_trainable=True)


def save_lora(model: nn.Module, artifact_dir: Path, write: bool) -> None:
    """Adapters from the gathered full parameters (ZeRO-3 safe), peft layout, safetensors."""
    peft_model = common.unwrap(model).vlm
    state = common.named_state(peft_model, trainable_only=True)
    if write:
        peft_model.save_pretrained(str(artifact_dir / ADAPTER_DIR), state_dict=state, safe_serialization=True)


def lora_parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for n, p in common.unwrap(model).named_parameters() if "lora_" in n)


# ----------------------------------------------------------------------------- the task


class VQATask(StageTask):
    """What stage 2, mining and stage 3 share: the base + allocator + LoRA model and VQA metrics."""

    def __init__(self, ctx: StageContext):
        super().__init__(ctx)
        # Upstream first: a missing artifact is a config error before any data is generated.
        self.upstream = common.require_upstream(ctx)
        self.base = common.base_of(ctx, self.upstream)
        self.paths = ensure_data(ctx.cfg)
        self.processor = None
        self._eval_samples: list[dict[str, Any]] | None = None

    def upstream_required(self) -> bool:
        return True

    @property
    def budget(self) -> int:
        return self.ctx.stage.budget

    def build_model(self) -> nn.Module:
        model, self.processor = common.build_vlm(self.ctx, self.base)
        common.load_allocator(model, self.upstream)
        if (self.upstream / ADAPTER_DIR).is_dir():
            load_lora(model, self.upstream)
        else:
            add_lora(model, self.ctx.stage.lora)
        model.allocator.requires_grad_(model.allocator.grad_mode != "frozen")
        return model

    def answer_loss(self, model, batch: list[dict[str, Any]]):
        """Model output on answer-labelled inputs at budget K (clipped to each image's N)."""
        inputs = common.vqa_inputs(self.processor, batch, self.ctx.device, with_answers=True)
        budgets = [
            min(self.budget, n)
            for n in common.token_counts(inputs["image_grid_thw"], self.processor.merge_size)
        ]
        return model(**inputs, budget=budgets), budgets

    def training_step(self, model, batch):
        out, budgets = self.answer_loss(model, batch)
        return out.loss, {"answer_ce": float(out.loss.detach()), "tokens_kept": sum(budgets) / len(budgets)}

    def train_loader(self):
        return vqa_loader(self.ctx, self.paths.vqav2)

    # ----------------------------------------------------------------- evaluation
    def eval_samples(self) -> list[dict[str, Any]]:
        if self._eval_samples is None:
            self._eval_samples = read_samples(self.paths.vqav2, "val", self.ctx.stage.eval_samples)
        return self._eval_samples

    def accuracy(self, model, samples, budget) -> float:
        return vqa_accuracy(
            common.unwrap(model),
            self.processor,
            samples,
            budget=budget,
            batch_size=self.ctx.stage.batch_size,
            max_new_tokens=self.ctx.cfg.model.max_answer_tokens,
            device=self.ctx.device,
        )

    @torch.no_grad()
    def answer_loss_on(self, model, samples) -> float:
        """Mean held-out answer cross-entropy per question at budget K (teacher-forced)."""
        module = common.unwrap(model)
        size = self.ctx.stage.batch_size
        losses: list[float] = []
        for start in range(0, len(samples), size):
            out, _ = self.answer_loss(module, samples[start : start + size])
            losses.extend(out.per_sample_loss.float().cpu().tolist())
        return sum(losses) / len(losses)

    def evaluate(self, model) -> dict[str, float]:
        samples = self.eval_samples()
        return {
            "vqa_accuracy": self.accuracy(model, samples, self.budget),
            "vqa_accuracy_all_tokens": self.accuracy(model, samples, None),
            "answer_loss": self.answer_loss_on(model, samples),
            "budget": float(self.budget),
            "eval_samples": float(len(samples)),
        }

    # ----------------------------------------------------------------- export
    def export(self, model, artifact_dir: Path) -> None:
        write = common.is_writer(self.ctx)
        common.save_allocator(model, artifact_dir, write=write)
        save_lora(model, artifact_dir, write=write)
        self.export_heatmaps(model, artifact_dir)
        if write:
            common.write_lineage(self.ctx, artifact_dir, self.base, self.upstream)

    @torch.no_grad()
    def export_heatmaps(self, model, artifact_dir: Path) -> None:
        module = common.unwrap(model)
        samples = self.eval_samples()[:HEATMAP_SAMPLES]
        inputs = common.vqa_inputs(self.processor, samples, self.ctx.device, with_answers=False)
        grids = common.merged_grid(inputs["image_grid_thw"], self.processor.merge_size)
        allocations = module.score_tokens(**inputs, budget=[min(self.budget, h * w) for h, w in grids])
        if common.is_writer(self.ctx):
            names = [s["json"]["question"] for s in samples]
            write_heatmaps(artifact_dir / HEATMAP_DIR, names, inputs["images"], allocations, grids)


class Stage2Task(VQATask):
    """LoRA + allocator on VQA answers at budget K, from the stage-1 allocator."""
