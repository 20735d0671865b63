"""Validation helpers shared by the configs of the core and of every task (`mechlrmc.tasks`).

`require(ok, name, value, allowed)` raises the one-line `ConfigError` that names the bad field and
what is allowed; `check_types(cfg, prefix)` rejects values whose type does not match the dataclass
annotation (bools are not ints). Torch-free, so the command line can start without torch.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any, get_type_hints

from mechlrmc.errors import UsageError


class ConfigError(UsageError, ValueError):
    """A configuration value is out of range, of the wrong type, or unknown."""


def require(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{name}={value!r} is invalid: allowed {allowed}")


def check_types(cfg: Any, prefix: str) -> None:
    """Reject values whose type does not match the dataclass annotation (bools are not ints)."""
    hints = get_type_hints(type(cfg))
    for f in fields(cfg):
        value, hint = getattr(cfg, f.name), hints[f.name]
        name = f"{prefix}.{f.name}"
        if hint is bool:
            ok = isinstance(value, bool)
        elif hint is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif hint is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if ok:
                object.__setattr__(cfg, f.name, float(value))
        elif hint is str:
            ok = isinstance(value, str)
        elif hint == tuple[int, ...]:
            if isinstance(value, list):
                value = tuple(value)
                object.__setattr__(cfg, f.name, value)
            ok = isinstance(value, tuple) and all(
                isinstance(v, int) and not isinstance(v, bool) for v in value
            )
        else:
            ok = True
        if not ok:
            raise ConfigError(f"{name}={value!r} has the wrong type: expected {_type_name(hint)}")


def _type_name(hint: Any) -> str:
    return "a list of integers" if hint == tuple[int, ...] else getattr(hint, "__name__", str(hint))
