"""Attention across training, scrubbed: one figure whose slider walks through the checkpoints.

Every head's attention pattern averaged over a batch of random masks, or of sequences on a
sequence task ([layer, head, query, key]),
drawn as a layers x heads grid of heatmaps, each titled with the head's taxonomy label at that
checkpoint (`analyses.attention.heads.head_taxonomy`). Moving the slider swaps the patterns and labels, so a
reader watches the row and column heads of finding 4 (docs/FINDINGS.md) form around the drop. The figure is
plain plotly (slider steps restyle the heatmaps), so it works offline wherever plotly.js is
inlined once; all checkpoints' patterns travel in the file, rounded to 3 decimals.
"""

from __future__ import annotations

import pandas as pd
import torch

from analyses.attention.heads import head_map_share, head_taxonomy
from analyses.base.cache import mean_patterns
from analyses.base.walk import Steps, across_checkpoints
from mechlrmc.anatomy import Anatomy, subject_of
from mechlrmc.runs import Run
from mechlrmc.tasks.lrmc import Batch


def pattern_frame(model: torch.nn.Module, batch: Batch, anatomy: Anatomy | None = None) -> pd.DataFrame:
    """Average attention pattern of every head as a long table (layer, head, query, key, weight)."""
    model, anatomy = subject_of(model, anatomy)
    patterns = mean_patterns(model, batch.tokens, anatomy=anatomy)  # [layer, head, q, k]
    index = pd.MultiIndex.from_product([range(s) for s in patterns.shape], names=["layer", "head", "query", "key"])
    return pd.DataFrame({"weight": patterns.flatten().numpy()}, index=index).reset_index()


def scrub_data(run: Run, steps: Steps = None, batch: Batch | None = None, progress: bool = True
               ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(average patterns, head labels over all queries) at every selected checkpoint (default:
    all); the labels are LRMC's taxonomy, or a sequence task's share on its optimal map."""
    patterns = across_checkpoints(run, pattern_frame, steps=steps, batch=batch, progress=progress)
    if "matrix" in run.config.task.supports:
        labels = across_checkpoints(run, head_taxonomy, steps=steps, batch=batch, progress=progress, queries="all")
    else:
        labels = across_checkpoints(run, head_map_share, steps=steps, batch=batch, progress=progress).assign(queries="all")
    return patterns, labels
