"""What the analyses of one run share: the run, its phases and key checkpoints, the analysis batch,
the loaded models, the head taxonomy and a sequence run's greedy generations, each computed once on
first use.

`Context(run)` is what every registered analysis (`analyses.base.registry`) takes, from the report, from
`mechlrmc analyze NAME RUN` and from a notebook alike. `ctx.model(step)` loads a checkpoint once
and keeps it (up to `model_cache_bytes`); `ctx.walk(fn)` maps an analysis over the chosen steps
with those models; `ctx.taxonomy` is the head taxonomy at every step any section asks for;
`ctx.native(step, size)` is a sequence run's native measures at a checkpoint, the one greedy generation
that the plateau dynamics, the early warnings and the learning times all read.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from analyses.base.walk import Steps, across_checkpoints, analysis_batch, select_steps
from mechlrmc.runs import Run


@dataclass(frozen=True)
class Budget:
    """How much work each analysis does."""

    n_steps: int  # checkpoints walked by default, spread around the drop
    batch_size: int  # matrices per analysis batch
    n_matrices: int  # matrices per nuclear-norm comparison (per p_mask / OOD variant)
    patch_batch: int  # matrices in the patching sweeps
    quick: bool = False  # smaller samplers and solvers too (tests and smoke checks)


FULL = Budget(n_steps=7, batch_size=512, n_matrices=128, patch_batch=64)


QUICK = Budget(n_steps=4, batch_size=128, n_matrices=24, patch_batch=16, quick=True)


@dataclass
class Context:
    """One run and everything its analyses share (see the module docstring).

    `steps`: the checkpoints walked (None: `budget.n_steps` around the drop; or "all", a step,
    a list); `options`: analysis-specific settings (the CLI's extra flags, e.g. `views`)."""

    run: Run
    budget: Budget = FULL
    device: str = "cpu"
    progress: bool = True
    steps_asked: Steps = None
    options: dict[str, Any] = field(default_factory=dict)
    family: Path | None = None  # a shipped family summary this run's recipe belongs to
    interventions: Path | None = None  # a folder of intervention runs
    model_cache_bytes: int = 512 * 2**20

    def __post_init__(self) -> None:
        self._models: OrderedDict[int, Any] = OrderedDict()
        self._subjects: dict[int, Any] = {}
        self._native: dict[tuple[int, int], dict[str, pd.DataFrame]] = {}
        self._lock = threading.RLock()  # `subject` loads a model while it holds it

    @property
    def quick(self) -> bool:
        return self.budget.quick

    def option(self, name: str, default: Any = None) -> Any:
        value = self.options.get(name)
        return default if value is None else value

    @property
    def task(self):
        """The run's task (`mechlrmc.tasks`): what an analysis asks instead of sniffing."""
        return self.run.config.task

    @property
    def sites(self):
        """Where the run's model is read (`mechlrmc.sites.Sites`): a recorded run's sites, else None
        (mechlrmc's own model declares its own)."""
        return self.run.sites

    @cached_property
    def anatomy(self):
        """Where the run's model keeps its parts (`mechlrmc.anatomy.Anatomy`), derived from its structure
        (no checkpoint read) and the recorded sites: every lens reads the model through it."""
        from mechlrmc.anatomy import Anatomy

        return Anatomy.of(self.run.skeleton(), self.sites)

    def subject(self, step: int):
        """The model at `step` as the activation lenses run it (`Anatomy.subject`: a bridged copy of a
        Hugging Face model, kept once per step; else the model itself)."""
        if not self.anatomy.bridged:
            return self.model(step)
        with self._lock:
            if step not in self._subjects:
                if len(self._subjects) >= 2:
                    self._subjects.pop(next(iter(self._subjects)))
                self._subjects[step] = self.anatomy.subject(self.model(step))
            return self._subjects[step]

    def native(self, step: int, size: int) -> dict[str, pd.DataFrame]:
        """`analyses.plateau.sequences.native_measures` of the model at `step` on the first `size`
        sequences of the batch (a sequence task's run), computed once: greedy generation at every
        checkpoint is most of the cost of the sections that read it (plateau dynamics, early
        warnings, learning times). Do not modify the tables in place."""
        from analyses.plateau.sequences import native_measures

        with self._lock:
            if (step, size) in self._native:
                return self._native[step, size]
        tables = native_measures(self.model(step), self.batch[:size], self.sites)
        with self._lock:
            return self._native.setdefault((step, size), tables)

    @cached_property
    def phases(self) -> pd.Series:
        from analyses.plateau.phases import detect_phases

        return detect_phases(self.run).iloc[0]

    @cached_property
    def key(self) -> dict[str, int]:
        """`analyses.plateau.phases.key_checkpoints`: plateau, drop (or start) and end."""
        from analyses.plateau.phases import key_checkpoints

        return key_checkpoints(self.run, self.phases)

    @cached_property
    def steps(self) -> list[int]:
        """The checkpoints walked: the asked ones, else `budget.n_steps` around the drop."""
        if self.steps_asked is None:
            return select_steps(self.run, "around_drop", n_around=self.budget.n_steps)
        return select_steps(self.run, self.steps_asked)

    @property
    def every_step(self) -> list[int]:
        """Every checkpoint, unless steps were asked for (then those)."""
        return self.run.steps if self.steps_asked is None else self.steps

    @property
    def final(self) -> int:
        return self.run.steps[-1]

    @cached_property
    def batch(self):
        return analysis_batch(self.run, self.option("batch_size", self.budget.batch_size))

    def model(self, step: int):
        """The model at `step`, loaded once (eval mode; do not modify it in place)."""
        with self._lock:
            if step in self._models:
                self._models.move_to_end(step)
                return self._models[step]
        model = self.run.load_model(step, device=self.device)
        size = sum(p.numel() * p.element_size() for p in model.parameters())
        with self._lock:
            self._models[step] = model
            while len(self._models) > 1 and size * len(self._models) > self.model_cache_bytes:
                self._models.popitem(last=False)
        return model

    def walk(self, fn: Callable, steps: Steps = None, batch=None, anatomy: bool = False, **kwargs) -> pd.DataFrame:
        """`fn(model, batch, **kwargs)` at `steps` (default `self.steps`) with the shared models;
        `anatomy=True`: `fn(subject, batch, anatomy=ctx.anatomy, **kwargs)` (an activation lens)."""
        if anatomy:
            kwargs["anatomy"] = self.anatomy
        return across_checkpoints(self.run, fn, steps=self.steps if steps is None else steps,
                                  batch=self.batch if batch is None else batch, device=self.device,
                                  progress=self.progress, load=self.subject if anatomy else self.model, **kwargs)

    @cached_property
    def taxonomy(self) -> pd.DataFrame:
        """The heads' labels at every checkpoint (or the asked ones) and the key checkpoints:
        LRMC's `head_taxonomy` (row, column, self, observed-only); on a sequence task each head's
        share of attention on the task's optimal map (`sequences.head_map_share`, "map 0.72")."""
        from analyses.attention.heads import head_map_share, head_taxonomy

        steps = sorted({*self.every_step, *self.key.values()})
        if "matrix" in self.task.supports:
            return self.walk(head_taxonomy, steps=steps, anatomy=True)
        return self.walk(head_map_share, steps=steps, anatomy=True).assign(queries="all")
