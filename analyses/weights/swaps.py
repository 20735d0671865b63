"""Component swaps between two checkpoints (finding 9, docs/FINDINGS.md).

`swapped_model(run, a, b, components)` is the model of checkpoint `b` whose chosen components
(`mechlrmc.components` names, as the model's anatomy groups them) come from checkpoint `a`, for any
model. `swap_grid` measures the task's losses (LRMC: L, L_obs and L_mask) for a list of component sets in both directions (pre-drop parts in the post-drop model and the
reverse): which parts carry the completion ability, and which are already good before the drop.
"""

from __future__ import annotations

from typing import Iterable

import pandas as pd
import torch
from tqdm.auto import tqdm

from analyses.base.walk import analysis_batch
from mechlrmc.anatomy import Anatomy
from mechlrmc.components import SWAP_SET, component_params
from mechlrmc.errors import OptionError
from mechlrmc.measures import logits_of
from mechlrmc.runs import Run
from mechlrmc.tasks import get_task
from mechlrmc.tasks.lrmc import evaluate


def swap_state(
    state_a: dict[str, torch.Tensor], state_b: dict[str, torch.Tensor], components: str | Iterable[str], n_layers: int
) -> dict[str, torch.Tensor]:
    """State dict B with the parameters of `components` taken from A."""
    if set(state_a) != set(state_b):
        raise OptionError(f"the two state dicts have different keys: {sorted(set(state_a) ^ set(state_b))}")
    from_a = set(component_params(components, state_b, n_layers))
    return {k: (state_a[k] if k in from_a else state_b[k]) for k in state_b}


def swapped_model(run: Run, a: int, b: int, components: str | Iterable[str], device: str = "cpu",
                  anatomy: Anatomy | None = None) -> torch.nn.Module:
    """The model of checkpoint `b` with `components` from checkpoint `a` (eval mode)."""
    model = run.skeleton().to(device)
    anatomy = Anatomy.of(model, run.sites) if anatomy is None else anatomy
    state_a, state_b = run.state_dict(a), run.state_dict(b)
    from_a = set(anatomy.params(components, state_b))
    model.load_state_dict({k: (state_a[k] if k in from_a else v) for k, v in state_b.items()})
    return model


def swap_components(anatomy: Anatomy) -> tuple[str, ...]:
    """The component sets swapped by default: finding 9's (`SWAP_SET`) on mechlrmc's model, else the
    groups the model's anatomy has (embeddings, attention, MLP, ... and all but attention)."""
    if anatomy.source == "mechlrmc":
        return SWAP_SET
    kinds = dict.fromkeys(g.split(".")[0] for g in anatomy.groups)
    return (*kinds, *(("~attn",) if "attn" in kinds else ()), "all")


def _metrics(model: torch.nn.Module, batch) -> dict[str, float]:
    task = get_task(batch.task)
    if "matrix" in task.supports:
        return evaluate(model, batch)
    with torch.no_grad():
        return task.lens_losses(logits_of(model)(batch.tokens.to(next(model.parameters()).device)), batch)


def swap_grid(
    run: Run,
    pre: int,
    post: int,
    components: Iterable[str] | None = None,
    batch=None,
    device: str = "cpu",
    progress: bool = True,
    anatomy: Anatomy | None = None,
) -> pd.DataFrame:
    """The task's losses (LRMC: L, L_obs, L_mask, corr_mask) of every swap in both directions, one row
    per (direction, components). Components are named in the model's anatomy (`Anatomy.params`; default
    `swap_components`), so the swaps act on the parameters of any model.

    direction "pre->post": the post-drop model with `components` from the pre-drop checkpoint;
    "post->pre": the reverse. Rows with components "none" are the two unswapped baselines.
    """
    pre, post = run.nearest_step(pre), run.nearest_step(post)
    batch = analysis_batch(run) if batch is None else batch
    states = {pre: run.state_dict(pre), post: run.state_dict(post)}
    model = run.skeleton().to(device)
    anatomy = Anatomy.of(model, run.sites) if anatomy is None else anatomy
    components = swap_components(anatomy) if components is None else list(components)
    for comps in components:
        anatomy.params(comps, states[post])  # an unknown name: one line before any work
    rows = []
    jobs = [(d, c) for d in ("pre->post", "post->pre") for c in ("none", *components)]
    for direction, comps in tqdm(jobs, desc="swaps", disable=not progress):
        src, dst = (pre, post) if direction == "pre->post" else (post, pre)
        from_src = set() if comps == "none" else set(anatomy.params(comps, states[dst]))
        model.load_state_dict({k: (states[src][k] if k in from_src else v) for k, v in states[dst].items()})
        rows.append({"direction": direction, "components": comps, "from_step": src, "into_step": dst,
                     "n_params_swapped": len(from_src), **_metrics(model.eval(), batch)})
    return pd.DataFrame(rows)
