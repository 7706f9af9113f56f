"""Deployments from ``prefect.yaml``, served by this process (``arr-coc serve``).

``prefect.yaml`` is the one description of the deployments: ``prefect deploy --all``
registers them for a work pool (process pool on one machine, docker or kubernetes on a
cluster), and ``arr-coc serve`` reads the same file and serves them from this process,
which needs no work pool or worker (a laptop, CI, a single training box).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import yaml

from arr_coc.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent
PREFECT_YAML = REPO_ROOT / "prefect.yaml"


def load_project(path: Path = PREFECT_YAML) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: not found")
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("deployments"), list):
        raise ConfigError(f"{path}: deployments: expected a list")
    return data


def load_entrypoint(entrypoint: str):
    """``flows/curriculum.py:curriculum`` -> the flow object (imported as a module)."""
    file, _, name = entrypoint.partition(":")
    module = importlib.import_module(file.removesuffix(".py").replace("/", "."))
    try:
        return getattr(module, name)
    except AttributeError:
        raise ConfigError(f"entrypoint {entrypoint}: no flow named {name!r}") from None


def _schedules(spec: dict[str, Any]) -> list[Any]:
    from prefect.schedules import Cron, Interval

    schedules = []
    for item in spec.get("schedules") or []:
        common = {"active": item.get("active", True), "parameters": item.get("parameters") or {}}
        if "cron" in item:
            schedules.append(Cron(item["cron"], timezone=item.get("timezone"), **common))
        elif "interval" in item:
            schedules.append(Interval(item["interval"], timezone=item.get("timezone"), **common))
        else:
            raise ConfigError(f"deployment {spec['name']}: schedules: expected cron or interval")
    return schedules


def _concurrency(spec: dict[str, Any]) -> Any:
    from prefect.client.schemas.objects import ConcurrencyLimitConfig

    limit = spec.get("concurrency_limit")
    if isinstance(limit, dict):
        return ConcurrencyLimitConfig(**limit)
    return limit


def runner_deployments(
    path: Path = PREFECT_YAML, parameters: dict[str, Any] | None = None, names: list[str] | None = None
) -> list[Any]:
    """One ``RunnerDeployment`` per entry of ``prefect.yaml`` (``parameters`` override defaults)."""
    from prefect.deployments.runner import EntrypointType

    project = load_project(path)
    deployments = []
    for spec in project["deployments"]:
        if names and spec["name"] not in names:
            continue
        flow = load_entrypoint(spec["entrypoint"])
        params = dict(spec.get("parameters") or {})
        accepted = flow.parameters.properties
        params.update({k: v for k, v in (parameters or {}).items() if k in accepted})
        deployments.append(
            flow.to_deployment(
                name=spec["name"],
                description=spec.get("description"),
                tags=spec.get("tags"),
                parameters=params,
                schedules=_schedules(spec),
                concurrency_limit=_concurrency(spec),
                enforce_parameter_schema=spec.get("enforce_parameter_schema", True),
                entrypoint_type=EntrypointType.MODULE_PATH,
            )
        )
    if names and len(deployments) != len(names):
        found = {d.name for d in deployments}
        raise ConfigError(f"{path}: no deployment named {', '.join(n for n in names if n not in found)}")
    return deployments


def serve(parameters: dict[str, Any] | None = None, names: list[str] | None = None, limit: int = 1) -> None:
    """Serve the deployments until interrupted; ``limit`` caps concurrent flow runs on this machine."""
    from prefect import serve as prefect_serve

    prefect_serve(*runner_deployments(PREFECT_YAML, parameters, names), limit=limit)
