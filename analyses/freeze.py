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
from mechlrmc.train import Trainer

DEFAULT_STEPS = 1500  # cpu preset: ~2 min per run on one thread, the 5-run sweep ~10 min


class FreezeTrainer(Trainer):
    """A `Trainer` whose model starts from `start_state` and whose optimizer holds only `trainable`."""

    def __init__(self, cfg: RunConfig, out: str | Path, start_state: dict[str, torch.Tensor],
                 trainable: Iterable[str], progress: bool = True):
        super().__init__(cfg, out, resume=False, progress=progress)  # holds the run's writer lock
        trainable = set(trainable)
        names = dict(self.model.named_parameters())
        unknown = trainable - set(names)
        if unknown or not trainable:
            self.close()
            raise OptionError(f"trainable parameters {sorted(unknown) or '(none)'} are not in the model: "
                             f"allowed {sorted(names)}")
        self.model.load_state_dict({k: v.to(torch.float32) for k, v in start_state.items()})
        for name, p in names.items():
            p.requires_grad_(name in trainable)
        self.optimizer = torch.optim.Adam([p for n, p in names.items() if n in trainable], lr=cfg.train.lr)


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
    cfg = run.config.override([f"train.steps={steps}", *overrides])
    trainer = FreezeTrainer(cfg, out, swap_state(init_state, ref_state, names, n_layers), trainable, progress)
    meta = {"source_run": str(run.path), "components": names, "init_step": init_step,
            "reference_step": reference, "trainable": trainable}
    atomic_write(trainer.run.path / "freeze.json", json.dumps(meta, indent=1).encode())
    return trainer.train()


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
    """`freeze_train` for each component set into `out_dir/<set>`, reusing finished runs; returns
    the evaluation curves (step, eval losses, wall_time, `components`, `drop_step`)."""
    frames = []
    plateau = run.config.data.plateau_mask_loss
    for comps in sets:
        out = Path(out_dir) / comps.replace("~", "not_").replace(",", "+")
        done = (out / "config.yaml").is_file() and Run(out).steps and Run(out).steps[-1] == steps
        sub = Run(out) if done else freeze_train(run, comps, out, init, reference, steps, progress=progress)
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
