"""The weight-restricted ("refined") LLC of a model's components: one head, an attention layer, an MLP, the embeddings.

SGLD samples only the component's weights and keeps every other weight at w* (Wang et al., "Differentiation
and specialization of attention heads via the refined local learning coefficient"): the LLC of the loss as
a function of those weights alone. A head is its slices of W_Q, W_K, W_V (and their biases) and of W_O
along the head axis; devinterp 2.0.1's `weight_restrictions.create_param_masks` builds those element masks
for TransformerLens names ("l0h1", "l0 attn", "l0 mlp") and its SGMCMC optimizer applies them (a mask
on the drift, the localization and the noise). Here it asks which components' complexity changes at the
drop (finding 1, docs/FINDINGS.md), per run and across a family.

All components of a model are sampled with one calibration of the whole model (`calibrate`), so their
LLCs use the same nbeta, step size and localization and can be compared with each other; the diagnostics
`diverged` and `flat` are measured per component.
"""

from __future__ import annotations

from typing import Callable, Iterable

import pandas as pd
import torch
from tqdm.auto import tqdm

from analyses.llc import _COLOURS, Data, Masks, estimate_with, mse_loss, sampled_dimension
from analyses.llc_calibrate import Calibration, calibrate

# names this project's encoder gives the embeddings and the read-out (devinterp expects embed.W_E, unembed.W_U)
OWN = {"embed": ("W_E", "W_pos", "ln_embed.w", "ln_embed.b"), "unembed": ("W_U", "b_U")}


def component_masks(model: torch.nn.Module, component: str | Masks) -> Masks:
    """The masks of one component: "embed", "unembed", "l{L}" (a block), "l{L} attn", "l{L} mlp",
    "l{L}h{H}" (one head: devinterp's restriction strings), a parameter name, or a ready dict of masks."""
    if isinstance(component, dict):
        return component
    params = dict(model.named_parameters())
    if component in params:
        return {component: None}
    if component in OWN and any(name in params for name in OWN[component]):
        return {name: None for name in OWN[component] if name in params}
    from devinterp.slt.weight_restrictions import create_param_masks

    try:
        masks = create_param_masks(model, component)
    except ValueError as error:
        raise ValueError(f"component={component!r} is invalid: allowed 'embed', 'unembed', 'l0', 'l0 attn', "
                         f"'l0 mlp', 'l0h1' or a parameter name ({error})") from None
    if not masks:
        raise ValueError(f"component={component!r} is invalid: it selects no parameter of this model")
    return masks


def model_components(model: torch.nn.Module, heads: bool = True) -> list[str]:
    """The components of a hooked transformer: embeddings, read-out, every layer's attention and MLP
    and (with `heads`) every head."""
    cfg = model.cfg
    names = ["embed", "unembed"]
    for layer in range(cfg.n_layers):
        names += [f"l{layer} attn", f"l{layer} mlp"] + ([f"l{layer}h{h}" for h in range(cfg.n_heads)] if heads else [])
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


def run_component_llc(ctx, components: list[str] | None = None, heads: bool = False,
                      num_chains: int | None = None) -> pd.DataFrame:
    """The refined LLC of every component at a run's key checkpoints (plateau, drop, end), one row
    per (moment, component): `component_llc` with the run's one calibration (the report's,
    `analyses.llc_report.run_calibration`, cached; `num_chains` may lower its chain count to save
    time), each checkpoint's rows cached in the run directory. `ctx` an `analyses.context.Context`;
    `components` default `model_components` (with every head when `heads`)."""
    from dataclasses import replace

    from analyses.llc_report import QUICK, REPORT, chain_settings, run_calibration
    from analyses.store import cached

    calibration = run_calibration(ctx, QUICK if ctx.quick else REPORT)
    if num_chains is not None:
        calibration = replace(calibration, config=replace(calibration.config, num_chains=num_chains))
    names = list(components or model_components(ctx.model(ctx.final), heads=heads))
    settings = {**chain_settings(ctx, calibration), "components": names}
    frames = []
    for moment, step in tqdm(ctx.key.items(), desc="component LLC", unit="ckpt", disable=not ctx.progress):
        rows = cached(ctx.run, "llc_components", step, settings,
                      lambda: component_llc(ctx.model(step), ctx.batch, names, calibration))
        frames.append(rows.assign(moment=moment, step=step))
    return pd.concat(frames, ignore_index=True)


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


def plot_component_llc(per_run: pd.DataFrame):
    """The refined LLC of each component (a panel each) at the plateau, drop and end checkpoints,
    one line per run; a moment whose diagnostics fail is a hollow marker."""
    from plotly.subplots import make_subplots

    components = list(dict.fromkeys(per_run.component))
    columns = min(len(components), 5)
    fig = make_subplots(rows=-(-len(components) // columns), cols=columns, subplot_titles=components,
                        horizontal_spacing=0.04, vertical_spacing=0.12)
    order = {"plateau": 0, "drop": 1, "end": 2}
    for i, component in enumerate(components):
        for j, (run, part) in enumerate(per_run[per_run.component == component].groupby("run", sort=False)):
            part = part.sort_values("moment", key=lambda m: m.map(order))
            fig.add_scatter(x=part.moment, y=part.llc, mode="lines+markers", name=str(run), legendgroup=str(run),
                            showlegend=i == 0, line=dict(color=_COLOURS[j % len(_COLOURS)], width=1.5),
                            marker=dict(size=7, symbol=["circle" if ok else "circle-open" for ok in part.ok]),
                            row=i // columns + 1, col=i % columns + 1)
    return fig.update_layout(title="Refined LLC per component at the plateau, drop and end (hollow: diagnostics fail)",
                             template="plotly_white", height=260 * (-(-len(components) // columns)) + 80)
