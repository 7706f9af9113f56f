import logging
import sys

import pytest

from flows.jobs import StageJobError, error_line, run_job, run_stage_job


class ListHandler(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture
def logger():
    log = logging.getLogger("test-jobs")
    log.setLevel(logging.INFO)
    handler = ListHandler()
    log.addHandler(handler)
    yield log, handler
    log.removeHandler(handler)


def test_run_job_streams_every_line_in_order(logger):
    log, handler = logger
    code = "import sys\nfor i in range(3): print(f'step {i}')\nprint('warn', file=sys.stderr)"
    result = run_job([sys.executable, "-c", code], log)
    assert result.returncode == 0
    assert handler.lines[0].startswith("launch: ")
    assert handler.lines[1:] == ["step 0", "step 1", "step 2", "warn"]
    assert result.tail[-1] == "warn"


def test_run_job_passes_env(logger):
    log, handler = logger
    run_job([sys.executable, "-c", "import os; print(os.environ['ARR_X'])"], log, env={"ARR_X": "parent-123"})
    assert handler.lines[-1] == "parent-123"


@pytest.mark.parametrize(
    "code, returncode, transient, exit_code",
    [
        ("print('error: cfg.yaml: stages.stage1.lr: unknown key'); raise SystemExit(2)", 2, False, 2),
        ("print('boom'); raise SystemExit(1)", 1, True, 1),
        ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", -9, True, 1),
    ],
)
def test_run_stage_job_classifies_failures(logger, code, returncode, transient, exit_code):
    log, _ = logger
    with pytest.raises(StageJobError) as info:
        run_stage_job("stage1", [sys.executable, "-c", code], log)
    err = info.value
    assert err.returncode == returncode
    assert err.transient is transient
    assert err.exit_code == exit_code
    assert "stage stage1 failed" in str(err)


def test_error_line_prefers_the_error_prefix():
    assert error_line(["step 1", "error: data.images: bad", "cleanup"]) == "data.images: bad"
    assert error_line(["step 1", "Traceback", "RuntimeError: x", ""]) == "RuntimeError: x"
    assert error_line([]) == "no output"
