"""Run one stage job as a subprocess and stream its output into the Prefect logs.

Flows never import the training code: a stage is a command line (``arr-coc stage``,
``deepspeed ... stages.launch`` or a hostfile launch) so a crash, an OOM kill or a
NCCL hang takes down the job, not the orchestrator. The exit code says what kind of
failure it was (DESIGN's CLI contract): 2 is a config or usage error, which no retry
can fix; anything else (1, or killed by a signal) may be transient and is retried.
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from arr_coc.errors import ArrCocError

CONFIG_ERROR_EXIT = 2
# Lines of the job's output kept to explain a failure.
TAIL_LINES = 20


class StageJobError(ArrCocError):
    """A stage subprocess exited non-zero; ``returncode`` says whether a retry can help."""

    def __init__(self, stage: str, returncode: int, error_line: str):
        self.stage = stage
        self.returncode = returncode
        self.error_line = error_line
        how = f"killed by signal {-returncode}" if returncode < 0 else f"exit {returncode}"
        super().__init__(f"stage {stage} failed ({how}): {error_line}")
        # Exit 2 means the job rejected its config: report it like any config error.
        self.exit_code = CONFIG_ERROR_EXIT if returncode == CONFIG_ERROR_EXIT else 1

    @property
    def transient(self) -> bool:
        return self.returncode != CONFIG_ERROR_EXIT


@dataclass
class JobResult:
    returncode: int
    wall_s: float
    tail: list[str]


def run_job(
    command: Sequence[str],
    logger: logging.Logger | logging.LoggerAdapter,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
) -> JobResult:
    """Run ``command``, forwarding each output line to ``logger`` as it arrives."""
    logger.info("launch: %s", shlex.join(command))
    full_env = dict(os.environ)
    full_env.update(env or {})
    # Line-buffered child output so progress shows up live, not at exit.
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    start = time.perf_counter()
    with subprocess.Popen(
        list(command),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        bufsize=1,
        env=full_env,
        cwd=cwd,
    ) as proc:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.rstrip("\n")
            tail.append(line)
            logger.info("%s", line)
        returncode = proc.wait()
    return JobResult(returncode=returncode, wall_s=time.perf_counter() - start, tail=list(tail))


def error_line(tail: Sequence[str]) -> str:
    """The job's ``error:`` line if it printed one, else its last non-empty line."""
    for line in reversed(tail):
        if line.startswith("error:"):
            return line[len("error:") :].strip()
    for line in reversed(tail):
        if line.strip():
            return line.strip()
    return "no output"


def run_stage_job(
    stage: str,
    command: Sequence[str],
    logger: logging.Logger | logging.LoggerAdapter,
    env: Mapping[str, str] | None = None,
) -> JobResult:
    """``run_job`` that raises ``StageJobError`` on a non-zero exit."""
    result = run_job(command, logger, env=env)
    if result.returncode != 0:
        raise StageJobError(stage, result.returncode, error_line(result.tail))
    return result
