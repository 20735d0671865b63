"""`RecorderCallback`: a Lightning `Trainer` records its run as a mechlrmc run directory.

    trainer = L.Trainer(max_steps=400, callbacks=[RecorderCallback("runs/pl", task="mws",
                                                                   model_factory="mypkg:build")])

The recorder (`mechlrmc.record.Recorder`) is made at `on_train_start` with the LightningModule and
the first optimizer; after each optimizer step (`on_train_batch_end`, where `trainer.global_step`
has advanced) it records the step with the batch's loss (`outputs["loss"]`, or the returned tensor).
A failed fit closes the run without a last checkpoint (`on_exception`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning
import torch

from mechlrmc.record import Recorder


class RecorderCallback(lightning.Callback):
    """Drives a `Recorder` from Lightning's hooks; keyword arguments go to the `Recorder`."""

    def __init__(self, path: str | Path, **recorder_kwargs: Any):
        super().__init__()
        self.path, self.kwargs = Path(path), recorder_kwargs
        self.recorder: Recorder | None = None

    def on_train_start(self, trainer, pl_module):
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        steps = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        self.recorder = Recorder(self.path, pl_module, optimizer=optimizer, steps=steps, source="lightning",
                                 **self.kwargs)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if self.recorder is None or step <= self.recorder.step_done:  # accumulating gradients: no update yet
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        self.recorder.step(step, **({"loss": float(loss)} if isinstance(loss, torch.Tensor) else {}))

    def on_train_end(self, trainer, pl_module):
        if self.recorder is not None:
            self.recorder.close()

    def on_exception(self, trainer, pl_module, exception):
        if self.recorder is not None:
            self.recorder.close(failed=True)
