"""Rebuilding a user's model from its recorded factory (`record.model_factory`, `mechlrmc.record`).

A factory is an importable "module:callable" (`mypkg.models:build`) or a file and a callable
("path/to/example.py:build", a path relative to the working directory or absolute), called with
the recorded JSON-able keyword arguments. Importing it runs the user's own code, as importing any
of their modules does; the weights still come only from safetensors files.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Any, Callable

import torch

from mechlrmc.errors import UsageError


class FactoryError(UsageError, ValueError):
    """A model factory that does not import, or whose model does not fit the checkpoints."""


class FactoryFailed(FactoryError):
    """A model factory that imports and takes its arguments, but raises while it builds."""


def import_object(spec: str, base: str | Path | None = None) -> Any:
    """The object "module:name" or "path/to/file.py:name" names (a relative file is looked for in
    the working directory, then under `base`); one-line `FactoryError` otherwise."""
    module_name, _, attr = spec.rpartition(":")
    allowed = "allowed 'module:callable' (importable) or 'path/to/file.py:callable'"
    if not module_name or not attr:
        raise FactoryError(f"model_factory={spec!r} is invalid: {allowed}")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_absolute() and not path.is_file() and base:
                path = Path(base) / path
            path = path.resolve()
            name = f"mechlrmc_factory_{path.stem}"
            module = sys.modules.get(name)
            if module is None or getattr(module, "__file__", None) != str(path):
                loader = importlib.util.spec_from_file_location(name, path)
                if loader is None or not path.is_file():
                    raise ImportError(f"no file {path}")
                module = importlib.util.module_from_spec(loader)
                sys.modules[name] = module
                loader.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
        return getattr(module, attr)
    except (ImportError, AttributeError, SyntaxError) as e:
        raise FactoryError(f"model_factory={spec!r} does not import ({type(e).__name__}: {e}); {allowed}") from None


def factory_spec(factory: Any) -> str:
    """The "module:callable" that names `factory` (a string as it is, "" for None): a class or
    function must be importable again, so not one of `__main__` or a local one."""
    if factory is None or isinstance(factory, str):
        return factory or ""
    module, name = getattr(factory, "__module__", None), getattr(factory, "__qualname__", "")
    if not module or module == "__main__" or "<" in name:
        raise FactoryError(f"model_factory={factory!r} cannot be imported again: allowed 'module:callable', "
                           f"'path/to/file.py:callable', or a class or function defined in an importable module")
    return f"{module}:{name}"


def build_model(factory: str | Callable | type, kwargs: dict | None = None,
                base: str | Path | None = None) -> torch.nn.Module:
    """`factory(**kwargs)`: the model a recorded run's checkpoints load into (`base`: where a
    relative factory file is looked for after the working directory)."""
    make = import_object(factory, base) if isinstance(factory, str) else factory
    if not callable(make):
        raise FactoryError(f"model_factory={factory!r} is a {type(make).__name__}: allowed a callable returning "
                           f"an nn.Module")
    try:
        inspect.signature(make).bind(**(kwargs or {}))
    except TypeError as e:
        raise FactoryError(f"model_factory={factory!r} does not take factory_kwargs={kwargs!r} ({e})") from None
    except ValueError:  # a callable without a signature Python can read: call it and see
        pass
    try:
        model = make(**(kwargs or {}))
    except FactoryError:
        raise
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise FactoryFailed(f"model_factory={factory!r} failed with factory_kwargs={kwargs!r} ({type(e).__name__} "
                           f"inside the factory: {first}); allowed a factory that builds the model from them") from None
    if not isinstance(model, torch.nn.Module):
        raise FactoryError(f"model_factory={factory!r} returned a {type(model).__name__}: allowed an nn.Module")
    return model


def check_fits(model: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """One-line `FactoryError` where `state` (names and shapes) is not `model`'s state dict."""
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    given = {k: tuple(v.shape) for k, v in state.items()}
    if own == given:
        return
    missing, extra = sorted(set(own) - set(given)), sorted(set(given) - set(own))
    shapes = sorted(k for k in set(own) & set(given) if own[k] != given[k])
    parts = [f"missing {missing[:3]}" if missing else "", f"unexpected {extra[:3]}" if extra else "",
             f"other shapes {[(k, given[k], own[k]) for k in shapes[:2]]}" if shapes else ""]
    raise FactoryError(f"{what} does not fit the model {type(model).__name__}: "
                       f"{'; '.join(p for p in parts if p)}; allowed the same parameter names and shapes")


def check_factory(factory: str, kwargs: dict, state: dict[str, torch.Tensor], what: str) -> None:
    """The factory imports and builds a model whose names and shapes are `state`'s; built on the
    meta device (no memory for its weights, no draw from torch's RNG) where it allows."""
    try:
        with torch.device("meta"):
            model = build_model(factory, kwargs)
    except FactoryFailed:
        with torch.random.fork_rng(devices=[]):  # a factory the meta device cannot run: a real one
            model = build_model(factory, kwargs)
    check_fits(model, state, what)
