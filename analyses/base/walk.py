"""Walking a run: map an analysis over a run's checkpoints into one tidy table.

An analysis is a function `fn(model, batch, **kwargs) -> DataFrame`. `across_checkpoints` loads
each chosen checkpoint, calls `fn` on the same evaluation batch (drawn from a fixed seed, so every
checkpoint sees the same matrices), and concatenates the results with a `step` column first.
"""

from __future__ import annotations

from typing import Callable, Iterable

import pandas as pd
import torch
from tqdm.auto import tqdm

from mechlrmc.errors import OptionError
from mechlrmc.runs import Run
from mechlrmc.tasks import get_task
from mechlrmc.tasks.lrmc import Batch

ANALYSIS_SEED = 2024  # evaluation batches of the analyses; distinct from the run's own eval batch


Steps = str | int | Iterable[int] | None


def analysis_batch(run: Run, size: int = 512, seed: int = ANALYSIS_SEED, data_cfg=None) -> Batch:
    """A batch of the run's task drawn from a fixed seed: the same data whatever checkpoint looks at
    it; for a recorded loop without a task, the batch it recorded (its first `size` examples)."""
    cfg = data_cfg or run.config.data
    task = get_task(cfg.task)
    if not task.has_data:
        batch = run.recorded_batch()
        if batch is None:
            raise OptionError(f"{run.path} recorded no batch of its data: allowed a run whose loop called "
                              f"Recorder.record_batch(inputs, targets), or one recorded with a task")
        return batch[:size]
    return task.sample(cfg, size, torch.Generator().manual_seed(seed))


def select_steps(run: Run, steps: Steps = None, n_around: int = 7) -> list[int]:
    """Resolve a step selection to checkpointed steps.

    - None or "all": every checkpoint;
    - "around_drop": `n_around` checkpoints spread over plateau, drop and completion phases;
    - an int or a list of ints: the nearest checkpoint of each, without duplicates.
    """
    available = run.steps
    if steps is None or steps == "all":
        return available
    if steps == "around_drop":
        from analyses.plateau.phases import steps_around_drop

        return steps_around_drop(run, n_around)
    if isinstance(steps, str):
        raise OptionError(f"steps={steps!r} is invalid: allowed 'all', 'around_drop', an int or a list of ints")
    if isinstance(steps, int):
        steps = [steps]
    return sorted({run.nearest_step(int(s)) for s in steps})


def across_checkpoints(
    run: Run,
    fn: Callable[..., pd.DataFrame],
    steps: Steps = None,
    batch: Batch | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    load: Callable[[int], torch.nn.Module] | None = None,
    **kwargs,
) -> pd.DataFrame:
    """`fn(model, batch, **kwargs)` at every selected checkpoint, concatenated with a `step` column.

    `batch=None` uses `analysis_batch(run)`; pass `batch=False` for analyses that take no batch
    (e.g. weight-only embedding analyses), which are then called as `fn(model, **kwargs)`.
    `load(step) -> model` replaces `run.load_model` (e.g. a context that keeps loaded models).
    """
    chosen = select_steps(run, steps)
    if batch is None:
        batch = analysis_batch(run)
    frames = []
    for step in tqdm(chosen, desc=getattr(fn, "__name__", "analysis"), unit="ckpt", disable=not progress):
        model = run.load_model(step, device=device) if load is None else load(step)
        frame = fn(model, **kwargs) if batch is False else fn(model, batch.to(device), **kwargs)
        frames.append(frame.assign(step=step))
    out = pd.concat(frames, ignore_index=True)
    return out[["step", *[c for c in out.columns if c != "step"]]]
