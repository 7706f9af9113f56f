"""``arr-coc stage NAME``: run one curriculum stage in this process (CPU/gloo or one GPU).

Multi-GPU and multi-node runs start the same code under the DeepSpeed launcher
(``stages.launch``); ``--dry-run`` prints that command and the resolved DeepSpeed config.
"""

from __future__ import annotations

import argparse
import json
import os

from arr_coc.config import STAGE_NAMES


def add_stage_arguments(parser: argparse.ArgumentParser) -> None:
    """The stage arguments shared by ``arr-coc stage`` and ``python -m stages.launch``."""
    from arr_coc.cli import add_config_arguments

    parser.add_argument("name", metavar="NAME", choices=STAGE_NAMES, help=f"one of {', '.join(STAGE_NAMES)}")
    add_config_arguments(parser)
    parser.add_argument("--init-from", metavar="ARTIFACT_DIR", help="upstream stage's artifact/ directory")
    parser.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="continue from the newest complete checkpoint (default); --no-resume starts over",
    )


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "stage",
        help="run one curriculum stage (DeepSpeed ZeRO, checkpoints, MLflow)",
        description=__doc__,
    )
    add_stage_arguments(parser)
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the launcher command for launcher.kind and the resolved DeepSpeed config; run nothing",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from arr_coc.config import load_config

    cfg = load_config(args.config, args.overrides)
    if getattr(args, "dry_run", False):
        from stages.engine import resolve_deepspeed_config
        from stages.launch import launcher_command

        command = launcher_command(cfg, args.name, args.config, args.overrides, args.init_from)
        if not args.resume:
            command.append("--no-resume")
        print(" ".join(command))
        print(json.dumps(resolve_deepspeed_config(cfg, args.name), indent=2))
        return 0
    from stages.runner import run_stage

    artifact = run_stage(args.name, cfg, init_from=args.init_from, resume=args.resume)
    if os.environ.get("RANK", "0") == "0":
        print(artifact)
    return 0
