"""Component-wise training (PAPER.md finding 10): train only some components, the rest frozen.

`freeze_train(run, "pos_embed", out)` starts from the run's reference checkpoint (its last, by
default), resets the chosen components to their initial values (the step-0 checkpoint) or to any
checkpoint, and trains only them with the run's own recipe, writing a normal run directory (plus
`freeze.json` recording what was trained). Frozen parameters have `requires_grad=False` and are not
in the optimizer, so they stay bitwise equal to the reference. `freeze_sweep` runs the paper's set
(token embedding, position embedding, attention, MLP, all) and `plot_freeze` draws the curves.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Iterable

import pandas as pd
import plotly.graph_objects as go
import torch

from analyses.components import FREEZE_SET, component_params, parse_spec
from analyses.swaps import swap_state
from mechlrmc.config import RunConfig
from mechlrmc.errors import OptionError
from mechlrmc.runs import Run, atomic_write
from mechlrmc.train import Trainer, make_optimizer

DEFAULT_STEPS = 1500  # cpu preset: ~2 min per run on one thread, the 5-run sweep ~10 min


class FreezeTrainer(Trainer):
    """A `Trainer` whose model starts from `start_state` and whose optimizer holds only `trainable`.

    With `resume=True` it continues its own run directory exactly, like any run: the resume state
    holds the whole model (frozen parts included) and Adam's state of the trained parameters."""

    def __init__(self, cfg: RunConfig, out: str | Path, start_state: dict[str, torch.Tensor],
                 trainable: Iterable[str], progress: bool = True, resume: bool = False):
        super().__init__(cfg, out, resume=resume, progress=progress)  # holds the run's writer lock
        trainable = set(trainable)
        names = dict(self.model.named_parameters())
        unknown = trainable - set(names)
        if unknown or not trainable:
            self.close()
            raise OptionError(f"trainable parameters {sorted(unknown) or '(none)'} are not in the model: "
                             f"allowed {sorted(names)}")
        if not self.resumed:  # a fresh run (also a --resume that found nothing to resume)
            self.model.load_state_dict({k: v.to(torch.float32) for k, v in start_state.items()})
        for name, p in names.items():
            p.requires_grad_(name in trainable)
        self.optimizer = make_optimizer([p for n, p in names.items() if n in trainable], cfg)
        if self.resumed:  # Trainer loaded Adam state into its own optimizer: load it into this one
            self._load_resume_state()


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
                   init: str | int = "init", reference: int | None = None, progress: bool = False) -> FreezeTrainer:
    """The `FreezeTrainer` of one component-wise run of the run at `source` (a trainer factory for
    `mechlrmc.sweep.launch`: bind everything after `resume` with `functools.partial`)."""
    start, trainable, meta = _plan(Run(source), components, init, reference)
    trainer = FreezeTrainer(cfg, out, start, trainable, progress=progress, resume=resume)
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


def drop_step(metrics: pd.DataFrame, plateau: float, fraction: float = 0.5) -> int | None:
    """First evaluated step whose eval L_mask is below `fraction` x the plateau level (None: never)."""
    evals = metrics.dropna(subset=["eval_loss_mask"])
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
    evaluation curves (step, eval losses, wall_time, `components`, `drop_step`)."""
    from mechlrmc.sweep import Trial, launch_runs

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
        evals = sub.metrics.dropna(subset=["eval_loss"])
        frames.append(evals.assign(components=comps, drop_step=drop_step(evals, plateau), run=str(sub.path)))
    return pd.concat(frames, ignore_index=True)


def plot_freeze(frame: pd.DataFrame, plateau: float | None = None, metric: str = "eval_loss_mask"):
    """One curve per trained component set (log y) with its drop step marked by a dotted line."""
    fig = go.Figure()
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#7f7f7f"]
    for i, (comps, part) in enumerate(frame.groupby("components", sort=False)):
        color = colors[i % len(colors)]
        fig.add_scatter(x=part.step, y=part[metric], mode="lines", name=comps, line=dict(color=color))
        drop = part.drop_step.iloc[0]
        if pd.notna(drop):
            fig.add_vline(x=drop, line=dict(color=color, dash="dot"))
    if plateau is not None:
        fig.add_scatter(x=[frame.step.min(), frame.step.max()], y=[plateau, plateau], mode="lines",
                        name="plateau r/9", line=dict(color="gray", dash="dash"))
    fig.update_yaxes(type="log", title=metric)
    fig.update_xaxes(title="step")
    return fig.update_layout(template="plotly_white", legend_title="trained",
                             title="Component-wise training, the rest frozen (PAPER.md finding 10)")
