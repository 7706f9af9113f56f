"""The ``arr-coc`` command line: a thin dispatcher.

Each part of the pipeline registers its own subcommands (``register(subparsers)``)
and keeps heavy imports inside its handlers, so ``arr-coc --help`` is fast.
Exit codes: 0 success, 2 usage or config error, 1 runtime failure. Errors are one
line starting ``error:``; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback

from arr_coc.errors import ArrCocError, ConfigError

# Modules that provide ``register(subparsers)``; each adds its subcommands.
COMMAND_MODULES = (
    "data_prep.cli",  # data synth, shard coco|vqav2|inspect
    "stages.cli",  # stage NAME
    "flows.cli",  # curriculum, serve
    "arr_coc.demo",  # demo
)


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so errors share one format."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="arr-coc", description="ARR-COC curriculum pipeline")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name != name:  # a real import failure inside the module
                raise
            continue
        module.register(sub)
    return parser


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config FILE`` and repeated ``--set key.sub=value`` (shared by stage/curriculum)."""
    parser.add_argument("--config", required=True, help="run config YAML (e.g. configs/tiny.yaml)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set stages.stage1.max_steps=10 (repeatable)",
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        result = args.handler(args)
        return int(result or 0)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except ArrCocError as err:
        if debug:
            traceback.print_exc()
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except (ValueError, OSError, RuntimeError) as err:
        if debug:
            traceback.print_exc()
        print(f"error: {type(err).__name__}: {err}".splitlines()[0], file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
