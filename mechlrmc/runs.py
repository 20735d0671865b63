"""The run directory: config, metrics table, checkpoints named by step, and resume state.

    RUN/config.yaml            the RunConfig
    RUN/metrics.csv            one row per logged step (see METRIC_COLUMNS)
    RUN/manifest.json          every checkpoint's file, size and SHA-256
    RUN/checkpoints/step_000500.safetensors   model weights at step 500
    RUN/resume.safetensors     weights, optimizer and RNG state at the latest checkpoint

Every file is written to a temporary name, flushed to disk and renamed, so a killed process leaves
either the old file or the new one, never half of one. Weights are safetensors (no pickle);
`Run.load_model` checks size and hash first, so a truncated or tampered file is an error that
names the file rather than a silently different model.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file, save

from mechlrmc.config import RunConfig

METRIC_COLUMNS = (
    "step", "loss", "loss_obs", "loss_mask",
    "eval_loss", "eval_loss_obs", "eval_loss_mask", "eval_corr_mask", "wall_time",
)
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint or run directory is missing, truncated, tampered with or inconsistent."""


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers only ever see the old or the complete new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _format(value: float | int | None) -> str:
    if value is None or value != value:  # None or NaN
        return ""
    return repr(int(value)) if isinstance(value, int) else repr(float(value))


class Run:
    """A training run on disk. `Run(path).load_model(step)` is how analyses get a model."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not (self.path / "config.yaml").is_file():
            raise CheckpointError(f"{self.path} is not a run directory: it has no config.yaml")
        self.config = RunConfig.from_yaml(self.path / "config.yaml")

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}, steps={self.steps})"

    # ----- creation and writing (used by the trainer) -----
    @classmethod
    def create(cls, path: str | Path, config: RunConfig) -> Run:
        path = Path(path)
        if path.exists() and any(path.iterdir()):
            raise FileExistsError(f"{path} exists and is not empty: pass --resume or another --out")
        path.mkdir(parents=True, exist_ok=True)
        atomic_write(path / "config.yaml", config.to_yaml().encode())
        atomic_write(path / "metrics.csv", (",".join(METRIC_COLUMNS) + "\n").encode())
        atomic_write(path / "manifest.json", json.dumps({"format": FORMAT_VERSION, "checkpoints": {}}).encode())
        return cls(path)

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
        tensors = {k: (v.to(dtype) if dtype else v).detach().cpu().contiguous() for k, v in state_dict.items()}
        data = save(tensors, metadata={"step": str(step), "format": str(FORMAT_VERSION)})
        rel = f"checkpoints/step_{step:06d}.safetensors"
        atomic_write(self.path / rel, data)
        manifest = self._manifest()
        manifest["checkpoints"][str(step)] = {
            "file": rel, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
        }
        atomic_write(self.path / "manifest.json", json.dumps(manifest, indent=1).encode())
        return self.path / rel

    def append_metrics(self, rows: list[dict]) -> None:
        """Append rows to metrics.csv and flush them to disk."""
        if not rows:
            return
        text = "".join(",".join(_format(r.get(c)) for c in METRIC_COLUMNS) + "\n" for r in rows)
        with open(self.path / "metrics.csv", "a") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    def truncate_metrics(self, step: int) -> None:
        """Keep only complete rows up to `step` (used on resume)."""
        lines = (self.path / "metrics.csv").read_text().split("\n")
        header, body = lines[0], lines[1:-1]  # the piece after the last newline may be half a row
        keep = [line for line in body if line and int(line.split(",", 1)[0]) <= step]
        atomic_write(self.path / "metrics.csv", ("\n".join([header, *keep]) + "\n").encode())

    def save_resume_state(self, step: int, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
        data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                    metadata={"step": str(step), **meta})
        atomic_write(self.path / "resume.safetensors", data)

    def load_resume_state(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        file = self.path / "resume.safetensors"
        if not file.is_file():
            raise CheckpointError(f"{file} is missing: this run cannot be resumed")
        from safetensors import safe_open

        with safe_open(str(file), "pt") as f:
            meta = f.metadata()
        return load_file(str(file)), meta

    # ----- reading (used by analyses) -----
    @property
    def steps(self) -> list[int]:
        """Steps that have a checkpoint, ascending."""
        return sorted(int(s) for s in self._manifest()["checkpoints"])

    @property
    def metrics(self) -> pd.DataFrame:
        """The metrics table, one row per logged step (eval columns are NaN between evaluations)."""
        return pd.read_csv(self.path / "metrics.csv")

    def nearest_step(self, step: int) -> int:
        """The checkpointed step closest to `step`."""
        steps = self.steps
        if not steps:
            raise CheckpointError(f"{self.path} has no checkpoints")
        return min(steps, key=lambda s: (abs(s - step), s))

    def checkpoint_path(self, step: int) -> Path:
        entry = self._manifest()["checkpoints"].get(str(step))
        if entry is None:
            raise CheckpointError(f"{self.path} has no checkpoint at step {step}: available {self.steps}")
        return self.path / entry["file"]

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

    def load_model(self, step: int, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        """The model at `step`, in eval mode, on `device`."""
        from mechlrmc.model import HookedEncoder

        model = HookedEncoder(self.config, seed=None)
        state = {k: v.to(dtype) for k, v in self.state_dict(step).items()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise CheckpointError(
                f"checkpoint {self.checkpoint_path(step)} does not fit the run's config: "
                f"missing {missing}, unexpected {unexpected}"
            )
        model.cfg.device = str(device)
        return model.to(device).eval()


def export_run(
    source: Run, dest: str | Path, dtype: torch.dtype = torch.float16, atol: float = 1e-3, until: int | None = None
) -> Run:
    """Copy a run with its checkpoints stored in `dtype` (e.g. float16 to ship it small).

    The config, metrics and float32 resume state are copied unchanged; `until` keeps only steps up
    to that one (and then the resume state only if it is not later). A checkpoint is stored in
    `dtype` only where, on the run's evaluation batch, its outputs stay within `atol` of the
    original's; otherwise it keeps its original precision (`Run.state_dict` shows which).
    """
    from mechlrmc.train import eval_batch

    last = source.steps[-1] if until is None else until
    config = source.config
    if last < config.train.steps:
        config = config.override([f"train.steps={last}"])
    out = Run.create(Path(dest), config)
    atomic_write(out.path / "metrics.csv", (source.path / "metrics.csv").read_bytes())
    out.truncate_metrics(last)
    resume = source.path / "resume.safetensors"
    if resume.is_file() and int(source.load_resume_state()[1]["step"]) <= last:
        atomic_write(out.path / "resume.safetensors", resume.read_bytes())
    tokens = eval_batch(source.config, size=256).tokens
    for step in [s for s in source.steps if s <= last]:
        state = source.state_dict(step)
        out.save_checkpoint(step, state, dtype=dtype)
        with torch.no_grad():
            diff = (source.load_model(step)(tokens) - out.load_model(step)(tokens)).abs().max().item()
        if diff > atol:
            out.save_checkpoint(step, state)
    return out
