"""One small tiny-model curriculum shared by the stage-task tests.

Each stage runs at most once per pytest session: its artifact lives under the session's
base temp folder and later callers (other test modules too) reuse it. Stages run
in-process through the real runner (``stages.runner.run_stage``: DeepSpeed engine on
CPU, checkpoints, MLflow sqlite store in the run directory).

Stages 1-3 start from the shipped tiny base (``model.source: tiny-pretrained``, stage 0
off), as production configs start from a pretrained checkpoint: a stage 0 short enough for a
test warms the tiny model up but does not make it read the image, and stage 1-3 learning is
only measurable on a base that does. Stage 0 itself runs from scratch in its own run
(``SCRATCH``), where its tests look at it.

Every stage setting a test relies on is spelled out, so a change of the shipped per-stage
defaults (which a ``--set`` of one key is merged over) does not move what the tests measure.
"""

from __future__ import annotations

from pathlib import Path

import torch

from arr_coc.config import RunConfig, load_config

REPO = Path(__file__).resolve().parents[2]
RUN_NAME = "tiny"
SCRATCH = "scratch"  # the from-scratch stage-0 run
SOURCE = "tiny-pretrained"  # the stages 1-3 base: the shipped stage-0 export
# Synthetic scenes of the stage 1-3 run: 3600 training questions, 900 held out. With 1000 scenes
# stage 2's gain at K = N/4 depended on the seed (+0.064 / -0.050 / +0.029 on seeds 0 / 1 / 2);
# with 1500 it was +0.101 / +0.068 / +0.073.
IMAGES = 1500
K = 16  # N/4 of the tiny default's 8x8 merged grid (256 px images, patch 16, merge 2)
# Stage 2's adapters (mining and stage 3 load them with the config they were saved with).
LORA_TARGETS = "[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"  # attention and MLP

STAGE_SETTINGS: dict[str, dict[str, object]] = {
    "stage0": {
        "max_steps": 200,
        "batch_size": 4,
        "lr": 3e-3,
        "budget": 64,
        "eval_samples": 48,
        "checkpoint_every": 200,
    },
    "stage1": {
        "max_steps": 200,
        "batch_size": 8,
        "lr": 3e-3,
        "budget": K,
        "eval_samples": 64,
        "checkpoint_every": 200,
    },
    "stage2": {
        "max_steps": 500,
        "batch_size": 8,
        "lr": 1e-3,
        "budget": K,
        "eval_samples": 600,  # 600 of the 900 held-out questions (standard error about 2 points)
        "checkpoint_every": 500,
        "lora.target_modules": LORA_TARGETS,
    },
    "mine": {"budget": K, "hard_fraction": 0.3, "hard_strata": "answer", "batch_size": 8, "pool_samples": 1800},
    "stage3": {
        "max_steps": 300,
        "batch_size": 8,
        "lr": 3e-4,  # the shipped default, below stage 2's (1e-3 cost the normal split 6-10 points)
        "budget": K,
        "eval_samples": 300,  # up to 300 per validation split (hard / normal)
        "checkpoint_every": 300,
        "hard_weight": 2.0,
        "replay_fraction": 0.5,
    },
}
ORDER = ("stage1", "stage2", "mine", "stage3")


def overrides(root: Path, extra: list[str] | None = None, scratch: bool = False) -> list[str]:
    images = 240 if scratch else IMAGES
    sets = [f"run.root={root}", f"run.name={SCRATCH if scratch else RUN_NAME}", f"data.images={images}"]
    if not scratch:
        sets += [f"model.source={SOURCE}", "stages.stage0.enabled=false"]
    for stage, settings in STAGE_SETTINGS.items():
        sets += [f"stages.{stage}.{key}={value}" for key, value in settings.items()]
    return sets + list(extra or [])


def config(root: Path, extra: list[str] | None = None, scratch: bool = False) -> RunConfig:
    return load_config(REPO / "configs" / "tiny.yaml", overrides(root, extra, scratch))


def artifact(root: Path, name: str) -> Path:
    """The stage's artifact, running it (and every stage before it) first if missing."""
    from stages.runner import run_stage

    torch.set_num_threads(1)
    scratch = name == "stage0"  # stage 0 has its own from-scratch run
    cfg, order = (config(root, scratch=True), ("stage0",)) if scratch else (config(root), ORDER)
    for stage in order[: order.index(name) + 1]:
        path = cfg.run_dir / stage / "artifact"
        if not (path / "metrics.json").is_file():
            run_stage(stage, cfg, resume=False)
    return cfg.run_dir / name / "artifact"


def fresh_task(root: Path, name: str, extra: list[str] | None = None):
    """A task on the same run (upstream artifacts in place), as the runner would build it."""
    from stages.engine import init_distributed
    from stages.runner import make_context
    from stages.tasks import TASKS

    rank, world_size = init_distributed()
    ctx = make_context(name, config(root, extra, scratch=name == "stage0"), None, rank, world_size)
    return TASKS[name](ctx)


def start_metrics(root: Path, name: str) -> dict[str, float]:
    """Held-out metrics of a stage's starting model (before any step), same seed as the run."""
    task = fresh_task(root, name)
    torch.manual_seed(task.ctx.cfg.seed)
    model = task.build_model()
    return task.evaluate(model)
