"""Errors the command line turns into one ``error:`` line and an exit code."""


class ArrCocError(Exception):
    """A runtime failure (exit 1); the message names the file, key or record at fault."""

    exit_code = 1


class ConfigError(ArrCocError, ValueError):
    """A usage or configuration error (exit 2); the message names the file and key."""

    exit_code = 2


class DataError(ArrCocError):
    """Bad input data (exit 1): names the file, shard or record."""
