"""Fixtures for the flow tests: a real Prefect server on 127.0.0.1 and tiny run configs."""

from __future__ import annotations

import subprocess

import pytest
from flows_support import (
    SERVER_START_TIMEOUT,
    VENV_BIN,
    PrefectServer,
    flush_prefect_logs,
    free_port,
    stop,
    wait_http,
    write_tiny_config,
)


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """``prefect server start`` on a free 127.0.0.1 port with its own PREFECT_HOME (sqlite)."""
    home = tmp_path_factory.mktemp("prefect-home")
    server = PrefectServer(home, free_port())
    log = (home / "server.log").open("w")
    proc = subprocess.Popen(
        [str(VENV_BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(server.port)],
        env=server.env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=home,
        start_new_session=True,
    )
    try:
        wait_http(f"{server.api_url}/health", proc, SERVER_START_TIMEOUT)
        yield server
    finally:
        flush_prefect_logs()
        stop(proc)
        log.close()


@pytest.fixture
def prefect_api(prefect_server, monkeypatch):
    """Point this test process's Prefect client at the session server."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: prefect_server.api_url}):
        yield prefect_server


@pytest.fixture
def tiny_config(tmp_path):
    return write_tiny_config(tmp_path / "tiny-test.yaml", tmp_path / "runs")
