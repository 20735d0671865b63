"""The plateau paper's measurements in their own definitions, on its sequence tasks (docs/FINDINGS.md,
P1-P4): any task of `mechlrmc.tasks.tokens` (mws, prefix_sum, reverse, or a user's own), i.e. one
whose batch holds whole sequences (`prompt`, `outputs`, `scored`) and that has an optimal
attention map.

- `repetition_native(model, batch)`: the 16 outputs generated greedily from the prompt; the
  fraction of consecutive equal outputs, beside the same for the true outputs (P1);
- `collapse_native(model, batch)`: the mean pairwise cosine of the hidden states across the
  scored positions, after every layer and after the final LayerNorm (P2);
- `attention_progress_native(model, batch)`: per head, the share of |attention| on the task's
  optimal map over the query rows that have one (P3);
- `partial_solution(model, batch)`: the accuracy of each output position, greedy and
  teacher-forced (P4).
Each is a view of `native_measures`, which computes all four from one greedy generation and one
cached forward (what the report walks over the checkpoints).
The plateau and the drop of a token run are `analyses.plateau.phases.detect_phases` on its
task's phase metric (the outputs' cross-entropy). The LRMC analogues of these measures are in `analyses.plateau.dynamics`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from analyses.attention.heads import map_shares
from mechlrmc import measures
from mechlrmc.sites import Sites


def repetition_native(model, batch) -> pd.DataFrame:
    """One row: `rep` of the greedy outputs, `rep_true` of the truth, and the greedy accuracy."""
    return native_measures(model, batch)["repetition"]


def collapse_native(model, batch) -> pd.DataFrame:
    """Per layer (`layer` l: after block l; `final`: after the final LayerNorm): `cos_scored`,
    the mean pairwise cosine of hidden states across the scored positions."""
    return native_measures(model, batch)["collapse"]


def attention_progress_native(model, batch) -> pd.DataFrame:
    """Per (layer, head): `share_on_map`, the share of |attention| on the optimal map, averaged
    over the query rows that have optimal cells and over the batch."""
    return native_measures(model, batch)["attention_progress"]


def partial_solution(model, batch) -> pd.DataFrame:
    """Per output position (1-based): the accuracy of the greedy outputs and the teacher-forced one."""
    return native_measures(model, batch)["partial_solution"]


@torch.no_grad()
def native_measures(model, batch, sites: Sites | None = None) -> dict[str, pd.DataFrame]:
    """The four measures above at one checkpoint from ONE greedy generation and ONE forward
    (every measure from `mechlrmc.measures`), reading the model's internals at its `sites`
    (`mechlrmc.sites`; default: those the model declares). Collapse is measured at every hidden
    site (`layer` is the site's label), attention on the map at every attention site; a model
    without them has empty tables there."""
    sites = Sites.of(model) if sites is None else sites
    generated = measures.greedy_generate(model, batch.prompt, batch.length)
    truth = batch.outputs
    logits, acts = sites.capture(model, batch.tokens)
    scored = batch.scored
    repetition = pd.DataFrame([{"rep": measures.consecutive_repetition(generated),
                                "rep_true": measures.consecutive_repetition(truth),
                                "greedy_acc": float((generated == truth).float().mean())}])
    collapse = [{"layer": label, "cos_scored": measures.mean_pairwise_cosine(acts[name], scored)}
                for label, name in sites.hidden.items()]
    progress = map_shares(sites.patterns(acts), batch)
    forced = (logits[:, scored].argmax(-1) == batch.targets[:, scored]).float().mean(0)
    partial = pd.DataFrame({"position": np.arange(1, batch.length + 1),
                            "greedy_acc": (generated == truth).float().mean(0).cpu().numpy(),
                            "forced_acc": forced.cpu().numpy()})
    return {"repetition": repetition, "collapse": pd.DataFrame(collapse, columns=["layer", "cos_scored"]),
            "attention_progress": progress, "partial_solution": partial}


