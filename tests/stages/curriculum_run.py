"""One small tiny-model curriculum shared by the stage-task tests.

Each stage runs at most once per pytest session: its artifact lives under the session's
base temp folder and later callers (other test modules too) reuse it. Stages run
in-process through the real runner (``stages.runner.run_stage``: DeepSpeed engine on
CPU, checkpoints, MLflow sqlite store in the run directory).

Every stage setting a test relies on is spelled out: overriding one key of a stage
section replaces that section, so unspecified keys fall back to the generic defaults.
"""

from __future__ import annotations

from pathlib import Path

import torch

from arr_coc.config import RunConfig, load_config

REPO = Path(__file__).resolve().parents[2]
RUN_NAME = "tiny"
K = 16  # N/4 of the tiny default's 8x8 merged grid (256 px images, patch 16, merge 2)

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
        "max_steps": 40,
        "batch_size": 4,
        "lr": 3e-3,
        "budget": K,
        "eval_samples": 64,
        "checkpoint_every": 40,
    },
    "stage2": {
        "max_steps": 150,
        "batch_size": 4,
        "lr": 5e-3,
        "budget": K,
        "eval_samples": 144,
        "checkpoint_every": 150,
    },
    "mine": {"budget": K, "hard_fraction": 0.3, "batch_size": 8},
    "stage3": {
        "max_steps": 60,
        "batch_size": 4,
        "lr": 3e-3,
        "budget": K,
        "eval_samples": 48,
        "checkpoint_every": 60,
        "hard_weight": 2.0,
        "replay_fraction": 0.5,
    },
}
ORDER = ("stage0", "stage1", "stage2", "mine", "stage3")


def overrides(root: Path, extra: list[str] | None = None) -> list[str]:
    sets = [f"run.root={root}", f"run.name={RUN_NAME}", "data.images=240"]
    for stage, settings in STAGE_SETTINGS.items():
        sets += [f"stages.{stage}.{key}={value}" for key, value in settings.items()]
    return sets + list(extra or [])


def config(root: Path, extra: list[str] | None = None) -> RunConfig:
    return load_config(REPO / "configs" / "tiny.yaml", overrides(root, extra))


def artifact(root: Path, name: str) -> Path:
    """The stage's artifact, running it (and every stage before it) first if missing."""
    from stages.runner import run_stage

    torch.set_num_threads(1)
    cfg = config(root)
    for stage in ORDER[: ORDER.index(name) + 1]:
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
    ctx = make_context(name, config(root, extra), None, rank, world_size)
    return TASKS[name](ctx)


def start_metrics(root: Path, name: str) -> dict[str, float]:
    """Held-out metrics of a stage's starting model (before any step), same seed as the run."""
    task = fresh_task(root, name)
    torch.manual_seed(task.ctx.cfg.seed)
    model = task.build_model()
    return task.evaluate(model)
