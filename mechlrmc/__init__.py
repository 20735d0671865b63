"""mechlrmc: abrupt learning in transformers, the core (configs, tasks, model, training, runs).

`from mechlrmc import Recorder` records any PyTorch loop and model as a run directory
(`mechlrmc.record`); the names are imported on first use, so the command line starts without torch.
"""

_EXPORTS = {"Recorder": "mechlrmc.record", "Run": "mechlrmc.runs", "Sites": "mechlrmc.sites"}


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mechlrmc' has no attribute {name!r}")
