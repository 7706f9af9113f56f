"""The stage task's cache, refresh and retry behaviour, with real subprocess jobs and a real server."""

import sys
import textwrap

import pytest
from prefect import flow

from flows.curriculum import run_cached_stage
from flows.jobs import StageJobError
from flows.plan import StagePlan
from flows.tasks import result_storage, retry_transient

pytestmark = pytest.mark.integration

# A stand-in stage job: counts its launches, fails as told, then writes a complete artifact.
JOB = textwrap.dedent(
    """
    import json, pathlib, sys
    artifact, counter, fail_codes = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3]
    attempt = len(counter.read_text().splitlines()) if counter.exists() else 0
    with counter.open("a") as f:
        f.write("launch\\n")
    print(f"job attempt {attempt}", flush=True)
    codes = [int(c) for c in fail_codes.split(",") if c]
    if attempt < len(codes):
        print(f"error: injected exit {codes[attempt]}", flush=True)
        raise SystemExit(codes[attempt])
    artifact.mkdir(parents=True, exist_ok=True)
    (artifact / "metrics.json").write_text(json.dumps({"val/iou": 0.5}))
    """
)


def make_stage(tmp_path, upstream, fail_codes=""):
    script = tmp_path / "job.py"
    script.write_text(JOB)
    stage_dir = tmp_path / "run" / "stage2"
    counter = tmp_path / "launches.txt"
    command = [sys.executable, str(script), str(stage_dir / "artifact"), str(counter), fail_codes]
    stage = StagePlan("stage2", stage_dir, upstream, [upstream], "fp-1", command)
    return stage, counter


@flow
def one_stage(stage: StagePlan, storage: str, retries: int = 0):
    from pathlib import Path

    return run_cached_stage(stage, Path(storage), None, retries)


def launches(counter):
    return len(counter.read_text().splitlines()) if counter.exists() else 0


def test_finished_stage_is_cached_until_upstream_or_artifact_changes(prefect_api, tmp_path):
    upstream = tmp_path / "run" / "stage1" / "artifact"
    upstream.mkdir(parents=True)
    (upstream / "allocator.safetensors").write_bytes(b"v1")
    stage, counter = make_stage(tmp_path, upstream)
    storage = str(result_storage(tmp_path / "run"))

    record, status = one_stage(stage, storage)
    assert (status, launches(counter)) == ("ran", 1)
    assert record["artifact"] == str(stage.artifact)

    record, status = one_stage(stage, storage)
    assert (status, launches(counter)) == ("cached", 1)

    (upstream / "allocator.safetensors").write_bytes(b"v2")  # new upstream weights: run again
    _, status = one_stage(stage, storage)
    assert (status, launches(counter)) == ("ran", 2)

    (stage.artifact / "metrics.json").unlink()  # own artifact gone: the cached path is stale
    _, status = one_stage(stage, storage)
    assert (status, launches(counter)) == ("ran", 3)
    assert (stage.artifact / "metrics.json").is_file()


def test_transient_failure_is_retried(prefect_api, tmp_path):
    upstream = tmp_path / "up"
    upstream.mkdir()
    stage, counter = make_stage(tmp_path, upstream, fail_codes="1")
    _, status = one_stage(stage, str(result_storage(tmp_path / "run")), retries=1)
    assert (status, launches(counter)) == ("ran", 2)


def test_config_error_is_not_retried(prefect_api, tmp_path):
    upstream = tmp_path / "up"
    upstream.mkdir()
    stage, counter = make_stage(tmp_path, upstream, fail_codes="2,2")
    with pytest.raises(StageJobError) as info:
        one_stage(stage, str(result_storage(tmp_path / "run")), retries=3)
    assert info.value.exit_code == 2
    assert "injected exit 2" in str(info.value)
    assert launches(counter) == 1


def test_retry_condition_rejects_errors_raised_before_the_job():
    class State:
        def __init__(self, err):
            self.err = err

        def result(self):
            raise self.err

    assert retry_transient(None, None, State(StageJobError("stage1", 1, "x"))) is True
    assert retry_transient(None, None, State(StageJobError("stage1", 2, "x"))) is False
    assert retry_transient(None, None, State(FileNotFoundError("x"))) is False
