"""The task registry: every task the toolkit trains on, by name (`data.task` in a run's config).

A task is one module that defines a `Task` (`mechlrmc.tasks.base`) and calls `register(task)`:
its data config, batch, loss, named metrics, optimal attention map, analytic plateau, read-out,
the attention it allows and its presets. The core (config, Trainer, runs, sweep) only ever asks
the registry; it never branches on a task's name. Built-in tasks load on first use, so the command
line starts without torch.

    from mechlrmc.tasks import TASKS, get_task, register
    get_task("mws").presets["mws"]()      # the plateau paper's MWS configuration
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Iterator

import mechlrmc
from mechlrmc.validation import ConfigError

if TYPE_CHECKING:
    from mechlrmc.tasks.base import Task

DEFAULT_TASK = "lrmc"
# Built-in tasks and their presets, loaded on first use (tests/test_tasks.py checks this table).
BUILTIN = {name: f"mechlrmc.tasks.{name}" for name in ("lrmc", "mws", "prefix_sum", "reverse", "loop")}
BUILTIN_PRESETS = {"paper": "lrmc", "cpu": "lrmc", "tiny": "lrmc", "mws": "mws", "mws_tiny": "mws",
                   "prefix_sum": "prefix_sum", "reverse": "reverse"}

_registered: dict[str, Task] = {}


def register(task: Task) -> Task:
    """Add `task` (and its presets) to the registry; returns it. A name may be registered once."""
    if task.name in _registered and _registered[task.name] is not task:
        raise ValueError(f"task {task.name!r} is already registered")
    taken = {p: t for p, t in BUILTIN_PRESETS.items() if t != task.name}
    taken.update({p: t.name for t in _registered.values() if t is not task for p in t.presets})
    clash = sorted(set(task.presets) & set(taken))
    if clash:
        raise ValueError(f"task {task.name!r}: preset name(s) {clash} are taken by other tasks")
    _registered[task.name] = task
    return task


def get_task(name: str) -> Task:
    """The registered task `name` (a built-in one is imported on first use)."""
    if not isinstance(name, str):
        raise ConfigError(f"data.task={name!r} has the wrong type: expected one of {task_names()}")
    if name not in _registered and name in BUILTIN:
        importlib.import_module(BUILTIN[name])
    if name not in _registered and ":" in name:  # a user's task, "module:object"
        return register(_import_task(name))
    if name not in _registered:
        raise ConfigError(f"data.task={name!r} is unknown: allowed {task_names()}")
    return _registered[name]


def _import_task(spec: str) -> Task:
    """The task object `module:object` names (a `Task` instance), registered under that name."""
    from mechlrmc.tasks.base import Task

    module, _, attr = spec.partition(":")
    try:
        task = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"data.task={spec!r} does not import ({e}): allowed a registered task {task_names()} "
                          f"or 'module:object' naming a Task") from None
    if not isinstance(task, Task):
        raise ConfigError(f"data.task={spec!r} is a {type(task).__name__}: allowed a Task instance "
                          f"(mechlrmc.tasks.base.Task)")
    if task.name != spec:
        task.name = spec  # found again under the name a run's config records
    return task


def task_names() -> list[str]:
    return sorted(set(BUILTIN) | set(_registered))


class _Tasks(Mapping):
    """`TASKS[name]` is `get_task(name)`; iterating lists the names without importing anything."""

    def __getitem__(self, name: str) -> Task:
        try:
            return get_task(name)
        except ConfigError:
            raise KeyError(name) from None

    def __iter__(self) -> Iterator[str]:
        return iter(task_names())

    def __len__(self) -> int:
        return len(task_names())


TASKS = _Tasks()


def preset_names() -> list[str]:
    return sorted(set(BUILTIN_PRESETS) | {p for t in _registered.values() for p in t.presets})


def preset(name: str) -> mechlrmc.config.RunConfig:
    """A fresh copy of the named preset, from whichever task defines it."""
    owner = BUILTIN_PRESETS.get(name) or next((t.name for t in _registered.values() if name in t.presets), None)
    if owner is None:
        raise ConfigError(f"preset={name!r} is unknown: allowed {preset_names()}")
    return get_task(owner).presets[name]()
