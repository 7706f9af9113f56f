"""A small but real StageTask for the runner tests, and a script entry to run it.

A regression MLP with a frozen ``backbone`` (not checkpointed: rebuilt by the task), a
trainable ``allocator`` with dropout (torch RNG) and a trainable ``head``; the loss
also draws from Python's and numpy's RNG, so an exact resume must restore all three
generators and the loader position. Evaluation draws from the torch RNG on purpose:
the runner must keep evaluation from moving the training streams.

``python tests/stages/toy_task.py NAME --config F --set ...`` registers the toy task
under every stage name and runs ``stages.launch.main`` (also under ``deepspeed``).
"""

from __future__ import annotations

import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from stages.base import StageTask

DIM = 8


class ToyLoader:
    """Infinite deterministic batches; batch ``i`` of rank ``r`` depends only on (seed, r, i)."""

    def __init__(self, batch_size: int, seed: int, rank: int):
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.index = 0

    def __iter__(self):
        while True:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.rank * 10_007 + self.index)
            self.index += 1
            x = torch.randn(self.batch_size, DIM, generator=gen)
            yield x, torch.sin(x).sum(dim=1, keepdim=True)

    def state_dict(self) -> dict[str, int]:
        return {"index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.index = int(state["index"])


class ToyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Linear(DIM, 16)
        self.allocator = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Dropout(0.1))
        self.head = nn.Linear(16, 1)
        self.backbone.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.allocator(torch.tanh(self.backbone(x))))


class ToyTask(StageTask):
    def build_model(self) -> nn.Module:
        return ToyModel()

    def train_loader(self) -> ToyLoader:
        return ToyLoader(self.ctx.stage.batch_size, self.ctx.cfg.seed, self.ctx.rank)

    def training_step(self, model, batch):
        x, y = batch
        # Slows steps so a test can SIGKILL the process between two checkpoints.
        time.sleep(float(os.environ.get("TOY_STEP_SLEEP", "0")))
        jitter = 1.0 + 0.01 * random.random() + 0.01 * float(np.random.rand())
        loss = ((model(x) - y) ** 2).mean() * jitter
        return loss, {"tokens_kept": float(x.shape[0])}

    def evaluate(self, model) -> dict[str, float]:
        torch.randn(3)  # moves the torch RNG: the runner must isolate evaluation
        gen = torch.Generator().manual_seed(12345)
        x = torch.randn(64, DIM, generator=gen)
        y = torch.sin(x).sum(dim=1, keepdim=True)
        return {"mse": float(((model(x) - y) ** 2).mean())}

    def export(self, model, artifact_dir: Path) -> None:
        import deepspeed
        from safetensors.torch import save_file

        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        zero3 = [p for _, p in params if hasattr(p, "ds_id")]
        with deepspeed.zero.GatheredParameters(zero3, modifier_rank=None, enabled=bool(zero3)):
            state = {n: p.detach().clone().contiguous() for n, p in params}
        if self.ctx.rank == 0:
            save_file(state, str(artifact_dir / "toy.safetensors"))


class ToyTaskWithUpstream(ToyTask):
    def upstream_required(self) -> bool:
        return True


class ToyScoringTask(ToyTask):
    """A task without training (like mining): evaluate and export only."""

    trains = False

    def train_loader(self):
        raise AssertionError("the runner must not ask a non-training task for training data")

    def training_step(self, model, batch):
        raise AssertionError("the runner must not train a non-training task")


TOY_TASKS = {"stage2": ToyTaskWithUpstream, "mine": ToyScoringTask}


def main(argv: list[str]) -> int:
    torch.set_num_threads(1)
    from arr_coc.config import STAGE_NAMES
    from stages.launch import main as launch_main
    from stages.tasks import TASKS

    for name in STAGE_NAMES:
        TASKS.register(name, TOY_TASKS.get(name, ToyTask))
    return launch_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
