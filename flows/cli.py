"""``arr-coc curriculum`` (run, slice or dry-run the curriculum) and ``arr-coc serve``."""

from __future__ import annotations

import argparse
import os
import shlex

import yaml

from arr_coc.cli import add_config_arguments
from arr_coc.config import STAGE_NAMES
from arr_coc.errors import ConfigError


def register(subparsers: argparse._SubParsersAction) -> None:
    run = subparsers.add_parser(
        "curriculum",
        help="run the whole curriculum as a Prefect flow (embedded server, local MLflow store)",
        description="Run shard -> stage0 -> stage1 -> stage2 -> mine -> stage3 -> evaluate -> report -> "
        "register. Finished stages of the same run are reused; a crashed stage resumes from its "
        "newest checkpoint.",
    )
    add_config_arguments(run)
    run.add_argument("--start-at", choices=STAGE_NAMES, help="first stage to run (earlier artifacts reused)")
    run.add_argument("--stop-after", choices=STAGE_NAMES, help="last stage to run")
    run.add_argument("--run-name", help="override run.name ({date} becomes today's UTC date)")
    run.add_argument("--retries", type=int, default=1, help="retries of a stage after a transient failure")
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="print every stage's launcher command and resolved DeepSpeed config, run nothing",
    )
    run.add_argument(
        "--skip-data-check",
        action="store_true",
        help="with --dry-run: do not require the COCO/VQAv2 paths to exist (CI without the datasets)",
    )
    run.set_defaults(handler=_curriculum)

    serve = subparsers.add_parser(
        "serve",
        help="serve the Prefect deployments of prefect.yaml from this process",
        description="Serve prefect.yaml's deployments (curriculum, curriculum-nightly, stage) against "
        "PREFECT_API_URL until interrupted; runs start from the UI, the API or the schedules.",
    )
    serve.add_argument(
        "--param",
        dest="params",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a default parameter of every deployment that has it, e.g. --param config=my.yaml",
    )
    serve.add_argument("--deployment", dest="names", action="append", help="serve only this deployment")
    serve.add_argument("--limit", type=int, default=1, help="flow runs at the same time on this machine")
    serve.set_defaults(handler=_serve)


def _curriculum(args: argparse.Namespace) -> int:
    from flows.plan import build_plan, dry_run_text

    # Check the config and every path before Prefect starts: a config error is one line, exit 2.
    plan = build_plan(
        args.config,
        args.overrides,
        args.start_at,
        args.stop_after,
        args.run_name,
        check_data_paths=not (args.dry_run and args.skip_data_check),
    )
    if args.dry_run:
        print(dry_run_text(plan))
        return 0
    if args.retries < 0:
        raise ConfigError("--retries: must be >= 0")
    # Without PREFECT_API_URL Prefect starts an embedded server; on a busy laptop or CI box
    # it needs longer than Prefect's 20 s default to come up.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    # The embedded server's telemetry heartbeat phones home: offline it fails with an ERROR
    # traceback in the run's output and contends for the fresh sqlite database. Opt in by
    # setting PREFECT_SERVER_ANALYTICS_ENABLED=true.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from flows.curriculum import curriculum
    from flows.tracking import warm_store

    warm_store(plan.cfg)  # MLflow's store migrations overlap the Prefect server's start-up

    result = curriculum(
        config=str(plan.config_path),
        start_at=args.start_at,
        stop_after=args.stop_after,
        run_name=args.run_name,
        overrides=list(args.overrides),
        stage_retries=args.retries,
    )
    print(final_summary(result))
    return 0


def final_summary(result: dict) -> str:
    lines = ["", f"curriculum finished in {result['wall_s']:.1f} s: {result['run_dir']}", "", result["table"]]
    if result["heatmaps"]:
        lines += ["", "heatmaps:"]
        lines += [f"  {name}: {path}" for name, paths in result["heatmaps"].items() for path in paths]
    lines += ["", f"report: {result['report'][0]}"]
    if result.get("registered"):
        reg = result["registered"]
        lines.append(f"registered model: {reg['name']} version {reg['version']}")
    lines.append(f"MLflow UI: mlflow ui --backend-store-uri {shlex.quote(result['tracking_uri'])}")
    return "\n".join(lines)


def _parse_params(assignments: list[str]) -> dict:
    params = {}
    for item in assignments:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--param {item!r}: expected KEY=VALUE")
        params[key] = yaml.safe_load(raw) if raw.strip() else None
    return params


def _serve(args: argparse.Namespace) -> int:
    from flows.deployments import serve

    serve(_parse_params(args.params), args.names, args.limit)
    return 0
