"""The tiny curriculum end to end through ``arr-coc curriculum`` (embedded Prefect server,
local MLflow sqlite store), re-triggered, and resumed after an injected stage failure."""

import json
import subprocess
import sys

import pytest
from flows_support import quiet_env

pytestmark = pytest.mark.integration
STAGES = ["stage0", "stage1", "stage2", "mine", "stage3"]


def curriculum(config, home, *extra, env_extra=None, timeout=600):
    env = quiet_env(home)
    env.update(env_extra or {})
    command = [sys.executable, "-m", "arr_coc.cli", "curriculum", "--config", str(config), *extra]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def launched(output: str) -> list[str]:
    """Stages whose job was started, from the streamed ``launch:`` log lines."""
    return [s for s in STAGES if f"Task run '{s}' - launch:" in output]


def statuses(run_dir) -> dict[str, str]:
    rows = json.loads((run_dir / "report" / "summary.json").read_text())["stages"]
    return {row["stage"]: row["status"] for row in rows}


def test_tiny_curriculum_end_to_end_and_retrigger(tiny_config, tmp_path):
    from mlflow.tracking import MlflowClient

    home = tmp_path / "prefect"
    first = curriculum(tiny_config, home)
    output = first.stdout + first.stderr
    assert first.returncode == 0, output[-3000:]
    assert launched(output) == STAGES
    assert "| stage " in first.stdout and "| IoU " in first.stdout
    assert "mlflow ui --backend-store-uri sqlite:///" in first.stdout
    run_dir = tiny_config.parent / "runs" / "tiny-test"
    assert statuses(run_dir) == {"shard": "ready", **{s: "ran" for s in STAGES}}

    record = json.loads((run_dir / "curriculum_run.json").read_text())
    client = MlflowClient(tracking_uri=record["tracking_uri"])
    parent = client.get_run(record["mlflow_run_id"])
    assert parent.info.status == "FINISHED"
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    by_stage = {run.data.tags["arr_coc.stage"]: run for run in children}
    assert sorted(by_stage) == sorted(STAGES) and len(children) == len(STAGES)
    for name, run in by_stage.items():
        assert run.info.status == "FINISHED", name
        assert run.data.metrics, name
        assert [a.path for a in client.list_artifacts(run.info.run_id)], name
    assert "eval/iou" in by_stage["stage1"].data.metrics
    assert "stage1/iou" in parent.data.metrics and "stage3/steps" in parent.data.metrics
    assert "report" in [a.path for a in client.list_artifacts(parent.info.run_id)]
    versions = client.search_model_versions("name = 'arr-coc-allocator'")
    assert len(versions) == 1 and versions[0].run_id == parent.info.run_id
    model_files = [a.path for a in client.list_artifacts(parent.info.run_id, "model/final")]
    assert "model/final/allocator.safetensors" in model_files and "model/final/adapter" in model_files

    second = curriculum(tiny_config, home)
    output = second.stdout + second.stderr
    assert second.returncode == 0, output[-3000:]
    assert launched(output) == []
    for name in STAGES:
        assert f"{name}: cached" in output
    assert statuses(run_dir) == {"shard": "ready", **{s: "cached" for s in STAGES}}
    assert len(client.search_model_versions("name = 'arr-coc-allocator'")) == 1


def test_failed_stage_resumes_and_earlier_stages_are_skipped(tiny_config, tmp_path):
    home = tmp_path / "prefect"
    common = ["--stop-after", "stage1", "--retries", "0", "--set", "stages.stage1.max_steps=3"]
    failed = curriculum(tiny_config, home, *common, env_extra={"ARR_COC_FAIL_AT": "stage1:step2"})
    output = failed.stdout + failed.stderr
    assert failed.returncode == 1, output[-3000:]
    errors = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "injected fault at stage1:step2" in errors[0]
    assert launched(output) == ["stage0", "stage1"]
    checkpoints = tiny_config.parent / "runs" / "tiny-test" / "stage1" / "checkpoints"
    assert (checkpoints / "step-2").is_dir()

    resumed = curriculum(tiny_config, home, *common)
    output = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, output[-3000:]
    assert launched(output) == ["stage1"]
    assert "stage0: cached" in output
    assert "resumed from" in output and "(step 2)" in output
