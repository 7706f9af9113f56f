"""The curriculum's MLflow parent run and the model registration at the end.

One parent run per run directory: its id is kept in ``<run>/curriculum_run.json`` so a
re-triggered or resumed curriculum continues the same parent run, and stage jobs nest
under it through ``ARR_COC_MLFLOW_PARENT_RUN_ID``. The flow talks to MLflow through
``MlflowClient`` (no fluent active-run state in the orchestrator process).
"""

from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path

from arr_coc.config import RunConfig

# The stage jobs' rule (config, then MLFLOW_TRACKING_URI, then sqlite in the run): one store for both.
from stages.tracking import flatten, tracking_uri

PARENT_FILE = "curriculum_run.json"
MODEL_ARTIFACT_PATH = "model"


def _client(cfg: RunConfig):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri(cfg))


def experiment_id(cfg: RunConfig) -> str:
    """The experiment, created with its artifacts in the run directory for a local store."""
    client = _client(cfg)
    found = client.get_experiment_by_name(cfg.mlflow.experiment)
    if found is not None:
        return found.experiment_id
    location = None
    if tracking_uri(cfg).startswith("sqlite:"):
        location = (cfg.run_dir / "mlartifacts").resolve().as_uri()
    return client.create_experiment(cfg.mlflow.experiment, artifact_location=location)


_store_warmups: dict[str, threading.Thread] = {}


def warm_store(cfg: RunConfig) -> None:
    """Create the tracking store and experiment in a background thread.

    A new sqlite store runs MLflow's schema migrations (seconds). The CLI calls this before
    the flow starts, so they overlap with the embedded Prefect server's start-up;
    ``start_parent_run`` waits for it. Errors are left for ``start_parent_run`` to raise
    with the real call's context.
    """
    uri = tracking_uri(cfg)
    if uri in _store_warmups:
        return

    def create() -> None:
        try:
            cfg.run_dir.mkdir(parents=True, exist_ok=True)
            experiment_id(cfg)
        except Exception:  # noqa: BLE001 - reported by start_parent_run
            pass

    thread = threading.Thread(target=create, name="mlflow-store-warmup", daemon=True)
    _store_warmups[uri] = thread
    thread.start()


def _wait_for_store(cfg: RunConfig) -> None:
    thread = _store_warmups.pop(tracking_uri(cfg), None)
    if thread is not None:
        thread.join()


def start_parent_run(cfg: RunConfig, flow_run_id: str | None = None) -> str:
    """Start (or re-open) the curriculum's parent run; returns its id."""
    from mlflow.entities import Param
    from mlflow.exceptions import MlflowException

    _wait_for_store(cfg)
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    client = _client(cfg)
    record = cfg.run_dir / PARENT_FILE
    if record.is_file():
        run_id = json.loads(record.read_text())["mlflow_run_id"]
        try:
            client.get_run(run_id)
        except MlflowException:  # a new or wiped store: start a new parent run
            run_id = None
        if run_id:
            client.update_run(run_id, status="RUNNING")
            return run_id
    tags = {"mlflow.runName": f"curriculum-{cfg.run.name}", "arr_coc.kind": "curriculum"}
    if flow_run_id:
        tags["prefect.flow_run_id"] = flow_run_id
    run = client.create_run(experiment_id(cfg), tags=tags)
    run_id = run.info.run_id
    params = [Param(k, v[:6000]) for k, v in sorted(flatten(cfg.to_dict()).items())]
    for start in range(0, len(params), 100):
        client.log_batch(run_id, params=params[start : start + 100])
    record.write_text(json.dumps({"mlflow_run_id": run_id, "tracking_uri": tracking_uri(cfg)}, indent=2))
    return run_id


def end_parent_run(cfg: RunConfig, run_id: str, ok: bool) -> None:
    _client(cfg).set_terminated(run_id, status="FINISHED" if ok else "FAILED")


def log_summary(cfg: RunConfig, run_id: str, metrics: dict[str, float], files: list[Path]) -> None:
    """Final per-stage metrics (``<stage>.<metric>``) and the report files on the parent run."""
    from mlflow.entities import Metric

    client = _client(cfg)
    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, 0) for k, v in sorted(metrics.items()) if math.isfinite(float(v))]
    for start in range(0, len(batch), 500):
        client.log_batch(run_id, metrics=batch[start : start + 500])
    for file in files:
        client.log_artifact(run_id, str(file), artifact_path="report")


def _record(cfg: RunConfig) -> dict:
    path = cfg.run_dir / PARENT_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def register(cfg: RunConfig, run_id: str, model_dirs: dict[str, Path]) -> dict[str, str]:
    """Log the final allocator and adapters under ``model/`` and register them as a model version.

    Re-triggering a finished run registers nothing new: the version registered for the
    same weights (content hash) is returned.
    """
    from flows.caching import combine, hash_tree

    weights = combine(*(f"{name}={hash_tree(path)}" for name, path in sorted(model_dirs.items())))
    record = _record(cfg)
    previous = record.get("registered")
    if previous and previous.get("weights") == weights and previous.get("run_id") == run_id:
        return {k: previous[k] for k in ("name", "version", "source")}
    from mlflow.exceptions import MlflowException

    client = _client(cfg)
    for name, path in model_dirs.items():
        client.log_artifacts(run_id, str(path), artifact_path=f"{MODEL_ARTIFACT_PATH}/{name}")
    registered = cfg.mlflow.registered_model
    try:
        client.get_registered_model(registered)
    except MlflowException:
        client.create_registered_model(registered, description="ARR-COC allocator + LoRA adapters")
    source = f"{client.get_run(run_id).info.artifact_uri}/{MODEL_ARTIFACT_PATH}"
    version = client.create_model_version(registered, source=source, run_id=run_id)
    client.set_tag(run_id, "arr_coc.registered_version", version.version)
    result = {"name": registered, "version": str(version.version), "source": source}
    record["registered"] = {**result, "weights": weights, "run_id": run_id}
    (cfg.run_dir / PARENT_FILE).write_text(json.dumps(record, indent=2))
    return result
