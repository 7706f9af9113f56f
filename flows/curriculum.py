"""The curriculum DAG and the single-stage flow.

``curriculum``: shard -> stage 0 (tiny only) -> stage 1 -> stage 2 -> mine -> stage 3
-> evaluate -> report -> register. Stages run one after the other as subprocess jobs;
only artifact paths travel between them. Finished stages come back from the cache
(see ``flows.tasks``), so re-triggering a run only does the work that is left.

``stage``: run or resume one stage of a run directory (no cache: asking for a stage
means running it; the runner resumes from its newest checkpoint unless ``resume`` is off).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.context import get_run_context

from arr_coc.errors import ArrCocError, ConfigError
from flows import tasks
from flows.plan import StagePlan, artifact_complete, build_plan, curriculum_stages
from flows.tracking import PARENT_FILE, end_parent_run, start_parent_run, tracking_uri

StageName = Literal["stage0", "stage1", "stage2", "mine", "stage3"]
DEFAULT_CONFIG = "configs/tiny.yaml"


def _flow_run_id() -> str | None:
    try:
        return str(get_run_context().flow_run.id)
    except Exception:  # called outside a flow run
        return None


def run_cached_stage(
    stage: StagePlan, storage: Path, parent_run_id: str | None, retries: int
) -> tuple[dict[str, Any], str]:
    """Run one stage task (or take its cached result); returns its record and ``ran``/``cached``."""
    runner = tasks.run_stage.with_options(
        result_storage=storage,
        retries=retries,
        # A cached result is only good while its artifact is still on disk.
        refresh_cache=not artifact_complete(stage.artifact),
    )
    state = runner(
        stage.name,
        stage.command,
        stage.fingerprint,
        [str(p) for p in stage.reads],
        str(stage.artifact),
        parent_run_id,
        return_state=True,
    )
    record = state.result()  # raises the stage's error if it failed
    return record, "cached" if state.name == "Cached" else "ran"


@flow(name="curriculum", log_prints=True)
def curriculum(
    config: str = DEFAULT_CONFIG,
    start_at: StageName | None = None,
    stop_after: StageName | None = None,
    run_name: str | None = None,
    overrides: list[str] | None = None,
    stage_retries: int = 1,
) -> dict[str, Any]:
    """Train the whole ARR-COC curriculum (or a slice of it) and register the result.

    Args:
        config: Run config YAML (relative paths also resolve against the repository).
        start_at: First stage to run; earlier stages' artifacts in the run directory are reused.
        stop_after: Last stage to run (evaluate/report still run; register only after the last stage).
        run_name: Overrides `run.name`, i.e. the run directory `<run.root>/<run_name>`.
        overrides: Dotted `key.sub=value` overrides, as `--set` on the command line.
        stage_retries: Retries of a stage job after a transient failure (never after a config error).
    """
    started = time.perf_counter()
    logger = get_run_logger()
    plan = build_plan(config, overrides, start_at, stop_after, run_name)
    cfg = plan.cfg
    storage = tasks.result_storage(cfg.run_dir)
    parent = start_parent_run(cfg, _flow_run_id())
    logger.info(
        "run %s: stages %s (mlflow parent run %s)", cfg.run_dir, [s.name for s in plan.stages], parent
    )
    ok = False
    rows: list[dict[str, Any]] = []

    def budget(name: str) -> int | None:
        """Tokens kept per sample (K); stage 0 warms the base up on all tokens."""
        return None if name == "stage0" else cfg.stage(name).budget

    artifacts = {name: str(cfg.run_dir / name / "artifact") for name in plan.skipped}
    try:
        data_started = time.perf_counter()
        tasks.prepare_data(cfg)
        rows.append({"stage": "shard", "status": "ready", "wall_s": time.perf_counter() - data_started})
        rows += [{"stage": n, "status": "reused", "wall_s": None, "budget": budget(n)} for n in plan.skipped]
        for index, stage in enumerate(plan.stages, start=1):
            logger.info("[%d/%d] %s", index, len(plan.stages), stage.name)
            record, status = run_cached_stage(stage, storage, parent, stage_retries)
            logger.info("%s: %s", stage.name, status)
            artifacts[stage.name] = record["artifact"]
            rows.append(
                {
                    "stage": stage.name,
                    "status": status,
                    "wall_s": record["wall_s"],
                    "budget": budget(stage.name),
                }
            )
        metrics = tasks.evaluate(artifacts)
        for row in rows:
            row["metrics"] = metrics.get(row["stage"], {})
        summary = tasks.report(cfg, rows, artifacts, parent)
        registered = None
        last = curriculum_stages(cfg)[-1]
        if plan.stages and plan.stages[-1].name == last:
            registered = tasks.register_model(cfg, parent, artifacts[last])
        else:
            logger.info("stopped after %s: no model version registered", plan.stages[-1].name)
        ok = True
    finally:
        end_parent_run(cfg, parent, ok)
    logger.info("summary\n%s", summary["table"])
    return {
        "run_dir": str(cfg.run_dir),
        "stages": rows,
        "artifacts": artifacts,
        "table": summary["table"],
        "heatmaps": summary["heatmaps"],
        "report": summary["files"],
        "registered": registered,
        "mlflow_parent_run_id": parent,
        "tracking_uri": tracking_uri(cfg),
        "wall_s": time.perf_counter() - started,
    }


@flow(name="stage", log_prints=True)
def stage(
    name: StageName,
    config: str = DEFAULT_CONFIG,
    run_name: str | None = None,
    overrides: list[str] | None = None,
    resume: bool = True,
    init_from: str | None = None,
) -> dict[str, Any]:
    """Run or resume one stage of a run directory.

    Args:
        name: The stage to run.
        config: Run config YAML.
        run_name: Overrides `run.name` (the run directory).
        overrides: Dotted `key.sub=value` overrides.
        resume: Resume from the newest committed checkpoint (off: start the stage over).
        init_from: Upstream artifact directory (default: the previous stage's artifact in the run).
    """
    plan = build_plan(config, overrides, start_at=name, stop_after=name, run_name=run_name)
    job = plan.stages[0]
    command = list(job.command)
    reads = [str(p) for p in job.reads]
    if init_from is not None:
        if not Path(init_from).is_dir():
            raise ConfigError(f"init_from: {init_from}: not found")
        if "--init-from" in command:
            command[command.index("--init-from") + 1] = str(init_from)
        else:
            command += ["--init-from", str(init_from)]
        reads = [str(init_from)] + [r for r in reads if r != str(job.init_from)]
    if not resume:
        command.append("--no-resume")
    parent_record = plan.cfg.run_dir / PARENT_FILE
    parent = start_parent_run(plan.cfg, _flow_run_id()) if parent_record.is_file() else None
    ok = False
    try:
        # Always run (refresh), and store the result so a later curriculum run reuses it.
        runner = tasks.run_stage.with_options(
            result_storage=tasks.result_storage(plan.cfg.run_dir), refresh_cache=True
        )
        record = runner(job.name, command, job.fingerprint, reads, str(job.artifact), parent)
        ok = True
    finally:
        if parent:
            end_parent_run(plan.cfg, parent, ok)
    if not artifact_complete(job.artifact):
        raise ArrCocError(f"{job.artifact}: stage {name} left no complete artifact")
    return record
