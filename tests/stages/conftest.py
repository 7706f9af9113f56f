"""Fixtures for the runner tests: run the toy stage task in fresh processes.

Each run is a real process (``tests/stages/toy_task.py`` → ``stages.launch.main``) so a
test can SIGKILL it and resume in another process, as a crashed job would be.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

TOY_SCRIPT = Path(__file__).with_name("toy_task.py")
REPO = Path(__file__).resolve().parents[2]


class Toy:
    """Runs the toy task as ``stage1`` (or another name) in a run directory under ``root``."""

    def __init__(self, root: Path):
        self.root = root

    def env(self, **extra: str) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("ARR_COC_", "MLFLOW_", "TOY_"))
            and k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")
        }
        env.update({"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
        env.update(extra)
        return env

    def args(self, run: str, sets: list[str], name: str = "stage1") -> list[str]:
        base = [f"run.root={self.root}", f"run.name={run}"]
        out = [name, "--config", str(REPO / "configs" / "tiny.yaml")]
        for assignment in base + sets:
            out += ["--set", assignment]
        return out

    def command(self, real: bool) -> list[str]:
        """The toy task, or (``real``) the project's own stage tasks through ``stages.launch``."""
        return [sys.executable, "-m", "stages.launch"] if real else [sys.executable, str(TOY_SCRIPT)]

    def run(
        self,
        run: str,
        sets: list[str],
        *extra: str,
        name: str = "stage1",
        env=None,
        timeout: int = 300,
        real=False,
    ):
        cmd = [*self.command(real), *self.args(run, sets, name), *extra]
        return subprocess.run(
            cmd, cwd=REPO, env=self.env(**(env or {})), capture_output=True, text=True, timeout=timeout
        )

    def start(
        self, run: str, sets: list[str], name: str = "stage1", env=None, real=False
    ) -> subprocess.Popen:
        cmd = [*self.command(real), *self.args(run, sets, name)]
        return subprocess.Popen(
            cmd, cwd=REPO, env=self.env(**(env or {})), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    def stage_dir(self, run: str, name: str = "stage1") -> Path:
        return self.root / run / name

    def losses(self, run: str, name: str = "stage1") -> dict[int, float]:
        """Logged loss per step; for a step logged twice (killed, then resumed) the last entry."""
        out: dict[int, float] = {}
        for line in (self.stage_dir(run, name) / "train_log.jsonl").read_text().splitlines():
            entry = json.loads(line)
            out[entry["step"]] = entry["loss"]
        return out

    def weights(self, run: str, name: str = "stage1"):
        from safetensors.torch import load_file

        return load_file(str(self.stage_dir(run, name) / "artifact" / "toy.safetensors"))

    def all_weights(self, run: str, name: str) -> dict[str, object]:
        """Every tensor of every ``*.safetensors`` in the artifact (allocator, adapters)."""
        from safetensors.torch import load_file

        artifact = self.stage_dir(run, name) / "artifact"
        out = {}
        for path in sorted(artifact.rglob("*.safetensors")):
            for key, tensor in load_file(str(path)).items():
                out[f"{path.relative_to(artifact)}:{key}"] = tensor
        return out


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) before {path} appeared")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{path} did not appear within {timeout}s")
        time.sleep(0.02)


# Real stages on the tiny model: few images, tiny batches, few steps.
TINY_DATA = ["data.images=24"]


def real_stage_settings(name: str, steps: int, zero: int, checkpoint_every: int = 2) -> list[str]:
    return [
        *TINY_DATA,
        f"stages.{name}.max_steps={steps}",
        f"stages.{name}.checkpoint_every={checkpoint_every}",
        f"stages.{name}.eval_samples=4",
        f"stages.{name}.batch_size=2",
        f"stages.{name}.zero_stage={zero}",
        f"stages.{name}.lr=0.003",
        f"stages.{name}.budget=16",
    ]


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """A stage-0 artifact (the tiny VLM after one warm-up step) for real stage 1/2 runs."""
    toy = Toy(tmp_path_factory.mktemp("tiny-base"))
    sets = [
        *TINY_DATA,
        "stages.stage0.max_steps=1",
        "stages.stage0.eval_samples=2",
        "stages.stage0.batch_size=2",
    ]
    check(toy.run("base", sets, name="stage0", real=True))
    return toy.stage_dir("base", "stage0") / "artifact"


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Toy:
    return Toy(tmp_path_factory.mktemp("runs"))


def check(result: subprocess.CompletedProcess, code: int = 0) -> subprocess.CompletedProcess:
    assert result.returncode == code, (
        f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result


@pytest.fixture
def helpers():
    """``check`` and ``wait_for`` for test modules (they cannot import conftest)."""
    return type(
        "Helpers",
        (),
        {
            "check": staticmethod(check),
            "wait_for": staticmethod(wait_for),
            "settings": staticmethod(real_stage_settings),
        },
    )
