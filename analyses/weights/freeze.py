"""Component-wise training (finding 10, docs/FINDINGS.md): train only some components, the rest frozen.

`freeze_train(run, "pos_embed", out)` starts from the run's reference checkpoint (its last, by
default), resets the chosen components to their initial values (the step-0 checkpoint) or to any
checkpoint, and trains only them with the run's own recipe, writing a normal run directory (plus
`freeze.json` recording what was trained). Frozen parameters have `requires_grad=False` and are not
in the optimizer, so they stay bitwise equal to the reference. `freeze_sweep` runs the paper's set
(token embedding, position embedding, attention, MLP, all) and `plot_freeze` draws the curves. A
component-wise run is an ordinary `Trainer` handed the start model and the trainable parameters.

Each curve's `half_plateau_step` is its first evaluation below half the plateau level: a simple
threshold crossing, not the steepest-descent `drop_step` of `analyses.plateau.phases.detect_phases`.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Iterable

import pandas as pd
import torch

from analyses.weights.swaps import swap_state
from mechlrmc.components import FREEZE_SET, component_params, parse_spec
from mechlrmc.config import RunConfig
from mechlrmc.errors import OptionError
from mechlrmc.model import HookedEncoder
from mechlrmc.runs import Run, atomic_write
from mechlrmc.train import Trainer

DEFAULT_STEPS = 1500  # training steps of each run (cpu preset)


def _plan(run: Run, components: str | Iterable[str], init: str | int, reference: int | None):
    """(start state, trainable parameter names, freeze.json metadata) of a component-wise run."""
    if init != "init" and not isinstance(init, int):
        raise OptionError(f"init={init!r} is invalid: allowed 'init' or a checkpoint step")
    reference = run.steps[-1] if reference is None else run.nearest_step(reference)
    init_step = run.steps[0] if init == "init" else run.nearest_step(init)
    if init == "init" and init_step != 0:
        raise OptionError(f"{run.path} has no step-0 checkpoint: pass init=<step> instead")
    ref_state, init_state = run.state_dict(reference), run.state_dict(init_step)
    n_layers = run.config.model.n_layers
    names = parse_spec(components)
    trainable = component_params(names, ref_state, n_layers)
    if not trainable:
        raise OptionError(f"components {names} select no parameters")
    meta = {"source_run": str(run.path), "components": names, "init_step": init_step,
            "reference_step": reference, "trainable": trainable}
    return swap_state(init_state, ref_state, names, n_layers), trainable, meta


def freeze_trainer(cfg: RunConfig, out: str | Path, resume: bool, *, source: str, components: str | Iterable[str],
                   init: str | int = "init", reference: int | None = None, progress: bool = False) -> Trainer:
    """The `Trainer` of one component-wise run of the run at `source`: its model starts from the
    planned state and only the chosen components are trainable (a trainer factory for
    `mechlrmc.sweep.launch`: bind everything after `resume` with `functools.partial`). With
    `resume=True` it continues its own run directory exactly, like any run: the resume state holds
    the whole model (frozen parts included) and Adam's state of the trained parameters."""
    start, trainable, meta = _plan(Run(source), components, init, reference)
    model = HookedEncoder(cfg, seed=None)
    model.load_state_dict({k: v.to(torch.float32) for k, v in start.items()})
    trainer = Trainer(cfg, out, model=model, trainable=trainable, resume=resume, progress=progress)
    if not trainer.resumed:
        atomic_write(trainer.run.path / "freeze.json", json.dumps(meta, indent=1).encode())
    return trainer


def freeze_train(
    run: Run,
    components: str | Iterable[str],
    out: str | Path,
    init: str | int = "init",
    reference: int | None = None,
    steps: int = DEFAULT_STEPS,
    overrides: Iterable[str] = (),
    progress: bool = True,
) -> Run:
    """Train only `components` of `run`'s model, the rest fixed at checkpoint `reference`.

    `init="init"` starts the trained components from the step-0 checkpoint (their initial values);
    an int starts them from that checkpoint. `overrides` are config assignments (`train.lr=1e-3`).
    """
    cfg = run.config.override([f"train.steps={steps}", *overrides])
    return freeze_trainer(cfg, out, False, source=str(run.path), components=components, init=init,
                          reference=reference, progress=progress).train()


def freeze_info(run: Run) -> dict | None:
    """The `freeze.json` of a component-wise run (None for an ordinary run)."""
    file = run.path / "freeze.json"
    return json.loads(file.read_text()) if file.is_file() else None


def half_plateau_step(evals: pd.DataFrame, plateau: float, fraction: float = 0.5) -> int | None:
    """First evaluated step whose eval L_mask is below `fraction` x the plateau level (None: never).

    `evals`: a run's `Run.evals` (or its whole metrics table: rows without an eval L_mask never count)."""
    below = evals[evals.eval_loss_mask < fraction * plateau]
    return int(below.step.iloc[0]) if len(below) else None


def freeze_sweep(
    run: Run,
    out_dir: str | Path,
    sets: Iterable[str] = FREEZE_SET,
    steps: int = DEFAULT_STEPS,
    init: str | int = "init",
    reference: int | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """One component-wise run per component set into `out_dir/<set>`, launched together on Ray
    Tune (`mechlrmc.sweep.launch`: finished runs reused, interrupted ones resumed); returns the
    evaluation curves (step, eval losses, wall_time, `components`, `half_plateau_step`)."""
    from mechlrmc.sweep import launch_runs
    from mechlrmc.trials import Trial

    sets = list(sets)
    threads = run.config.train.threads or 1
    cfg = run.config.override({"train.steps": steps, "train.threads": threads})
    source = str(Path(run.path).resolve())
    trials = [Trial(comps.replace("~", "not_").replace(",", "+"), cfg, {"components": comps},
                    factory=partial(freeze_trainer, source=source, components=comps, init=init, reference=reference))
              for comps in sets]
    runs = launch_runs(trials, out_dir, cpus_per_trial=threads, progress=progress)
    frames = []
    plateau = run.config.data.plateau_mask_loss
    for comps, trial in zip(sets, trials):
        sub = runs[trial.name]
        evals = sub.evals
        frames.append(evals.assign(components=comps, half_plateau_step=half_plateau_step(evals, plateau),
                                   run=str(sub.path)))
    return pd.concat(frames, ignore_index=True)
