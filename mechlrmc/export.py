"""Copy a run with its checkpoints in another dtype (e.g. float16, to ship it small).

It reads a run (`runs`) and evaluates it on the run's evaluation batch (its task's), so it sits above
both; `runs` itself knows nothing of training or evaluation.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mechlrmc.runs import Run, RunLock, atomic_write


def export_run(
    source: Run, dest: str | Path, dtype: torch.dtype = torch.float16, atol: float = 1e-3, until: int | None = None
) -> Run:
    """Copy a run with its checkpoints stored in `dtype` (e.g. float16 to ship it small).

    The config, metrics and float32 resume state are copied unchanged; `until` keeps only steps up
    to that one (and then the resume state only if it is not later). A checkpoint is stored in
    `dtype` only where, on the run's evaluation batch, its outputs stay within `atol` of the
    original's; otherwise it keeps its original precision (`Run.state_dict` shows which).
    """
    last = source.steps[-1] if until is None else until
    config = source.config
    if last < config.train.steps:
        config = config.override([f"train.steps={last}"])
    steps = [s for s in source.steps if s <= last]
    for step in steps:  # a damaged source fails here, before anything is written
        source.verify(step)
    Run.check_new(dest)
    with RunLock(dest):
        out = Run.create(Path(dest), config)
        atomic_write(out.path / "metrics.csv", (source.path / "metrics.csv").read_bytes())
        out.truncate_metrics(last)
        if (source.path / "provenance.json").is_file():
            atomic_write(out.path / "provenance.json", (source.path / "provenance.json").read_bytes())
        resume = source.path / "resume.safetensors"
        if resume.is_file() and int(source.load_resume_state()[1]["step"]) <= last:
            atomic_write(out.path / "resume.safetensors", resume.read_bytes())
        tokens = source.config.task.eval_batch(source.config, size=256).tokens
        for step in steps:
            state = source.state_dict(step)
            out.save_checkpoint(step, state, dtype=dtype)
            with torch.no_grad():
                diff = (source.load_model(step)(tokens) - out.load_model(step)(tokens)).abs().max().item()
            if diff > atol:
                out.save_checkpoint(step, state)
    return out
