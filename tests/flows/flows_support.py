"""Helpers of the flow tests: Prefect processes on 127.0.0.1, isolated environments, tiny configs."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
SERVER_START_TIMEOUT = 120

# Small enough that a whole curriculum is a minute or two on two shared cores.
TINY_OVERRIDES = {
    "data": {"images": 24, "shard_size": 16},
    "stages": {
        name: {"max_steps": 2, "checkpoint_every": 1, "batch_size": 2, "eval_samples": 4}
        for name in ("stage0", "stage1", "stage2", "mine", "stage3")
    },
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def quiet_env(prefect_home: Path, api_url: str | None = None) -> dict[str, str]:
    """Environment for a Prefect process isolated in ``prefect_home`` (one thread per process)."""
    env = dict(os.environ)
    env.update(
        PREFECT_HOME=str(prefect_home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT="false",
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
    )
    env.pop("MLFLOW_TRACKING_URI", None)
    if api_url:
        env["PREFECT_API_URL"] = api_url
    else:
        env.pop("PREFECT_API_URL", None)
    return env


def wait_http(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


def stop(proc: subprocess.Popen) -> None:
    """Stop a process started with ``start_new_session=True`` and everything it spawned."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def flush_prefect_logs() -> None:
    """Send this process's buffered logs and events while the server is still up (else exit waits on retries)."""
    from prefect._internal.concurrency.services import QueueService

    QueueService.drain_all(timeout=30)


class PrefectServer:
    def __init__(self, home: Path, port: int):
        self.home = home
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.api_url = f"{self.url}/api"
        self.env = quiet_env(home, self.api_url)
        # The UI asks this URL for the API (default :4200): point it at this server's port.
        self.env["PREFECT_UI_API_URL"] = self.api_url


def write_tiny_config(path: Path, root: Path, name: str = "tiny-test") -> Path:
    """configs/tiny.yaml with the test-size overrides and its run root under ``root``."""
    data = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    data["run"] = {"name": name, "root": str(root)}
    for section, values in TINY_OVERRIDES.items():
        node = data.setdefault(section, {})
        for key, value in values.items():
            if isinstance(value, dict):
                node.setdefault(key, {}).update(value)
            else:
                node[key] = value
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path
