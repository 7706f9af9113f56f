"""Stage name → task class, imported on first use so ``arr-coc --help`` stays fast
and a stage's heavy dependencies load only when that stage runs."""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping

from arr_coc.errors import ConfigError
from stages.base import StageTask

TASK_SPECS: dict[str, str] = {
    "stage0": "stages.stage0:Stage0Task",
    "stage1": "stages.stage1:Stage1Task",
    "stage2": "stages.stage2:Stage2Task",
    "mine": "stages.mine:MineTask",
    "stage3": "stages.stage3:Stage3Task",
}


class _LazyTasks(Mapping[str, type[StageTask]]):
    """A read-only mapping whose values are imported from ``module:Class`` specs on access."""

    def __init__(self, specs: dict[str, str]):
        self._specs = specs
        self._loaded: dict[str, type[StageTask]] = {}

    def __getitem__(self, name: str) -> type[StageTask]:
        if name not in self._loaded:
            module_name, class_name = self._specs[name].split(":")
            cls = getattr(importlib.import_module(module_name), class_name)
            if not (isinstance(cls, type) and issubclass(cls, StageTask)):
                raise TypeError(f"{self._specs[name]} is not a StageTask subclass")
            self._loaded[name] = cls
        return self._loaded[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs)

    def __len__(self) -> int:
        return len(self._specs)

    def register(self, name: str, task: type[StageTask] | str) -> None:
        """Add or replace a task (a class or a ``module:Class`` spec), e.g. a custom stage."""
        self._loaded.pop(name, None)
        if isinstance(task, str):
            self._specs[name] = task
        else:
            self._specs[name] = f"{task.__module__}:{task.__qualname__}"
            self._loaded[name] = task


TASKS = _LazyTasks(dict(TASK_SPECS))


def task_class(name: str) -> type[StageTask]:
    if name not in TASKS:
        raise ConfigError(f"unknown stage {name!r}; expected one of {', '.join(TASKS)}")
    return TASKS[name]
