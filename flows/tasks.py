"""Prefect tasks of the curriculum: data, one stage job, evaluate, report, register.

A stage task's result (the artifact path plus its wall time) is persisted in the run
directory (``<run>/.prefect/results``) under a cache key made of the stage's config
hash and the content hash of every upstream artifact, so triggering the same run again
finds the finished stages there and skips them, whichever Prefect server records the
run. A stage that crashed has no cached result; running it again starts the same
command, and the stage runner resumes from its newest committed checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext

from arr_coc.config import RunConfig
from arr_coc.errors import ArrCocError
from flows.caching import combine, hash_tree
from flows.jobs import StageJobError, run_stage_job
from flows.plan import ARTIFACT_MARKER, artifact_complete
from stages.tracking import PARENT_ENV

RESULTS_DIR = ".prefect/results"


def result_storage(run_dir: Path) -> Path:
    """Where task results (and so the cache) live: inside the run directory, next to the artifacts."""
    path = (run_dir / RESULTS_DIR).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def stage_cache_key(_context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """Stage config hash + content hash of every upstream artifact."""
    upstream = [hash_tree(path) for path in parameters["reads"]]
    return "stage-" + combine(parameters["name"], parameters["fingerprint"], *upstream)


def retry_transient(_task: Any, _task_run: Any, state: Any) -> bool:
    """Retry a stage only for failures a second attempt can fix: never a config error
    (job exit code 2), never an error raised before the job started."""
    try:
        state.result()
    except StageJobError as err:
        return err.transient
    except Exception:
        return False
    return False


@task(name="shard", task_run_name="shard", cache_policy=NO_CACHE)
def prepare_data(cfg: RunConfig) -> dict[str, str]:
    """Generate (synthetic) and shard the run's data; keeps and verifies existing shards."""
    from stages.data import ensure_data

    paths = ensure_data(cfg)
    counts = {}
    for kind in ("coco", "vqav2"):
        manifest = json.loads((getattr(paths, kind) / "manifest.json").read_text())
        counts[kind] = manifest.get("totals", manifest.get("total"))
    get_run_logger().info("shards ready: coco %s, vqav2 %s", counts["coco"], counts["vqav2"])
    return {"coco": str(paths.coco), "vqav2": str(paths.vqav2)}


@task(
    name="stage",
    task_run_name="{name}",
    cache_key_fn=stage_cache_key,
    persist_result=True,
    retries=1,
    retry_delay_seconds=5,
    retry_condition_fn=retry_transient,
)
def run_stage(
    name: str,
    command: list[str],
    fingerprint: str,
    reads: list[str],
    artifact: str,
    parent_run_id: str | None,
) -> dict[str, Any]:
    """Run one stage job to completion; returns its artifact path and wall time."""
    logger = get_run_logger()
    env = {PARENT_ENV: parent_run_id} if parent_run_id else {}
    result = run_stage_job(name, command, logger, env=env)
    if not artifact_complete(Path(artifact)):
        raise ArrCocError(f"stage {name} exited 0 but {Path(artifact) / ARTIFACT_MARKER} is missing")
    logger.info("%s finished in %.1f s -> %s", name, result.wall_s, artifact)
    return {"stage": name, "artifact": artifact, "wall_s": result.wall_s}


@task(name="evaluate", task_run_name="evaluate", cache_policy=NO_CACHE)
def evaluate(artifacts: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Collect every stage's held-out metrics (written by the stage's own evaluation)."""
    metrics = {}
    for name, artifact in artifacts.items():
        metrics[name] = json.loads((Path(artifact) / ARTIFACT_MARKER).read_text())
    return metrics


@task(name="report", task_run_name="report", cache_policy=NO_CACHE)
def report(
    cfg: RunConfig, rows: list[dict[str, Any]], artifacts: dict[str, str], parent_run_id: str
) -> dict[str, Any]:
    """Write ``<run>/report/summary.{md,json}``, list the heatmaps, and put the final metrics
    (``<stage>/<metric>``) and the report files on the MLflow parent run."""
    from flows.report import write_report
    from flows.tracking import log_summary

    summary = write_report(cfg.run_dir / "report", rows, artifacts)
    final = {
        f"{row['stage']}/{key}": value
        for row in rows
        for key, value in row.get("metrics", {}).items()
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    }
    log_summary(cfg, parent_run_id, final, [Path(p) for p in summary["files"]])
    return summary


@task(name="register", task_run_name="register", cache_policy=NO_CACHE)
def register_model(cfg: RunConfig, parent_run_id: str, final_artifact: str) -> dict:
    """Log the final allocator + adapters to the parent run and register a model version."""
    from flows.tracking import register

    model_dirs = {"final": Path(final_artifact)}
    lineage = Path(final_artifact) / "lineage.json"
    if lineage.is_file():
        base = json.loads(lineage.read_text()).get("base")
        if base and Path(base).is_dir():
            model_dirs["base"] = Path(base)
    registered = register(cfg, parent_run_id, model_dirs)
    get_run_logger().info("registered %s version %s", registered["name"], registered["version"])
    return registered
