"""The curriculum's MLflow parent run: store warm-up overlapping the Prefect start, one experiment."""

from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient

from arr_coc.config import RunConfig
from flows.tracking import PARENT_FILE, start_parent_run, warm_store
from stages.tracking import tracking_uri


def _cfg(tmp_path, **mlflow) -> RunConfig:
    return RunConfig.model_validate({"run": {"root": str(tmp_path), "name": "t"}, "mlflow": mlflow})


def test_warmed_store_holds_one_experiment_and_the_parent_run(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = _cfg(tmp_path)
    warm_store(cfg)
    warm_store(cfg)  # a second call while the first runs starts nothing new
    run_id = start_parent_run(cfg)
    client = MlflowClient(tracking_uri=tracking_uri(cfg))
    experiments = [e for e in client.search_experiments() if e.name == cfg.mlflow.experiment]
    assert len(experiments) == 1
    assert experiments[0].artifact_location == (cfg.run_dir / "mlartifacts").resolve().as_uri()
    assert client.get_run(run_id).info.experiment_id == experiments[0].experiment_id
    assert json.loads((cfg.run_dir / PARENT_FILE).read_text())["mlflow_run_id"] == run_id
    # Re-opening the run directory (a re-triggered curriculum) continues the same parent run.
    warm_store(cfg)
    assert start_parent_run(cfg) == run_id


def test_a_failed_warm_up_is_reported_by_the_parent_run_start(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    cfg = _cfg(tmp_path, tracking_uri=f"sqlite:///{blocker}/mlflow.db")
    warm_store(cfg)  # fails in its thread, silently
    with pytest.raises(Exception, match="not-a-dir|unable to open|directory"):
        start_parent_run(cfg)
