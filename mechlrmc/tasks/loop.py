"""`loop`: the task of a recorded run whose data mechlrmc does not know (`mechlrmc.record`).

A user's own loop on a user's own data: the run has only the losses the loop logs (`loss`, and
`eval_loss` where the loop evaluates; without one, every logged loss is also the evaluation). The
lenses that apply are those that need no data: the loss curve's phases, the weight norms of the
checkpoints. It has no batches: sampling from it is an error that says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mechlrmc.tasks import register
from mechlrmc.tasks.base import Task, TaskConfig
from mechlrmc.validation import ConfigError


@dataclass
class LoopConfig(TaskConfig):
    """No data settings: the data is the user's."""

    task: ClassVar[str] = "loop"

    @property
    def seq_len(self) -> int:
        return 0

    @property
    def vocab_size(self) -> int:
        return 0

    def describe(self) -> str:
        return "loop: the user's own data (only its logged losses are known)"


class _Loop(Task):
    name = "loop"
    config = LoopConfig
    train_metrics = ("loss",)
    eval_metrics = ("loss",)
    summary_metrics = ("eval_loss",)
    phase_label = "logged loss"
    final_metrics = ("loss",)

    def sample(self, cfg, batch_size, generator):
        raise ConfigError("data.task='loop' has no data mechlrmc can sample: allowed only for recorded runs "
                          "(give the Recorder a task to evaluate on its data)")

    def evaluate(self, model, batch, sites=None):
        raise ConfigError("data.task='loop' has no evaluation: the recorder writes the loop's own losses")


LOOP = register(_Loop())
