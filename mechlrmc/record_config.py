"""The `record` section of a recorded run's config (`mechlrmc.record.Recorder`): the factory that
rebuilds the user's model, the sites its internals are read at, and the checkpoint schedule."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mechlrmc.validation import require as _require


@dataclass
class RecordConfig:
    """A run recorded from a user's own loop and model (`mechlrmc.record.Recorder`): how to rebuild
    the model (`model_factory`, an importable "module:callable" or "path/to/file.py:callable",
    called with `factory_kwargs`; empty: notebooks pass the model class to `Run.load_model`),
    where its internals are read (`sites`, `mechlrmc.sites.Sites.to_dict`), the checkpoint
    schedule (`checkpoints`: "log", an interval, or a list of steps; `dense`: a [first, last]
    window checkpointed every `dense_every` steps), what drove the recorder (`source`) and the
    working directory it ran in (`workdir`: a relative factory file is also looked for there)."""

    model_factory: str = ""
    factory_kwargs: dict = field(default_factory=dict)
    sites: dict = field(default_factory=dict)
    checkpoints: Any = "log"
    dense: tuple[int, ...] = ()
    dense_every: int = 1
    source: str = "loop"
    workdir: str = ""  # the working directory it was recorded in: where a relative factory file is found

    def __post_init__(self) -> None:
        _require(isinstance(self.factory_kwargs, dict), "record.factory_kwargs", self.factory_kwargs,
                 "a mapping of JSON values")
        _require(self.model_factory == "" or ":" in self.model_factory, "record.model_factory", self.model_factory,
                 "'module:callable' or 'path/to/file.py:callable'")
        checkpoints = self.checkpoints
        _require(checkpoints == "log" or (isinstance(checkpoints, int) and not isinstance(checkpoints, bool)
                                          and checkpoints >= 1)
                 or (isinstance(checkpoints, (list, tuple)) and all(isinstance(c, int) and c >= 0 for c in checkpoints)),
                 "record.checkpoints", checkpoints, "'log', an interval >= 1, or a list of steps >= 0")
        _require(len(self.dense) in (0, 2) and (not self.dense or 0 <= self.dense[0] <= self.dense[1]),
                 "record.dense", list(self.dense), "[] or [first, last] with 0 <= first <= last")
        _require(self.dense_every >= 1, "record.dense_every", self.dense_every, "an integer >= 1")

    def is_checkpoint_step(self, step: int) -> bool:
        """Whether the schedule checkpoints `step` (step 0 always)."""
        if step == 0 or (self.dense and self.dense[0] <= step <= self.dense[1]
                         and (step - self.dense[0]) % self.dense_every == 0):
            return True
        if self.checkpoints == "log":
            return step in log_steps(step)
        if isinstance(self.checkpoints, int):
            return step % self.checkpoints == 0
        return step in self.checkpoints


def log_steps(until: int, per_decade: int = 10) -> set[int]:
    """Log-spaced steps up to `until`: 1, 2, 3, ..., about `per_decade` per factor of ten (rounded,
    distinct), the schedule `record.checkpoints="log"` keeps."""
    steps, k = set(), 0
    while True:
        step = round(10 ** (k / per_decade))
        if step > until:
            return steps
        steps.add(step)
        k += 1
