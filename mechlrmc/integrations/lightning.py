"""`RecorderCallback`: a Lightning `Trainer` records its run as a mechlrmc run directory.

    trainer = L.Trainer(max_steps=400, callbacks=[RecorderCallback("runs/pl", task="mws",
                                                                   model_factory="mypkg:build")])

The recorder (`mechlrmc.record.Recorder`) is made at `on_train_start` with the LightningModule and
the settings of its first optimizer (`record.loop`: the optimizer and its hyper-parameters,
`accumulate_grad_batches`, the processes). After each optimizer step (`on_train_batch_end`, where
`trainer.global_step` has advanced) it records the step with the mean training loss of the
micro-batches that went into it (Lightning hands each one's loss divided by
`accumulate_grad_batches`; the callback multiplies it back). A failed fit closes the run without a
last checkpoint (`on_exception`).

Under a multi-process strategy every process makes its recorder and rank 0 writes
(`mechlrmc.parallel`). A fit resumed from a Lightning checkpoint (`ckpt_path=`) continues the run
from the restored `global_step`; the recorder loads nothing into the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning
import torch

from mechlrmc.record import Recorder
from mechlrmc.record_config import loop_summary


class RecorderCallback(lightning.Callback):
    """Drives a `Recorder` from Lightning's hooks; keyword arguments go to the `Recorder`."""

    def __init__(self, path: str | Path, **recorder_kwargs: Any):
        super().__init__()
        self.path, self.kwargs = Path(path), recorder_kwargs
        self.recorder: Recorder | None = None
        self.losses: list[float] = []

    def on_train_start(self, trainer, pl_module):
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        steps = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        loop = {**loop_summary(optimizer, None, None), "framework": f"lightning {lightning.__version__}",
                "accumulate_grad_batches": trainer.accumulate_grad_batches}
        kw = {"steps": steps, "loop": loop, **self.kwargs}
        if trainer.global_step > 0:  # Lightning restored its own checkpoint: go on from its step
            kw.update(resume=True, start_step=trainer.global_step)
        # Lightning keeps its own resume state: the recorder writes weights and metrics only
        self.recorder = Recorder(self.path, pl_module, source="lightning", **kw)
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.recorder is None:
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            self.losses.append(float(loss) * trainer.accumulate_grad_batches)
        step = trainer.global_step
        if step <= self.recorder.step_done:  # accumulating gradients: no update yet
            return
        metrics = {"loss": sum(self.losses) / len(self.losses)} if self.losses else {}
        self.losses = []
        self.recorder.step(step, **metrics)

    def on_train_end(self, trainer, pl_module):
        if self.recorder is not None:
            self.recorder.close()

    def on_exception(self, trainer, pl_module, exception):
        if self.recorder is not None:
            self.recorder.close(failed=True)
