"""Component swaps between two checkpoints (finding 9, docs/FINDINGS.md).

`swapped_model(run, a, b, components)` is the model of checkpoint `b` whose chosen components
(`mechlrmc.components` names) come from checkpoint `a`. `swap_grid` measures L, L_obs and L_mask
for a list of component sets in both directions (pre-drop parts in the post-drop model and the
reverse): which parts carry the completion ability, and which are already good before the drop.
"""

from __future__ import annotations

from typing import Iterable

import pandas as pd
import torch
from tqdm.auto import tqdm

from analyses.base.walk import analysis_batch
from mechlrmc.components import SWAP_SET, component_params
from mechlrmc.errors import OptionError
from mechlrmc.model import HookedEncoder, model_from_state
from mechlrmc.runs import Run
from mechlrmc.tasks.lrmc import Batch, evaluate


def swap_state(
    state_a: dict[str, torch.Tensor], state_b: dict[str, torch.Tensor], components: str | Iterable[str], n_layers: int
) -> dict[str, torch.Tensor]:
    """State dict B with the parameters of `components` taken from A."""
    if set(state_a) != set(state_b):
        raise OptionError(f"the two state dicts have different keys: {sorted(set(state_a) ^ set(state_b))}")
    from_a = set(component_params(components, state_b, n_layers))
    return {k: (state_a[k] if k in from_a else state_b[k]) for k in state_b}


def swapped_model(run: Run, a: int, b: int, components: str | Iterable[str], device: str = "cpu") -> HookedEncoder:
    """The model of checkpoint `b` with `components` from checkpoint `a` (eval mode)."""
    state = swap_state(run.state_dict(a), run.state_dict(b), components, run.config.model.n_layers)
    return model_from_state(run.config, state, device)


def swap_grid(
    run: Run,
    pre: int,
    post: int,
    components: Iterable[str] = SWAP_SET,
    batch: Batch | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> pd.DataFrame:
    """L, L_obs, L_mask, corr_mask of every swap in both directions, one row per (direction, components).

    direction "pre->post": the post-drop model with `components` from the pre-drop checkpoint;
    "post->pre": the reverse. Rows with components "none" are the two unswapped baselines.
    """
    pre, post = run.nearest_step(pre), run.nearest_step(post)
    batch = analysis_batch(run) if batch is None else batch
    states = {pre: run.state_dict(pre), post: run.state_dict(post)}
    n_layers = run.config.model.n_layers
    rows = []
    jobs = [(d, c) for d in ("pre->post", "post->pre") for c in ("none", *components)]
    for direction, comps in tqdm(jobs, desc="swaps", disable=not progress):
        src, dst = (pre, post) if direction == "pre->post" else (post, pre)
        state = states[dst] if comps == "none" else swap_state(states[src], states[dst], comps, n_layers)
        metrics = evaluate(model_from_state(run.config, state, device), batch)
        n_swapped = 0 if comps == "none" else len(component_params(comps, state, n_layers))
        rows.append({"direction": direction, "components": comps, "from_step": src, "into_step": dst,
                     "n_params_swapped": n_swapped, **metrics})
    return pd.DataFrame(rows)
