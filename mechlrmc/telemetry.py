"""Live telemetry: a run's metrics and mechanistic measures, sent to TensorBoard and/or W&B while it trains.

`train.log` ("tensorboard", "wandb" or "both"; the `telemetry` extra) hangs a `Telemetry` on the
Trainer's callbacks. At every evaluation it logs, under the evaluation's step,
- `train/NAME`, `eval/NAME`: the row that goes into metrics.csv (the task's named losses and
  metrics; a token task's repetition is its `eval/rep`);
- on the first `MEASURE_EXAMPLES` examples of the fixed evaluation batch (`mechlrmc.measures`;
  one forward pass, a fraction of the evaluation's cost): `attention_progress/LlHh` (share on the
  task's optimal attention map), `attention_entropy/LlHh`, `collapse/Ll` (mean pairwise cosine of
  block l's output across the scored positions) and, on LRMC, `heads/SCORE/LlHh` (the taxonomy
  shares of finding 4, on a task that supports "matrix");
- `weight_norm/COMPONENT` and `grad_norm/COMPONENT` (the last step's gradients);
and every `train.log_images_every` steps (0: every 10th evaluation), at step 0 and at the last
step, `attention_pattern/LlHh`: each head's |pattern| averaged over the batch, as an image scaled
to its largest cell. The config is logged once, as hyper-parameters.

Files stay in the run directory: `RUN/tensorboard/` (one event file per process) and `RUN/wandb/`
(offline unless $WANDB_MODE says otherwise; project $WANDB_PROJECT, default "mechlrmc"). A run whose
parent directory holds a `sweep.yaml` joins the W&B group named after that sweep directory, so a
sweep is one TensorBoard log directory (one run per trial) and one W&B group.

Resume never logs a step twice: a resumed TensorBoard writer purges the steps after the resume
point (`purge_step`), and W&B receives its rows at each checkpoint, after the resume state is
written, so the steps a resume replays were never sent. The telemetry reads the model in eval mode
without gradients and draws no random numbers: a run with it equals a run without it.
"""

from __future__ import annotations

import importlib.util
import math
import os
import secrets
from pathlib import Path
from typing import Any

import torch

import mechlrmc
from mechlrmc import measures
from mechlrmc.errors import UsageError
from mechlrmc.runs import atomic_write
from mechlrmc.sites import Sites

SINKS = {"tensorboard": ("tensorboard",), "wandb": ("wandb",), "both": ("tensorboard", "wandb"), "none": ()}
MEASURE_EXAMPLES = 256  # examples of the evaluation batch the measures are taken on
IMAGE_EVERY_EVALS = 10  # images every 10th evaluation where train.log_images_every is 0
IMAGE_MIN_SIZE = 128  # pixels: small patterns are enlarged (nearest neighbour) to at least this


class TelemetryError(UsageError):
    """A package that `train.log` needs is not installed."""


def require(log: str) -> None:
    """Raise a one-line TelemetryError where a package that `train.log=log` needs is missing."""
    missing = [name for name in SINKS[log] if importlib.util.find_spec(name) is None]
    if missing:
        raise TelemetryError(f"train.log={log!r} needs {' and '.join(missing)}, which is not installed: "
                             f"pip install 'mechlrmc[telemetry]' (or use train.log='none')")


def attach(trainer: mechlrmc.train.Trainer) -> Telemetry | None:
    """A `Telemetry` on `trainer`'s callbacks, or None where `train.log` is "none"."""
    return Telemetry(trainer) if trainer.cfg.train.log != "none" else None


def image_every(cfg: mechlrmc.config.RunConfig) -> int:
    return cfg.train.log_images_every or IMAGE_EVERY_EVALS * cfg.train.eval_every


def flat_config(cfg: mechlrmc.config.RunConfig) -> dict[str, Any]:
    """{"section.key": value} with lists as text (hyper-parameters must be scalars)."""
    return {f"{section}.{key}": value if isinstance(value, (bool, int, float, str)) else str(value)
            for section, values in cfg.to_dict().items() for key, value in values.items()}


class Telemetry:
    """Computes the measures at each evaluation and sends them to the sinks of `train.log`."""

    def __init__(self, trainer: mechlrmc.train.Trainer):
        cfg = trainer.cfg
        self.cfg = cfg
        data = trainer.eval_data
        self.batch = None if data is None else data[:MEASURE_EXAMPLES].to(trainer.device)  # None: a loop's own data
        self.sites = getattr(trainer, "sites", None) or Sites.of(trainer.model)
        self.image_every = image_every(cfg)
        self.sinks: list[TensorBoardSink | WandbSink] = []
        trainer.add_callback("on_eval", self.on_eval)
        trainer.add_callback("on_checkpoint", self.on_checkpoint)
        trainer.add_callback("on_close", self.on_close)  # also closes the sinks opened when another fails to open
        path, names = trainer.run.path, SINKS[cfg.train.log]
        if "tensorboard" in names:
            self.sinks.append(TensorBoardSink(path / "tensorboard", cfg, trainer.step, trainer.resumed))
        if "wandb" in names:
            self.sinks.append(WandbSink(path, cfg))

    def measure(self, trainer: mechlrmc.train.Trainer) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        """This evaluation's scalars ({tag: value}: the metrics row, the measures on the batch, the
        norms) and, at an image step, its images ({tag: uint8 [H, W]})."""
        out = {}
        for key, value in trainer.last_metrics.items():
            if key != "step":
                out[key.replace("eval_", "eval/", 1) if key.startswith("eval_") else f"train/{key}"] = float(value)
        patterns = []
        if self.batch is not None and self.sites.names:
            model, was_training = trainer.model, trainer.model.training
            model.eval()
            try:
                with torch.no_grad():
                    _, acts = self.sites.capture(model, self.batch.tokens)
            finally:
                model.train(was_training)
            patterns = self.sites.patterns(acts)
            on_map = trainer.task.optimal_attention_map(self.batch)
            scored = self.batch.scored
            causal = self.cfg.model.causal if self.cfg.model is not None else True in trainer.task.causal
            for layer, pattern in enumerate(patterns):
                heads = {"attention_progress": measures.attention_share(pattern, on_map),
                         "attention_entropy": measures.attention_entropy(pattern, causal)}
                if "matrix" in trainer.task.supports:
                    scores = measures.matrix_head_scores(pattern, self.batch.observed, self.batch.m, self.batch.n)
                    heads.update({f"heads/{name}": value for name, value in scores.items()})
                for group, values in heads.items():
                    out.update({f"{group}/L{layer}H{head}": float(v) for head, v in enumerate(values.tolist())})
            for label, name in self.sites.hidden.items():
                if label != "final":
                    out[f"collapse/L{label}"] = measures.mean_pairwise_cosine(acts[name], scored)
            if "final" in self.sites.hidden or not any(k.startswith("collapse/") for k in out):
                final = self.sites.final
                if final is not None:
                    out["collapse/final"] = measures.mean_pairwise_cosine(acts[final], scored)
        out.update({f"weight_norm/{k}": v for k, v in measures.component_norms(trainer.model).items()})
        kept = getattr(trainer, "grad_norms", None)  # taken before a framework cleared the gradients
        grads = kept if kept is not None else measures.component_norms(trainer.model, grads=True)
        out.update({f"grad_norm/{k}": v for k, v in grads.items()})
        step = trainer.step
        images = {}
        if step % self.image_every == 0 or step == self.cfg.train.steps:
            for layer, pattern in enumerate(patterns):
                for head, image in enumerate(pattern_images(pattern)):
                    images[f"attention_pattern/L{layer}H{head}"] = image
        return out, images

    def on_eval(self, trainer: mechlrmc.train.Trainer) -> None:
        scalars, images = self.measure(trainer)
        for sink in self.sinks:
            sink.log(trainer.step, scalars, images)

    def on_checkpoint(self, trainer: mechlrmc.train.Trainer) -> None:
        for sink in self.sinks:
            sink.checkpoint()

    def on_close(self, trainer: mechlrmc.train.Trainer) -> None:
        for sink in self.sinks:
            sink.close()
        self.sinks = []


def pattern_images(pattern: torch.Tensor) -> list[torch.Tensor]:
    """Per head, |pattern| [b, h, q, k] averaged over the batch, scaled to its largest cell, as
    uint8 [q * s, k * s] images (s: the smallest factor reaching `IMAGE_MIN_SIZE` pixels)."""
    mean = pattern.float().abs().mean(0).cpu()  # [h, q, k]
    mean = mean / mean.amax((-2, -1), keepdim=True).clamp_min(1e-12)
    scale = math.ceil(IMAGE_MIN_SIZE / min(mean.shape[-2:]))
    mean = mean.repeat_interleave(scale, -2).repeat_interleave(scale, -1)
    return list((mean * 255).round().to(torch.uint8))


class TensorBoardSink:
    """Scalars and images into `RUN/tensorboard/`, flushed at every evaluation. A resumed writer
    purges what a killed one wrote after the resume step."""

    def __init__(self, path: Path, cfg: mechlrmc.config.RunConfig, step: int, resumed: bool):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self.writer = SummaryWriter(str(path), purge_step=step + 1 if resumed else 0)
        if not resumed:
            metrics = {f"eval/{m}": math.nan for m in cfg.task.eval_metrics}
            for summary in hparams(flat_config(cfg), metrics):
                self.writer.file_writer.add_summary(summary)
            self.writer.add_text("config", "    " + cfg.to_yaml().replace("\n", "\n    "), 0)
            self.writer.flush()

    def log(self, step: int, scalars: dict[str, float], images: dict[str, torch.Tensor]) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)
        for tag, image in images.items():
            self.writer.add_image(tag, image.numpy(), step, dataformats="HW")
        self.writer.flush()

    def checkpoint(self) -> None:
        """Nothing to do: every evaluation is flushed."""

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """A W&B run in `RUN/wandb/` (one id per run directory, kept across resumes). Rows are held
    until the next checkpoint, so a resume, which replays the steps since the last one, never
    sends a step twice."""

    def __init__(self, path: Path, cfg: mechlrmc.config.RunConfig):
        import wandb

        self.wandb = wandb
        directory = path / "wandb"
        directory.mkdir(exist_ok=True)
        id_file = directory / "run-id"
        if not id_file.is_file():
            atomic_write(id_file, secrets.token_hex(8).encode())  # the OS's randomness: no generator of the run
        sweep = path.parent if (path.parent / "sweep.yaml").is_file() else None
        mode = os.environ.get("WANDB_MODE", "offline")
        try:
            self.run = wandb.init(
                dir=str(path), id=id_file.read_text().strip(), name=path.name, resume="allow", mode=mode,
                project=os.environ.get("WANDB_PROJECT", "mechlrmc"), group=sweep.name if sweep else None,
                config=cfg.to_dict(), reinit="create_new",
                settings=wandb.Settings(console="off", silent=True, x_disable_stats=True),
            )
        except Exception as e:  # a bad WANDB_MODE, no login for online mode, no network, ...
            message = " ".join(str(e).split()) or type(e).__name__
            raise TelemetryError(f"W&B could not start a run with WANDB_MODE={mode!r} ({message}): allowed offline "
                                 "(the default), online after `wandb login`, or train.log='tensorboard'") from e
        self.pending: list[tuple[int, dict[str, Any]]] = []

    def log(self, step: int, scalars: dict[str, float], images: dict[str, torch.Tensor]) -> None:
        row: dict[str, Any] = dict(scalars)
        row.update({tag: self.wandb.Image(image.numpy()) for tag, image in images.items()})
        self.pending.append((step, row))

    def checkpoint(self) -> None:
        for step, row in self.pending:
            self.run.log(row, step=step, commit=True)
        self.pending = []

    def close(self) -> None:
        """Finish the W&B run; rows after the last checkpoint are dropped (a resume replays them).
        Where no other W&B run is active, the W&B service is stopped too: only then are an offline
        run's files complete on disk."""
        self.pending = []
        self.run.finish()
        if self.wandb.run is None:
            self.wandb.teardown()
