"""The curriculum as a plan: which stages run, what each starts from, how each is launched.

Building the plan touches no GPU and trains nothing, so it doubles as the dry run
(``arr-coc curriculum --dry-run``): it resolves every stage's launcher command and
DeepSpeed config and checks every path the run will need, turning a bad config into
one ``ConfigError`` line before any job is started.
"""

from __future__ import annotations

import contextlib
import json
import shlex
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from unittest import mock

from arr_coc.config import STAGE_NAMES, RunConfig, load_config
from arr_coc.errors import ConfigError
from flows.caching import stage_fingerprint

REPO_ROOT = Path(__file__).resolve().parent.parent
# The artifact each stage starts from (``--init-from``).
# Same chain as ``stages.common.UPSTREAM``: stage 3 starts from the mining artifact (hard set),
# which leads back to the stage-2 weights through its lineage.
INIT_FROM = {"stage1": "stage0", "stage2": "stage1", "mine": "stage2", "stage3": "mine"}
# Further artifacts a stage reads (stage 3 loads the stage-2 weights).
READS = {"stage3": ["stage2"]}
# A stage's artifact is complete once the runner has written its metrics.
ARTIFACT_MARKER = "metrics.json"
DATA_PATH_KEYS = ("coco_annotations", "coco_images", "vqa_questions", "vqa_annotations", "vqa_images")


@dataclass
class StagePlan:
    name: str
    stage_dir: Path
    init_from: Path | None
    """Upstream artifact passed as ``--init-from``."""
    reads: list[Path]
    """Every upstream artifact the stage depends on (hashed into its cache key)."""
    fingerprint: str
    command: list[str] = field(default_factory=list)

    @property
    def artifact(self) -> Path:
        return self.stage_dir / "artifact"


@dataclass
class CurriculumPlan:
    cfg: RunConfig
    config_path: Path
    overrides: list[str]
    stages: list[StagePlan]
    skipped: list[str]
    """Curriculum stages before ``start_at`` whose existing artifacts are reused."""

    @property
    def run_dir(self) -> Path:
        return self.cfg.run_dir


def resolve_config_path(config: str | Path) -> Path:
    """An absolute config path; relative names also resolve against the repository root,
    so a served deployment's default ``configs/tiny.yaml`` works from any directory."""
    path = Path(config).expanduser()
    if not path.is_absolute() and not path.exists() and (REPO_ROOT / path).exists():
        path = REPO_ROOT / path
    if not path.is_file():
        raise ConfigError(f"{config}: config file not found")
    return path.resolve()


def expand_run_name(run_name: str) -> str:
    """``{date}`` in a run name becomes today's UTC date (nightly runs get one directory per night)."""
    return run_name.replace("{date}", datetime.now(timezone.utc).strftime("%Y%m%d"))


def run_overrides(overrides: list[str] | None, run_name: str | None) -> list[str]:
    result = list(overrides or [])
    if run_name:
        result.append(f"run.name={expand_run_name(run_name)}")
    return result


def curriculum_stages(cfg: RunConfig) -> list[str]:
    """Enabled stages in order; stage 0 only warms up the embedded tiny base."""
    names = []
    for name in STAGE_NAMES:
        if not cfg.stage(name).enabled:
            continue
        if name == "stage0" and cfg.model.source != "tiny":
            continue
        names.append(name)
    return names


def artifact_complete(artifact: Path) -> bool:
    return (artifact / ARTIFACT_MARKER).is_file()


def _select(names: list[str], start_at: str | None, stop_after: str | None) -> tuple[list[str], list[str]]:
    for key, value in (("start_at", start_at), ("stop_after", stop_after)):
        if value is not None and value not in names:
            raise ConfigError(f"{key}: {value!r} is not a stage of this curriculum ({', '.join(names)})")
    first = names.index(start_at) if start_at else 0
    last = names.index(stop_after) if stop_after else len(names) - 1
    if last < first:
        raise ConfigError(f"stop_after: {stop_after!r} comes before start_at {start_at!r}")
    return names[first : last + 1], names[:first]


def _upstream(name: str, enabled: list[str], run_dir: Path) -> tuple[Path | None, list[Path]]:
    parent = INIT_FROM.get(name)
    init_from = run_dir / parent / "artifact" if parent in enabled else None
    reads = [init_from] if init_from else []
    reads += [run_dir / extra / "artifact" for extra in READS.get(name, []) if extra in enabled]
    return init_from, reads


def check_data(cfg: RunConfig) -> None:
    """COCO/VQAv2 inputs must exist unless their shards are already in the run directory."""
    if cfg.data.source != "coco":
        return
    shards = cfg.run_dir / "data" / "shards"
    if all((shards / kind / "manifest.json").is_file() for kind in ("coco", "vqav2")):
        return
    for key in DATA_PATH_KEYS:
        path = Path(getattr(cfg.data, key))
        if not path.exists():
            raise ConfigError(f"data.{key}: {path}: not found")


def check_launcher(cfg: RunConfig) -> None:
    if cfg.launcher.kind == "hostfile":
        path = Path(cfg.launcher.hostfile or "")
        if not path.is_file():
            raise ConfigError(f"launcher.hostfile: {path}: not found")


def build_plan(
    config: str | Path,
    overrides: list[str] | None = None,
    start_at: str | None = None,
    stop_after: str | None = None,
    run_name: str | None = None,
    check_data_paths: bool = True,
) -> CurriculumPlan:
    """Load the config and resolve every selected stage; raises ``ConfigError`` naming the key or path."""
    from stages.launch import launcher_command  # the stage package owns the command line

    config_path = resolve_config_path(config)
    overrides = run_overrides(overrides, run_name)
    cfg = load_config(config_path, overrides)
    enabled = curriculum_stages(cfg)
    selected, skipped = _select(enabled, start_at, stop_after)
    if check_data_paths:
        check_data(cfg)
    check_launcher(cfg)
    stages = []
    for name in selected:
        init_from, reads = _upstream(name, enabled, cfg.run_dir)
        for artifact in reads:
            producer = artifact.parent.name
            if producer in skipped and not artifact_complete(artifact):
                raise ConfigError(f"{artifact}: upstream artifact of {name} not found (run {producer} first)")
        plan = StagePlan(
            name=name,
            stage_dir=cfg.run_dir / name,
            init_from=init_from,
            reads=reads,
            fingerprint=stage_fingerprint(cfg, name),
        )
        plan.command = launcher_command(cfg, name, str(config_path), overrides, init_from)
        stages.append(plan)
    return CurriculumPlan(cfg, config_path, overrides, stages, skipped)


def targets_gpus(cfg: RunConfig) -> bool:
    """``deepspeed`` and ``hostfile`` launchers start jobs on GPU nodes."""
    return cfg.launcher.kind != "inprocess"


def resolved_deepspeed(plan: CurriculumPlan) -> dict[str, dict[str, Any]]:
    """Each stage's DeepSpeed config as its job will resolve it.

    The engine picks bf16, the optimizer and offload targets from ``cuda_available()`` at
    run time; for a GPU launcher the dry run (often on a CPU-only CI box or head node)
    resolves it as the GPU nodes will, so the printed config is the one that will run.
    """
    from stages import engine

    hardware = mock.patch.object(engine, "cuda_available", return_value=True)
    with hardware if targets_gpus(plan.cfg) else contextlib.nullcontext():
        return {stage.name: engine.resolve_deepspeed_config(plan.cfg, stage.name) for stage in plan.stages}


def dry_run_text(plan: CurriculumPlan) -> str:
    """What ``--dry-run`` prints: per stage, its command line and resolved DeepSpeed config."""
    deepspeed = resolved_deepspeed(plan)
    device = "CUDA (GPU launcher)" if targets_gpus(plan.cfg) else "this machine"
    lines = [f"run directory: {plan.run_dir}", f"config: {plan.config_path}", f"resolved for: {device}"]
    if plan.skipped:
        lines.append(f"reused artifacts of: {', '.join(plan.skipped)}")
    for stage in plan.stages:
        lines.append("")
        lines.append(f"== {stage.name}  (init_from: {stage.init_from or '-'})")
        lines.append(f"command: {shlex.join(stage.command)}")
        lines.append("deepspeed config:")
        lines.append(json.dumps(deepspeed[stage.name], indent=2, sort_keys=True))
    return "\n".join(lines)
