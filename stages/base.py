"""The seam between the generic stage runner and the per-stage tasks.

The runner (``stages.runner``) owns the DeepSpeed engine, the loop, checkpoints,
resume and MLflow. A task owns what differs per stage: which model is trained,
which data it sees, the loss, the held-out evaluation and the exported weights.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from arr_coc.config import RunConfig, StageSection


@dataclass
class StageContext:
    cfg: RunConfig
    """The resolved run config."""
    name: str
    """Stage name: ``stage0``, ``stage1``, ``stage2``, ``mine`` or ``stage3``."""
    stage: StageSection
    """``cfg.stage(name)``."""
    run_dir: Path
    """``<run.root>/<run.name>``."""
    stage_dir: Path
    """``run_dir / name``: checkpoints/ and artifact/ live here."""
    init_from: Path | None
    """The upstream stage's artifact directory, if any."""
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")


class StageTask(ABC):
    """What one curriculum stage trains, on which data, with which loss."""

    trains: bool = True
    """False for tasks without optimizer steps (mining): the runner skips the engine, the
    loop and checkpoints, and only calls ``build_model``, ``evaluate`` and ``export``."""

    def __init__(self, ctx: StageContext):
        self.ctx = ctx

    def upstream_required(self) -> bool:
        """Whether ``ctx.init_from`` must name an existing artifact."""
        return False

    @abstractmethod
    def build_model(self) -> nn.Module:
        """The module the engine wraps; only trainable parameters have ``requires_grad``."""

    @abstractmethod
    def train_loader(self) -> Iterable[Any]:
        """Training batches; the object also has ``state_dict()`` / ``load_state_dict()``."""

    @abstractmethod
    def training_step(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss for one micro-batch and scalar logs (loss parts, tokens kept, ...)."""

    @abstractmethod
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Metrics on held-out data."""

    @abstractmethod
    def export(self, model: nn.Module, artifact_dir: Path) -> None:
        """Write trainable weights (``*.safetensors``) and heatmaps into ``artifact_dir``."""
