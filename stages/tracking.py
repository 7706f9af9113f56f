"""MLflow tracking of one stage job.

* Tracking URI: ``cfg.mlflow.tracking_uri``, else ``MLFLOW_TRACKING_URI``, else a sqlite
  store at ``<run_dir>/mlflow.db`` (artifacts then go to ``<run_dir>/mlartifacts``).
* The stage run is nested under the curriculum's parent run when
  ``ARR_COC_MLFLOW_PARENT_RUN_ID`` is set (the ``mlflow.parentRunId`` tag).
* A resumed stage continues its own run: the runner stores the run id in every
  checkpoint and passes it back here.
* Only rank 0 talks to MLflow; on other ranks the tracker does nothing.

Everything goes through ``MlflowClient`` (no fluent active-run state), so several
stages or a flow in the same process cannot mix up runs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from arr_coc.config import RunConfig

PARENT_ENV = "ARR_COC_MLFLOW_PARENT_RUN_ID"
# MlflowClient.log_batch accepts at most 1000 metrics / 100 params per call.
PARAM_BATCH = 100
METRIC_BATCH = 1000


def tracking_uri(cfg: RunConfig) -> str:
    if cfg.mlflow.tracking_uri:
        return cfg.mlflow.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{(cfg.run_dir / 'mlflow.db').resolve()}"


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config → ``{"stages.stage1.lr": "0.003", ...}`` (lists as JSON)."""
    flat: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, list) else str(value)
    return flat


class StageTracker:
    """The MLflow run of one stage job (a no-op on ranks other than 0)."""

    def __init__(self, cfg: RunConfig, name: str, rank: int = 0):
        self.cfg = cfg
        self.name = name
        self.active = rank == 0
        self.run_id: str | None = None
        self._client = None

    @property
    def client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self.cfg.run_dir.mkdir(parents=True, exist_ok=True)
            self._client = MlflowClient(tracking_uri=tracking_uri(self.cfg))
        return self._client

    def _experiment_id(self) -> str:
        name = self.cfg.mlflow.experiment
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        location = None
        if tracking_uri(self.cfg).startswith("sqlite:"):
            location = (self.cfg.run_dir / "mlartifacts").resolve().as_uri()
        try:
            return self.client.create_experiment(name, artifact_location=location)
        except Exception:  # created concurrently by the flow or another stage
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def start(self, run_id: str | None = None) -> str | None:
        """Continue ``run_id`` (a resumed stage) or create a new run with the resolved config as params."""
        if not self.active:
            return None
        if run_id is not None:
            self.client.update_run(run_id, status="RUNNING")
            self.run_id = run_id
            return run_id
        tags = {"mlflow.runName": self.name, "arr_coc.stage": self.name, "arr_coc.run": self.cfg.run.name}
        parent = os.environ.get(PARENT_ENV)
        if parent:
            tags["mlflow.parentRunId"] = parent
        run = self.client.create_run(self._experiment_id(), tags=tags, run_name=self.name)
        self.run_id = run.info.run_id
        self.log_params(flatten(self.cfg.to_dict()))
        return self.run_id

    def log_params(self, params: dict[str, str]) -> None:
        if not self.active or self.run_id is None:
            return
        from mlflow.entities import Param

        items = [Param(k, v[:6000]) for k, v in params.items()]
        for start in range(0, len(items), PARAM_BATCH):
            self.client.log_batch(self.run_id, params=items[start : start + PARAM_BATCH])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.active or self.run_id is None or not metrics:
            return
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        for start in range(0, len(items), METRIC_BATCH):
            self.client.log_batch(self.run_id, metrics=items[start : start + METRIC_BATCH])

    def set_tag(self, key: str, value: str) -> None:
        if self.active and self.run_id is not None:
            self.client.set_tag(self.run_id, key, value)

    def log_artifacts(self, local_dir: Path, artifact_path: str) -> None:
        if self.active and self.run_id is not None:
            self.client.log_artifacts(self.run_id, str(local_dir), artifact_path)

    def end(self, status: str) -> None:
        """``FINISHED``, ``FAILED`` or ``KILLED``."""
        if self.active and self.run_id is not None:
            self.client.set_terminated(self.run_id, status=status)
