"""Multi-process entry point of a stage and the command lines that start it.

``python -m stages.launch NAME --config F [--set ...] [--init-from DIR] [--no-resume]``
is what every rank runs: ``deepspeed --num_gpus N --module stages.launch ...`` on one
node, ``deepspeed --hostfile H --module stages.launch ...`` across nodes. The launcher
sets ``RANK`` / ``LOCAL_RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR`` / ``MASTER_PORT`` (and
passes ``--local_rank``); the runner joins the process group with NCCL on GPUs and
gloo on CPU. Arguments, exit codes and error lines are those of ``arr-coc stage``.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from arr_coc.config import RunConfig


def _deepspeed_executable() -> str:
    """The ``deepspeed`` launcher of this interpreter's environment, else the one on PATH."""
    beside = Path(sys.executable).parent / "deepspeed"
    if beside.exists():
        return str(beside)
    return shutil.which("deepspeed") or "deepspeed"


def stage_arguments(
    name: str, config_path: str, overrides: list[str] | None, init_from: str | Path | None
) -> list[str]:
    args = [name, "--config", str(config_path)]
    for assignment in overrides or []:
        args += ["--set", assignment]
    if init_from is not None:
        args += ["--init-from", str(init_from)]
    return args


def launcher_command(
    cfg: RunConfig,
    name: str,
    config_path: str,
    overrides: list[str] | None,
    init_from: str | Path | None,
) -> list[str]:
    """The command line that runs stage ``name`` as ``cfg.launcher`` says.

    * ``inprocess``: ``python -m arr_coc.cli stage ...`` (one process; CPU/gloo or one GPU);
    * ``deepspeed``: ``deepspeed --num_gpus N --master_port P --module stages.launch ...``;
    * ``hostfile``: ``deepspeed --hostfile H --master_port P --module stages.launch ...``.
    """
    args = stage_arguments(name, config_path, overrides, init_from)
    launcher = cfg.launcher
    if launcher.kind == "inprocess":
        return [sys.executable, "-m", "arr_coc.cli", "stage", *args]
    command = [_deepspeed_executable()]
    if launcher.kind == "hostfile":
        command += ["--hostfile", str(launcher.hostfile)]
    else:
        command += ["--num_gpus", str(launcher.num_gpus)]
    command += ["--master_port", str(launcher.master_port), "--module", "stages.launch"]
    return command + args


def main(argv: list[str] | None = None) -> int:
    """Per-rank entry: drops the launcher's ``--local_rank`` (the env carries it) and runs
    the stage through the ``arr-coc`` command line, so errors and exit codes match."""
    from arr_coc.cli import main as cli_main

    argv = list(sys.argv[1:] if argv is None else argv)
    cleaned: list[str] = []
    skip_next = False
    for arg in argv:
        if skip_next:
            skip_next = False
            continue
        if arg.startswith("--local_rank=") or arg.startswith("--local-rank="):
            continue
        if arg in ("--local_rank", "--local-rank"):
            skip_next = True
            continue
        cleaned.append(arg)
    debug = ["--debug"] if "--debug" in cleaned else []
    cleaned = [a for a in cleaned if a != "--debug"]
    return cli_main([*debug, "stage", *cleaned])


if __name__ == "__main__":
    sys.exit(main())
