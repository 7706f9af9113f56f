"""A real Prefect server on 127.0.0.1, ``arr-coc serve`` serving prefect.yaml's deployments,
runs started through the API exactly as the UI starts them, and through the UI itself."""

import subprocess
import sys
import time
from pathlib import Path

import pytest
from flows_support import REPO, stop, write_tiny_config
from prefect.client.base import PrefectHttpxSyncClient

pytestmark = pytest.mark.integration
RUN_TIMEOUT = 420
SCREENSHOTS = REPO / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def served(prefect_server, tmp_path_factory):
    """``arr-coc serve`` with the tiny test config (stopping after stage 0) as default parameters."""
    root = tmp_path_factory.mktemp("served")
    config = write_tiny_config(root / "tiny-test.yaml", root / "runs")
    env = dict(prefect_server.env, PREFECT_RUNNER_POLL_FREQUENCY="2")
    log = (root / "serve.log").open("w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "arr_coc.cli",
            "serve",
            "--param",
            f"config={config}",
            "--param",
            "stop_after=stage0",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=root,
        start_new_session=True,
    )
    # Prefect's own HTTP client: it retries the 503 that a busy SQLite store answers (CI saw one
    # on create_flow_run); the tests still see every other status.
    api = PrefectHttpxSyncClient(base_url=prefect_server.api_url, timeout=30, raise_on_all_errors=False)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert proc.poll() is None, (root / "serve.log").read_text()[-2000:]
            names = {d["name"] for d in api.post("/deployments/filter", json={}).json()}
            if {"curriculum", "curriculum-nightly", "stage"} <= names:
                break
            time.sleep(1)
        else:
            raise TimeoutError("deployments were not served: " + (root / "serve.log").read_text()[-2000:])
        yield api, root
    finally:
        stop(proc)
        log.close()
        api.close()


def deployment(api, flow_name, name):
    reply = api.get(f"/deployments/name/{flow_name}/{name}")
    reply.raise_for_status()
    return reply.json()


def wait_for_run(api, flow_run_id, timeout=RUN_TIMEOUT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = api.get(f"/flow_runs/{flow_run_id}").json()
        if run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return run
        time.sleep(2)
    raise TimeoutError(f"flow run {flow_run_id} still {run['state']['type']}")


def _ui_created_run(api, deployment_id: str, run_name: str, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = api.post(
            "/flow_runs/filter", json={"flow_runs": {"deployment_id": {"any_": [deployment_id]}}}
        ).json()
        for run in runs:
            if run["parameters"].get("run_name") == run_name:
                return run["id"]
        time.sleep(1)
    raise AssertionError(f"no flow run with run_name={run_name!r} was created from the UI")


def run_logs(api, flow_run_id) -> str:
    """Every log line of the run, in order (the API pages at 200)."""
    lines: list[str] = []
    while True:
        page = api.post(
            "/logs/filter",
            json={"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "sort": "TIMESTAMP_ASC",
                  "limit": 200, "offset": len(lines)},
        ).json()
        lines += [entry["message"] for entry in page]
        if len(page) < 200:
            return "\n".join(lines)


def test_deployments_carry_schema_schedule_and_concurrency(served):
    api, _ = served
    manual = deployment(api, "curriculum", "curriculum")
    schema = manual["parameter_openapi_schema"]["properties"]
    assert set(schema) == {"config", "start_at", "stop_after", "run_name", "overrides", "stage_retries"}
    assert manual["enforce_parameter_schema"] is True
    assert manual["schedules"] == []
    nightly = deployment(api, "curriculum", "curriculum-nightly")
    (schedule,) = nightly["schedules"]
    assert schedule["schedule"]["cron"] == "0 1 * * *"
    assert schedule["schedule"]["timezone"] == "Europe/Berlin"
    assert nightly["parameters"]["run_name"] == "nightly-{date}"
    assert nightly["parameters"]["config"].endswith("tiny-test.yaml")  # --param applies to all
    assert nightly["global_concurrency_limit"]["limit"] == 1  # `concurrency_limit` is deprecated (always None)
    assert nightly["concurrency_options"]["collision_strategy"] == "CANCEL_NEW"
    single = deployment(api, "stage", "stage")
    assert "name" in single["parameter_openapi_schema"]["required"]


def test_run_created_through_the_api_like_the_ui(served):
    api, root = served
    manual = deployment(api, "curriculum", "curriculum")
    body = {
        "state": {"type": "SCHEDULED", "message": "Run from the Prefect UI"},
        "parameters": {"run_name": "api-run"},
    }
    reply = api.post(f"/deployments/{manual['id']}/create_flow_run", json=body)
    assert reply.status_code == 201, reply.text
    run = wait_for_run(api, reply.json()["id"])
    assert run["state"]["type"] == "COMPLETED", run_logs(api, run["id"])[-3000:]
    assert run["parameters"]["stop_after"] == "stage0"
    assert (root / "runs" / "api-run" / "stage0" / "artifact" / "metrics.json").is_file()
    # Logs reach the server in batches, possibly after the run's final state: wait a little.
    deadline = time.monotonic() + 30
    while "stage0: ran" not in (logs := run_logs(api, run["id"])) and time.monotonic() < deadline:
        time.sleep(1)
    assert "stage0: ran" in logs


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium missing (make browser)")
def test_ui_custom_run_with_a_changed_parameter(served, prefect_server):
    from playwright.sync_api import sync_playwright

    api, root = served
    manual = deployment(api, "curriculum", "curriculum")
    SCREENSHOTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(60_000)
        page.goto(f"{prefect_server.url}/deployments")
        page.get_by_role("link", name="curriculum", exact=True).first.click()
        page.wait_for_url(f"**/deployments/deployment/{manual['id']}**")
        page.get_by_role("button", name="Run", exact=True).first.click()
        page.screenshot(path=str(SCREENSHOTS / "prefect-ui-run-menu.png"), full_page=True)
        page.get_by_text("Custom run").click()
        page.wait_for_url("**/run**")
        # Optional parameters start as None: switch run_name (the third str|None toggle) to str.
        page.get_by_role("button", name="str", exact=True).nth(2).click()
        block = page.locator(".schema-form-property-any-of-input", has_text="run_name (Optional)")
        field = block.locator("textarea").first
        field.fill("ui-run")
        page.screenshot(path=str(SCREENSHOTS / "prefect-ui-custom-run.png"), full_page=True)
        page.get_by_role("button", name="Submit").click()
        # The UI returns to the deployment page and shows the new run there; find it by API.
        flow_run_id = _ui_created_run(api, manual["id"], "ui-run")
        run = wait_for_run(api, flow_run_id)
        page.reload()
        page.get_by_text("Completed").first.wait_for()
        page.screenshot(path=str(SCREENSHOTS / "prefect-ui-run-completed.png"), full_page=True)
        browser.close()
    assert run["state"]["type"] == "COMPLETED", run_logs(api, flow_run_id)[-3000:]
    assert run["parameters"]["run_name"] == "ui-run"
    assert (root / "runs" / "ui-run" / "stage0" / "artifact" / "metrics.json").is_file()
