"""Activation patching and attribution patching on a sequence task (finding 6's method, in the
plateau paper's setting): which activations carry the answer on MWS, prefix sum, reverse or a
user's token task.

Clean sequences against corrupted ones, the batch's other sequences (other inputs and so other
outputs), both read teacher-forced; the task says both (`Task.patch_pair`, `Task.patch_metric`), so a
user's token task may give its own. The metric is the logit difference at the output positions whose clean and
corrupted targets differ,

    LD(logits) = mean over those (sequence, position) of logit[clean target] - logit[corrupted target],

and a patch's recovery is (LD(patched) - LD(corrupted)) / (LD(clean) - LD(corrupted)): 0 no move,
1 the clean answer. Exact patching takes one forward per patch, with the clean activation written
into the corrupted run through the model's anatomy (`mechlrmc.anatomy`, so any model); the
first-order estimate, (clean - corrupted activation) x d LD / d activation at the corrupted run, takes
one forward and one backward for all patches. Sites per (layer, position): `resid_pre`,
`attn_out`, `mlp_out`; per (layer, position, head): `z`. In a causal model a patch at position p
reaches only the positions from p on.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from mechlrmc.anatomy import Anatomy, subject_of
from mechlrmc.tasks import get_task
from mechlrmc.tasks.tokens import SequenceBatch

SITES = ("resid_pre", "attn_out", "mlp_out", "z")


MIN_GAP = 1e-3  # |LD(clean) - LD(corrupted)| below this: nothing to recover (recovery NaN)


def paired(batch: SequenceBatch, shift: int = 1) -> SequenceBatch:
    """The corrupted batch of the batch's task (`Task.patch_pair`; a token task: each sequence replaced
    by the one `shift` places on in the batch, other inputs and so other outputs, with no new draw)."""
    return get_task(batch.task).patch_pair(batch, shift)


def part(site: str, layer: int) -> str:
    """The anatomy part a site of a layer is: `resid_pre` of layer 0 is the embeddings, of layer l the
    output of block l - 1."""
    if site == "resid_pre":
        return "embed" if layer == 0 else f"resid.{layer - 1}"
    return f"{site}.{layer}"


def _patch(clean: torch.Tensor, pos: int, head: int | None):
    def edit(value: torch.Tensor) -> torch.Tensor:
        value = value.clone()
        if head is None:
            value[:, pos] = clean[:, pos]
        else:
            value[:, pos, head] = clean[:, pos, head]
        return value
    return edit


def logit_difference(clean: SequenceBatch, corrupted: SequenceBatch):
    """The task's patching metric (`Task.patch_metric`; a token task: the logit difference
    `LD(logits [..., batch, pos, vocab]) -> [...]` over the scored positions whose targets differ)."""
    return get_task(clean.task).patch_metric(clean, corrupted)


def sequence_patching(model, batch: SequenceBatch, shift: int = 1, sites: tuple[str, ...] = SITES,
                      anatomy: Anatomy | None = None) -> pd.DataFrame:
    """Exact and first-order recovery of every patch: one row per (site, layer, pos, head, method)
    with `recovery` (head -1: the whole position). Any model, through its anatomy (`mechlrmc.anatomy`);
    maps over a run with `across_checkpoints`."""
    model, anatomy = subject_of(model, anatomy)
    keys = {(site, layer): part(site, layer) for site in sites for layer in range(anatomy.n_layers)}
    corrupted = paired(batch, shift)
    ld = logit_difference(batch, corrupted)
    with torch.no_grad():
        clean_logits, clean = anatomy.run(model, batch.tokens, read=list(keys.values()))
        corrupt_logits, _ = anatomy.run(model, corrupted.tokens)
    base, gap = float(ld(corrupt_logits)), float(ld(clean_logits) - ld(corrupt_logits))
    scale = gap if abs(gap) >= MIN_GAP else float("nan")
    with torch.enable_grad():  # the first-order estimate: one forward and one backward for every patch
        logits, acts = anatomy.run(model, corrupted.tokens, read=list(keys.values()), grad=True)
        grads = dict(zip(acts, torch.autograd.grad(ld(logits), list(acts.values()))))
    rows = []
    for (site, layer), key in keys.items():
        heads = range(anatomy.n_heads) if site == "z" else [None]
        first = ((clean[key] - acts[key].detach()) * grads[key]).sum(-1).sum(0) / scale  # [pos(, head)]
        for pos in range(batch.tokens.shape[1]):
            for head in heads:
                with torch.no_grad():
                    patched, _ = anatomy.run(model, corrupted.tokens, edit={key: _patch(clean[key], pos, head)})
                exact = (float(ld(patched)) - base) / scale
                estimate = float(first[pos] if head is None else first[pos, head])
                for method, value in (("exact", exact), ("attribution", estimate)):
                    rows.append({"site": site, "layer": layer, "pos": pos, "head": -1 if head is None else head,
                                 "method": method, "recovery": value})
    return pd.DataFrame(rows).assign(ld_gap=gap)


def patching_agreement(frame: pd.DataFrame) -> pd.DataFrame:
    """Per (step, site): Pearson and Spearman of attribution against exact patching, and the
    largest exact recovery."""
    keys = [c for c in ("step", "site") if c in frame]
    wide = frame.pivot_table(index=[*keys, "layer", "pos", "head"], columns="method", values="recovery").reset_index()
    rows = []
    for key, part in wide.groupby(keys):
        part = part.dropna(subset=["exact", "attribution"])
        ok = len(part) > 2 and part.exact.std() > 0 and part.attribution.std() > 0
        rows.append({**dict(zip(keys, key if isinstance(key, tuple) else (key,))), "patches": len(part),
                     "pearson": part.exact.corr(part.attribution) if ok else np.nan,
                     "spearman": part.exact.corr(part.attribution, method="spearman") if ok else np.nan,
                     "max_exact": part.exact.max() if len(part) else np.nan})
    return pd.DataFrame(rows)
