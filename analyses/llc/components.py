"""The weight-restricted ("refined") LLC of a model's components: one head, an attention layer, an MLP, the embeddings.

SGLD samples only the component's weights and keeps every other weight at w* (Wang et al., "Differentiation
and specialization of attention heads via the refined local learning coefficient"): the LLC of the loss as
a function of those weights alone. A head is its slices of W_Q, W_K, W_V (and their biases) and of W_O
along the head axis (`mechlrmc.components.head_masks`, the same masks as devinterp 2.0.1's
`weight_restrictions.create_param_masks` gives for "l0h1"); devinterp's SGMCMC optimizer applies them (a
mask on the drift, the localization and the noise). Components are named as everywhere in the toolkit
(`mechlrmc.components`): "embeddings", "unembed", "attn.0", "mlp.0", "attn.0.1" (layer 0, head 1). Here it asks which components' complexity changes at the
drop (finding 1, docs/FINDINGS.md), per run and across a family. Another model's components are the
parameter groups of its anatomy (`mechlrmc.anatomy`: "attn.L", "mlp.L", "embeddings", ...).

All components of a model are sampled with one calibration of the whole model (`calibrate`), so their
LLCs use the same nbeta, step size and localization and can be compared with each other; the diagnostics
`diverged` and `flat` are measured per component.
"""

from __future__ import annotations

from typing import Callable, Iterable

import pandas as pd
import torch
from tqdm.auto import tqdm

from analyses.llc.calibrate import Calibration, calibrate
from analyses.llc.data import Data, Masks, mse_loss, sampled_dimension
from analyses.llc.estimator import estimate_with
from mechlrmc.anatomy import Anatomy
from mechlrmc.components import head_masks, model_component_params
from mechlrmc.errors import OptionError


def component_masks(model: torch.nn.Module, component: str | Masks) -> Masks:
    """The masks of one component, named in the one component vocabulary (`mechlrmc.components`):
    "embeddings", "unembed", "attn.L", "mlp.L", "attn.L.H" (one head), any other component spec
    ("qk.0", "~attn"), a parameter name, or a ready dict of masks."""
    if isinstance(component, dict):
        return component
    params = dict(model.named_parameters())
    if component in params:
        return {component: None}
    anatomy = Anatomy.of(model)
    if anatomy.source != "mechlrmc":  # another model: the parameter groups its anatomy derived
        return {name: None for name in anatomy.params(component, params)}
    head = head_masks(model, component)
    if head is not None:
        return head
    chosen = model_component_params(model, component)
    if not chosen:
        raise OptionError(f"component={component!r} is invalid: it selects no parameter of this model")
    return {name: None for name in chosen}


def model_components(model: torch.nn.Module, heads: bool = True) -> list[str]:
    """The components of a hooked transformer: embeddings, read-out, every layer's attention and MLP
    and (with `heads`) every head."""
    anatomy = Anatomy.of(model)
    if anatomy.source != "mechlrmc":  # another model: its anatomy's groups (no per-head parameter slices)
        return anatomy.component_names()
    cfg = model.cfg
    names = ["embeddings", "unembed"]
    for layer in range(cfg.n_layers):
        names += [f"attn.{layer}", f"mlp.{layer}"] + ([f"attn.{layer}.{h}" for h in range(cfg.n_heads)] if heads else [])
    return names


def component_llc(model: torch.nn.Module, data: Data, components: Iterable[str | Masks] | dict | None = None,
                  calibration: Calibration | None = None, loss_fn: Callable = mse_loss, progress: bool = False,
                  **calibrate_options) -> pd.DataFrame:
    """The refined LLC of every component, one row each: `component, llc, llc_std, dimension` (the
    sampled weights), the settings and `diverged, flat, stable, localization_ok, ok`. `components`:
    names (default `model_components(model)`), or a dict label -> masks. `calibration` (from
    `calibrate(model, data)`, e.g. of another checkpoint of the run) is reused; else the whole model
    is calibrated here with `calibrate_options`."""
    if components is None:
        components = model_components(model)
    labelled = components if isinstance(components, dict) else {c if isinstance(c, str) else f"component {i}": c
                                                                   for i, c in enumerate(components)}
    if calibration is None:
        calibration = calibrate(model, data, loss_fn, progress=progress, **calibrate_options)
    rows = []
    for label, component in tqdm(labelled.items(), desc="components", disable=not progress):
        masks = component_masks(model, component)
        chains = estimate_with(model, data, calibration.config, calibration.scales, loss_fn, masks,
                               calibration.diagnostics(), transform=calibration.transform(model, masks))
        rows.append(chains.drop(columns=["chain", "llc", "sampled_loss"]).iloc[0]
                    .rename({"llc_mean": "llc"}).to_dict() | {"component": label,
                                                              "dimension": sampled_dimension(model, masks)})
    frame = pd.DataFrame(rows)
    return frame[["component", "llc", "llc_std", "dimension", *[c for c in frame if c not in
                                                               ("component", "llc", "llc_std", "dimension")]]]


def component_changes(per_run: pd.DataFrame) -> pd.DataFrame:
    """Which components' refined LLC changes at the drop, over a family: `per_run` holds
    `run_component_llc` rows with a `run` column. Per component: in how many runs the LLC at the
    drop and at the end is above (`rises`) or below (`falls`) its plateau value by more than twice
    the chains' combined standard deviation, the median ratio end / plateau, and in how many runs
    all three checkpoints' diagnostics pass (`ok`)."""
    rows = []
    for component, part in per_run.groupby("component", sort=False):
        wide = part.pivot_table(index="run", columns="moment", values=["llc", "llc_std"], aggfunc="first")
        ok = part.groupby("run").ok.all()
        record = {"component": component, "runs": len(wide), "ok": f"{int(ok.sum())} of {len(ok)}"}
        for moment in ("drop", "end"):
            if ("llc", moment) not in wide or ("llc", "plateau") not in wide:
                continue
            change = wide["llc"][moment] - wide["llc"]["plateau"]
            noise = 2 * (wide["llc_std"][moment].fillna(0) + wide["llc_std"]["plateau"].fillna(0))
            record[f"rises_{moment}"] = f"{int((change > noise).sum())} of {len(change)}"
            record[f"falls_{moment}"] = f"{int((change < -noise).sum())} of {len(change)}"
        if ("llc", "end") in wide and ("llc", "plateau") in wide:
            record["end_over_plateau"] = float((wide["llc"]["end"] / wide["llc"]["plateau"]).median())
        rows.append(record)
    return pd.DataFrame(rows)
