"""`loop`: the task of a recorded run whose data mechlrmc does not know (`mechlrmc.record`).

A user's own loop on a user's own data: the run has only the losses the loop logs (`loss`, its
training loss, and `eval_loss` where the loop evaluates). The phases read the loop's evaluations,
or, in a loop that passes none, its training loss: one or the other, never a mix. The
lenses that apply are those that need no data (the loss curve's phases) and, where the loop
recorded one batch (`Recorder.record_batch`: inputs, targets and the loss, "cross_entropy" or
"mse"), those that need only a batch and the loss: weight and gradient norms, the top Hessian
eigenvalue and the essential dynamics (`analyses.plateau.early_warning`). It has no batches of its
own: sampling from it is an error that says so.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch
import torch.nn.functional as F

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


LOSSES = ("cross_entropy", "mse")


@dataclass
class LoopBatch:
    """One batch a loop recorded: the model's input `tokens` (any tensor its forward takes), the
    `targets` and the loss they go into."""

    tokens: torch.Tensor
    targets: torch.Tensor
    loss: str = "cross_entropy"
    task: ClassVar[str] = "loop"
    description: ClassVar[str] = "recorded examples"

    def to(self, device) -> LoopBatch:
        return replace(self, tokens=self.tokens.to(device), targets=self.targets.to(device))

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index) -> LoopBatch:
        return replace(self, tokens=self.tokens[index], targets=self.targets[index])


class _Loop(Task):
    name = "loop"
    config = LoopConfig
    train_metrics = ("loss",)
    eval_metrics = ("loss",)
    summary_metrics = ("eval_loss",)
    phase_label = "the loop's loss"
    final_metrics = ("loss",)
    has_data = False

    def evaluations(self, metrics):
        """The loop's own evaluations (`eval_loss`, as it passed them); a loop that passed none is
        read through its training loss (`loss` as `eval_loss`), never a mix of the two."""
        if metrics.eval_loss.notna().any() or "loss" not in metrics:
            return super().evaluations(metrics)
        rows = metrics[metrics.loss.notna()].reset_index(drop=True)
        return rows.assign(eval_loss=rows.loss)

    def sample(self, cfg, batch_size, generator):
        raise ConfigError("data.task='loop' has no data mechlrmc can sample: allowed only for recorded runs "
                          "(give the Recorder a task to evaluate on its data)")

    def evaluate(self, model, batch, sites=None):
        raise ConfigError("data.task='loop' has no evaluation: the recorder writes the loop's own losses")

    def loss(self, output, batch: LoopBatch) -> dict[str, torch.Tensor]:
        """The recorded batch's loss: cross-entropy of logits [..., vocab] against class targets
        [...], or the mean squared error of outputs against targets of their shape."""
        output = output if isinstance(output, torch.Tensor) else output.logits
        if batch.loss == "cross_entropy":
            return {"loss": F.cross_entropy(output.float().flatten(0, -2), batch.targets.flatten())}
        return {"loss": F.mse_loss(output.float(), batch.targets.float())}


LOOP = register(_Loop())
