"""MLflow tracking of stage runs: URI rule, params and metrics, resume continues, crash is FAILED."""

from __future__ import annotations

import pytest

from arr_coc.config import load_config
from stages import tracking
from stages.tracking import StageTracker, flatten, tracking_uri


def _cfg(tmp_path, *sets):
    return load_config(None, [f"run.root={tmp_path}", "run.name=t", *sets])


def test_tracking_uri_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(_cfg(tmp_path)) == f"sqlite:///{(tmp_path / 't' / 'mlflow.db').resolve()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking_uri(_cfg(tmp_path)) == "http://127.0.0.1:5000"
    assert tracking_uri(_cfg(tmp_path, "mlflow.tracking_uri=file:///x")) == "file:///x"


def test_flatten_config():
    flat = flatten(load_config(None, []).to_dict())
    assert flat["stages.stage1.lr"] == "0.003"
    assert flat["stages.stage2.lora.target_modules"].startswith('["q_proj"')


def test_other_ranks_do_not_touch_mlflow(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracker = StageTracker(_cfg(tmp_path), "stage1", rank=1)
    assert tracker.start() is None
    tracker.log_metrics({"loss": 1.0}, 1)
    tracker.end("FAILED")
    assert not (tmp_path / "t").exists()


def test_run_lifecycle_nested_resumed_and_failed(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = _cfg(tmp_path)
    parent = StageTracker(cfg, "curriculum")
    parent_id = parent.start()
    monkeypatch.setenv(tracking.PARENT_ENV, parent_id)
    tracker = StageTracker(cfg, "stage1")
    run_id = tracker.start()
    tracker.log_metrics({"loss": 2.0, "grad_norm/allocator": 0.5}, 1)
    tracker.end("FAILED")
    run = tracker.client.get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["mlflow.parentRunId"] == parent_id
    assert run.data.params["stages.stage1.lr"] == "0.003" and run.data.params["seed"] == "0"

    resumed = StageTracker(cfg, "stage1")
    assert resumed.start(run_id) == run_id
    assert resumed.client.get_run(run_id).info.status == "RUNNING"
    resumed.log_metrics({"loss": 1.0}, 2)
    resumed.end("FINISHED")
    history = resumed.client.get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 2.0), (2, 1.0)]
    assert resumed.client.get_run(run_id).info.status == "FINISHED"


@pytest.mark.integration
def test_crashed_stage_is_failed_and_resume_continues_its_run(toy, helpers):
    from mlflow.tracking import MlflowClient

    sets = ["stages.stage1.max_steps=4", "stages.stage1.checkpoint_every=2"]
    crashed = helpers.check(toy.run("crash", sets, env={"ARR_COC_FAIL_AT": "stage1:step3"}), code=1)
    assert crashed.stderr.strip().splitlines()[-1] == "error: RuntimeError: injected fault at stage1:step3"
    client = MlflowClient(tracking_uri=f"sqlite:///{toy.root / 'crash' / 'mlflow.db'}")
    (run,) = client.search_runs(client.get_experiment_by_name("arr-coc").experiment_id)
    assert run.info.status == "FAILED"
    assert run.data.params["stages.stage1.max_steps"] == "4"

    resumed = helpers.check(toy.run("crash", sets))
    assert "(step 2)" in resumed.stdout
    runs = client.search_runs(client.get_experiment_by_name("arr-coc").experiment_id)
    assert [r.info.run_id for r in runs] == [run.info.run_id]
    assert runs[0].info.status == "FINISHED"
    steps = sorted({m.step for m in client.get_metric_history(run.info.run_id, "loss")})
    assert steps == [1, 2, 3, 4]
    metrics = runs[0].data.metrics
    for key in (
        "lr",
        "grad_norm",
        "grad_norm/allocator",
        "grad_norm/head",
        "tokens_kept",
        "samples_per_s",
        "eval/mse",
    ):
        assert key in metrics, key
    assert "grad_norm/backbone" not in metrics  # frozen
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "artifact")}
    assert "artifact/toy.safetensors" in artifacts and "artifact/metrics.json" in artifacts
