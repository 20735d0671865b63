"""The run directory: config, metrics table, checkpoints named by step, and resume state.

    RUN/config.yaml            the RunConfig
    RUN/metrics.csv            one row per logged step (`mechlrmc.metrics_table`: the task's
                               `metric_columns`, LRMC's METRIC_COLUMNS, then a recorded loop's own)
    RUN/manifest.json          every checkpoint's file, size and SHA-256
    RUN/checkpoints/step_000500.safetensors   model weights at step 500
    RUN/resume.safetensors     weights, optimizer and RNG state at the latest checkpoint
    RUN/provenance.json        versions, device and threads the run was made with
    RUN/writer.lock            the writer's OS lock (PID and host inside)

Every file is written to a temporary name, flushed to disk and renamed, so a killed process leaves
either the old file or the new one, never half of one; a write that fails (full disk, file-size
limit) removes its temporary file and raises `WriteError` naming the file. Weights are safetensors
(no pickle); `Run.load_model` checks size and hash first, so a truncated or tampered file is an
error that names the file rather than a silently different model. One process writes a run at a
time (`Run.lock`, an `fcntl.flock` the OS drops when its holder dies); readers take no lock.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from safetensors.torch import load_file, save

from mechlrmc import metrics_table
from mechlrmc.config import RunConfig
from mechlrmc.files import (LOCK_FILE, TMP_MARK, CheckpointError, RunExistsError, RunLock, RunLockedError, WriteError,
                            atomic_write, is_bookkeeping, write_failed)

__all__ = ["METRIC_COLUMNS", "FORMAT_VERSION", "LOCK_FILE", "TMP_MARK", "CheckpointError", "RunExistsError", "RunLock",
           "RunLockedError", "WriteError", "atomic_write", "read_provenance", "Run"]

METRIC_COLUMNS = (
    "step", "loss", "loss_obs", "loss_mask",
    "eval_loss", "eval_loss_obs", "eval_loss_mask", "eval_corr_mask", "wall_time",
)
FORMAT_VERSION = 1
def read_provenance(folder: str | Path) -> dict | None:
    """`folder/provenance.json` (a run's, or a shipped family's): None where none was recorded."""
    file = Path(folder) / "provenance.json"
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file} is corrupt: {e}") from e


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors, each with its own memory (a model with tied weights, e.g. a Hugging Face LM's
    embedding and head, holds one tensor under two names; safetensors stores each name apart)."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for name, tensor in tensors.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        out[name] = tensor.clone() if key in seen and tensor.numel() else tensor
        seen.add(key)
    return out


def _read_state(file: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(file), "pt") as f:
            meta = f.metadata()
        return load_file(str(file)), meta
    except Exception as e:  # safetensors raises its own error types for truncated headers
        raise CheckpointError(f"{file} is truncated or corrupt ({e}): training cannot continue from it") from e


class Run:
    """A training run on disk. `Run(path).load_model(step)` is how analyses get a model."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise CheckpointError(f"{self.path} does not exist: allowed a run directory (one with config.yaml)")
        if not (self.path / "config.yaml").is_file():
            raise CheckpointError(f"{self.path} is not a run directory: it has no config.yaml")
        self.config = RunConfig.from_yaml(self.path / "config.yaml")
        self._columns: tuple[str, ...] | None = None  # the writer's metrics.csv columns, once read

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}, steps={self.steps})"

    @property
    def metric_columns(self) -> tuple[str, ...]:
        """The columns of metrics.csv: step, the task's metrics, its eval metrics, wall_time, then
        any scalar a recorded loop added (`Recorder.step`), in the order they first came."""
        return metrics_table.header(self.path / "metrics.csv") or self.config.task.metric_columns

    # ----- creation and writing (used by the trainer) -----
    @classmethod
    def create(cls, path: str | Path, config: RunConfig) -> Run:
        """A new run directory (empty but for a lock file or temporary files of a killed writer)."""
        path = cls.check_new(path)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise write_failed(path, e) from e
        atomic_write(path / "config.yaml", config.to_yaml().encode())
        run = cls(path)
        run.restart()
        return run

    @staticmethod
    def check_new(path: str | Path) -> Path:
        """`path` if a new run may be created there, else a `CheckpointError` saying why not."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise CheckpointError(f"{path} is a file: --out must be a directory (new or empty)")
        if (path / "config.yaml").is_file():
            raise RunExistsError(f"{path} is already a run: pass --resume to continue it, or another --out")
        if path.exists() and any(not is_bookkeeping(p.name) for p in path.iterdir()):
            raise RunExistsError(f"{path} is not empty and not a run (it has no config.yaml): allowed a new or "
                                 f"empty directory (--resume continues a run)")
        return path

    def restart(self) -> None:
        """Empty the metrics table and the manifest: training starts again from step 0."""
        self.remove_temporary_files()
        self._columns = self.config.task.metric_columns
        metrics_table.start(self.path / "metrics.csv", self._columns)
        atomic_write(self.path / "manifest.json", json.dumps({"format": FORMAT_VERSION, "checkpoints": {}}).encode())

    def remove_temporary_files(self) -> None:
        """Delete temporary files left by a killed writer (call only while holding the lock)."""
        for file in [*self.path.glob(f".*{TMP_MARK}*"), *self.path.glob(f"checkpoints/.*{TMP_MARK}*")]:
            file.unlink(missing_ok=True)

    def lock(self) -> RunLock:
        """Take the writer lock (`with run.lock(): ...`); `RunLockedError` if another process has it."""
        return RunLock(self.path).acquire()

    def save_provenance(self, provenance: dict) -> None:
        atomic_write(self.path / "provenance.json", json.dumps(provenance, indent=1).encode())

    @property
    def provenance(self) -> dict | None:
        """What the run was made with (`mechlrmc.provenance`); None for runs made before it was recorded."""
        return read_provenance(self.path)

    def save_config(self, config: RunConfig) -> None:
        atomic_write(self.path / "config.yaml", config.to_yaml().encode())
        self.config = config

    def _manifest(self) -> dict:
        file = self.path / "manifest.json"
        if not file.is_file():
            raise CheckpointError(f"{file} is missing")
        try:
            return json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{file} is corrupt: {e}") from e

    def save_checkpoint(self, step: int, state_dict: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> Path:
        """Write the weights of `step` and register them in the manifest (both atomically)."""
        tensors = _unshared({k: (v.to(dtype) if dtype else v).detach().cpu().contiguous() for k, v in state_dict.items()})
        data = save(tensors, metadata={"step": str(step), "format": str(FORMAT_VERSION)})
        rel = f"checkpoints/step_{step:06d}.safetensors"
        manifest = self._manifest()
        registered = str(step) in manifest["checkpoints"]
        atomic_write(self.path / rel, data)
        manifest["checkpoints"][str(step)] = {
            "file": rel, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
        }
        try:
            atomic_write(self.path / "manifest.json", json.dumps(manifest, indent=1).encode())
        except WriteError:
            if not registered:  # an unregistered file would be a checkpoint nothing vouches for
                (self.path / rel).unlink(missing_ok=True)
            raise
        return self.path / rel

    def append_metrics(self, rows: list[dict]) -> None:
        """Append rows to metrics.csv (a key it has no column for adds one) and flush them to disk;
        a failed write is undone."""
        if rows:
            self._columns = metrics_table.append(self.path / "metrics.csv", self._columns or self.metric_columns, rows)

    def drop_checkpoints_after(self, step: int) -> None:
        """Forget the checkpoints after `step` (a run continued from `step` writes them again)."""
        manifest = self._manifest()
        later = [s for s in manifest["checkpoints"] if int(s) > step]
        if not later:
            return
        for s in later:
            del manifest["checkpoints"][s]
        atomic_write(self.path / "manifest.json", json.dumps(manifest, indent=1).encode())
        for s in later:
            (self.path / f"checkpoints/step_{int(s):06d}.safetensors").unlink(missing_ok=True)

    def truncate_metrics(self, step: int) -> None:
        """Keep only complete rows up to `step` (used on resume)."""
        metrics_table.truncate(self.path / "metrics.csv", step)

    def save_resume_state(self, step: int, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
        data = save(_unshared({k: v.detach().cpu().contiguous() for k, v in tensors.items()}),
                    metadata={"step": str(step), **meta})
        atomic_write(self.path / "resume.safetensors", data)

    def keep_state(self, step: int) -> None:
        """Keep a copy of the resume state just written (of `step`) as `states/step_SSSSSS.safetensors`,
        a point a branch may start from (`train.keep_states`)."""
        data = (self.path / "resume.safetensors").read_bytes()
        (self.path / "states").mkdir(exist_ok=True)
        atomic_write(self.path / "states" / f"step_{step:06d}.safetensors", data)

    @property
    def kept_states(self) -> list[int]:
        """Steps whose whole training state is kept (weights, Adam, data generator), ascending."""
        return sorted(int(f.stem.split("_")[1]) for f in (self.path / "states").glob("step_*.safetensors"))

    def load_state(self, step: int) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The kept training state of `step` (tensors and metadata, the layout of `mechlrmc.resume`)."""
        file = self.path / "states" / f"step_{step:06d}.safetensors"
        if not file.is_file():
            raise CheckpointError(f"{self.path} keeps no training state at step {step}: allowed "
                                  f"{self.kept_states or 'none (train.keep_states was empty)'}")
        return _read_state(file)

    def save_stopped(self, step: int, reason: str) -> None:
        """Mark the run finished at `step` before `train.steps` (`stopped.json`)."""
        atomic_write(self.path / "stopped.json", json.dumps({"step": step, "reason": reason}).encode())

    @property
    def stopped(self) -> dict | None:
        """{"step", "reason"} where training stopped early (`train.stop_below`), else None."""
        file = self.path / "stopped.json"
        return json.loads(file.read_text()) if file.is_file() else None

    @property
    def finished(self) -> bool:
        """Trained to its last step, or stopped early at its drop."""
        steps = self.steps
        return self.stopped is not None or bool(steps) and steps[-1] >= self.config.train.steps

    @property
    def has_resume_state(self) -> bool:
        return (self.path / "resume.safetensors").is_file()

    def load_resume_state(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        file = self.path / "resume.safetensors"
        if not file.is_file():
            raise CheckpointError(f"{file} is missing: this run cannot be resumed")
        return _read_state(file)

    def _load_recorded(self, step: int, device, dtype, model_class) -> torch.nn.Module:
        from mechlrmc.factory import FactoryError, build_model, check_fits

        record = self.config.record
        factory = model_class or record.model_factory
        if not factory:
            raise FactoryError(f"{self.path} was recorded without a model_factory: pass the model class, "
                               f"run.load_model(step, model_class=MyModel)")
        model = build_model(factory, record.factory_kwargs, record.workdir or None)
        state = self.state_dict(step)
        check_fits(model, state, f"checkpoint {self.checkpoint_path(step)}")
        model.load_state_dict(state)
        return model.to(device=device, dtype=dtype).eval()

    def skeleton(self) -> torch.nn.Module:
        """The run's model with no checkpoint loaded (its structure: `mechlrmc.anatomy` derives where
        its parts are from it without reading weights)."""
        if self.config.recorded:
            from mechlrmc.factory import build_model

            record = self.config.record
            if not record.model_factory:
                from mechlrmc.factory import FactoryError

                raise FactoryError(f"{self.path} was recorded without a model_factory: its model cannot be rebuilt")
            return build_model(record.model_factory, record.factory_kwargs, record.workdir or None).eval()
        from mechlrmc.model import HookedEncoder

        return HookedEncoder(self.config, seed=None).eval()

    def save_batch(self, inputs: torch.Tensor, targets: torch.Tensor, loss: str) -> None:
        """Keep one batch of a recorded loop's data (`mechlrmc.record.Recorder.record_batch`)."""
        data = save({"inputs": inputs.detach().cpu().contiguous(), "targets": targets.detach().cpu().contiguous()},
                    metadata={"loss": loss})
        atomic_write(self.path / "batch.safetensors", data)

    def recorded_batch(self):
        """The batch a recorded loop kept (`mechlrmc.tasks.loop.LoopBatch`), or None."""
        file = self.path / "batch.safetensors"
        if not file.is_file():
            return None
        from mechlrmc.tasks.loop import LoopBatch

        tensors, meta = _read_state(file)
        return LoopBatch(tokens=tensors["inputs"], targets=tensors["targets"], loss=meta["loss"])

    @property
    def sites(self):
        """Where the measures read this run's model (`mechlrmc.sites.Sites`): the recorded sites, or
        None for a run of mechlrmc's own model (its model declares them)."""
        from mechlrmc.sites import Sites

        return Sites.from_dict(self.config.record.sites) if self.config.recorded else None

    # ----- reading (used by analyses) -----
    @property
    def steps(self) -> list[int]:
        """Steps that have a checkpoint, ascending."""
        return sorted(int(s) for s in self._manifest()["checkpoints"])

    @property
    def metrics(self) -> pd.DataFrame:
        """The metrics table, one row per logged step (eval columns are NaN between evaluations).

        Only complete rows: a row the writer is appending at this moment is left out."""
        return metrics_table.read(self.path / "metrics.csv")

    @property
    def evals(self) -> pd.DataFrame:
        """The rows of `metrics` that have an evaluation (`eval_loss` not NaN), index reset.

        The trainer writes every eval column of an evaluation together; a run imported from the
        reference implementation has `eval_loss` only (its other eval columns are NaN)."""
        return self.config.task.evaluations(self.metrics)

    def nearest_step(self, step: int) -> int:
        """The checkpointed step closest to `step`."""
        steps = self.steps
        if not steps:
            raise CheckpointError(f"{self.path} has no checkpoints")
        if not steps[0] <= step <= steps[-1]:
            raise CheckpointError(f"step {step} is outside {self.path}'s checkpoints: allowed {steps[0]}..{steps[-1]}")
        return min(steps, key=lambda s: (abs(s - step), s))

    def checkpoint_path(self, step: int) -> Path:
        entry = self._manifest()["checkpoints"].get(str(step))
        if entry is None:
            raise CheckpointError(f"{self.path} has no checkpoint at step {step}: available {self.steps}")
        return self.path / entry["file"]

    def checkpoint_sha256(self, step: int) -> str:
        """The SHA-256 the manifest records for the checkpoint of `step` (what its weights are)."""
        entry = self._manifest()["checkpoints"].get(str(step))
        if entry is None:
            raise CheckpointError(f"{self.path} has no checkpoint at step {step}: available {self.steps}")
        return entry["sha256"]

    def verify(self, step: int) -> bytes:
        """The checkpoint's bytes after checking they exist, are complete and match their hash."""
        entry = self._manifest()["checkpoints"].get(str(step))
        if entry is None:
            raise CheckpointError(f"{self.path} has no checkpoint at step {step}: available {self.steps}")
        file = self.path / entry["file"]
        if not file.is_file():
            raise CheckpointError(f"checkpoint file {file} for step {step} is missing")
        data = file.read_bytes()
        if len(data) != entry["bytes"]:
            raise CheckpointError(
                f"checkpoint file {file} is truncated or padded: {len(data)} bytes, manifest says {entry['bytes']}"
            )
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise CheckpointError(f"checkpoint file {file} does not match its SHA-256 in manifest.json: it was modified")
        return data

    def state_dict(self, step: int) -> dict[str, torch.Tensor]:
        """The verified weights of `step`, as stored (float16 in the shipped reference run)."""
        from safetensors.torch import load

        return load(self.verify(step))

    def load_model(self, step: int, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                   model_class: Any = None):
        """The model at `step`, in eval mode, on `device`. A recorded run's model is rebuilt by its
        `record.model_factory` with its `factory_kwargs` (or by `model_class(**factory_kwargs)`,
        for a run recorded without a factory)."""
        from mechlrmc.model import model_from_state

        if self.config.recorded:
            return self._load_recorded(step, device, dtype, model_class)

        try:
            return model_from_state(self.config, self.state_dict(step), device, dtype)
        except ValueError as e:  # the keys do not fit the config
            raise CheckpointError(
                f"checkpoint {self.checkpoint_path(step)} does not fit the run's config: {e}") from None

