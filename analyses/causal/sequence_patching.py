"""Activation patching and attribution patching on a sequence task (finding 6's method, in the
plateau paper's setting): which activations carry the answer on MWS, prefix sum, reverse or a
user's token task.

Clean sequences against corrupted ones, the batch's other sequences (other inputs and so other
outputs), both read teacher-forced. The metric is the logit difference at the output positions whose clean and
corrupted targets differ,

    LD(logits) = mean over those (sequence, position) of logit[clean target] - logit[corrupted target],

and a patch's recovery is (LD(patched) - LD(corrupted)) / (LD(clean) - LD(corrupted)): 0 no move,
1 the clean answer. Exact patching runs `transformer_lens.patching` (one forward per patch); the
first-order estimate, (clean - corrupted activation) x d LD / d activation at the corrupted run, takes
one forward and one backward for all patches. Sites per (layer, position): `resid_pre`,
`attn_out`, `mlp_out`; per (layer, position, head): `z`. In a causal model a patch at position p
reaches only the positions from p on.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pandas as pd
import torch
from transformer_lens import patching as tl_patching

from mechlrmc.tasks.tokens import SequenceBatch

SITES = {"resid_pre": tl_patching.get_act_patch_resid_pre, "attn_out": tl_patching.get_act_patch_attn_out,
         "mlp_out": tl_patching.get_act_patch_mlp_out, "z": tl_patching.get_act_patch_attn_head_out_by_pos}


MIN_GAP = 1e-3  # |LD(clean) - LD(corrupted)| below this: nothing to recover (recovery NaN)


def paired(batch: SequenceBatch, shift: int = 1) -> SequenceBatch:
    """The corrupted batch: each sequence replaced by the one `shift` places on in the batch
    (other inputs and so other outputs, from the same distribution, with no new draw)."""
    return batch[torch.arange(len(batch)).roll(-shift)]


@contextlib.contextmanager
def _quiet_patching():
    """transformer_lens.patching without its per-patch progress bar."""
    bar, tl_patching.tqdm = tl_patching.tqdm, lambda iterable, *args, **kwargs: iterable
    try:
        yield
    finally:
        tl_patching.tqdm = bar


def _hook(site: str, layer: int) -> str:
    return f"blocks.{layer}.attn.hook_z" if site == "z" else f"blocks.{layer}.hook_{site}"


def logit_difference(clean: SequenceBatch, corrupted: SequenceBatch):
    """`LD(logits [..., batch, pos, vocab]) -> [...]` over the scored positions whose targets differ."""
    scored = clean.scored.to(clean.tokens.device)
    differ = (clean.targets != corrupted.targets) & scored  # [b, pos]
    good, bad = clean.targets.clamp_min(0), corrupted.targets.clamp_min(0)
    weight = differ.float() / differ.sum().clamp_min(1)

    def ld(logits: torch.Tensor) -> torch.Tensor:
        gap = logits.gather(-1, good.expand(*logits.shape[:-1])[..., None]).squeeze(-1) \
            - logits.gather(-1, bad.expand(*logits.shape[:-1])[..., None]).squeeze(-1)
        return (gap * weight).sum((-2, -1))

    return ld


def _gradients(model, tokens: torch.Tensor, names: list[str], metric) -> tuple[dict, dict]:
    """Activations of `names` on `tokens` and the metric's gradients there (one forward, one backward)."""
    acts: dict[str, torch.Tensor] = {}

    def keep(act, hook):
        acts[hook.name] = act
        return act

    def track(act, hook):  # gradients even for a frozen model
        return act if act.requires_grad else act.requires_grad_()

    with torch.enable_grad(), model.hooks(fwd_hooks=[("hook_embed", track), *[(n, keep) for n in names]]):
        grads = torch.autograd.grad(metric(model(tokens)), [acts[n] for n in names])
    return {n: acts[n].detach() for n in names}, dict(zip(names, grads))


def sequence_patching(model, batch: SequenceBatch, shift: int = 1, sites: tuple[str, ...] = tuple(SITES)
                      ) -> pd.DataFrame:
    """Exact and first-order recovery of every patch: one row per (site, layer, pos, head, method)
    with `recovery` (head -1: the whole position). Maps over a run with `across_checkpoints`."""
    corrupted = paired(batch, shift)
    ld = logit_difference(batch, corrupted)
    with torch.no_grad():
        clean_logits, clean_cache = model.run_with_cache(batch.tokens)
        corrupt_logits = model(corrupted.tokens)
    base, gap = float(ld(corrupt_logits)), float(ld(clean_logits) - ld(corrupt_logits))
    scale = gap if abs(gap) >= MIN_GAP else float("nan")

    def recovery(logits: torch.Tensor) -> torch.Tensor:
        return (ld(logits) - base) / scale

    names = [_hook(s, l) for s in sites for l in range(model.cfg.n_layers)]
    acts, grads = _gradients(model, corrupted.tokens, names, ld)
    rows = []
    for site in sites:
        with torch.no_grad(), _quiet_patching():
            exact = SITES[site](model, corrupted.tokens, clean_cache, recovery)  # [layer, pos(, head)]
        first = torch.stack([((clean_cache[_hook(site, l)] - acts[_hook(site, l)]) * grads[_hook(site, l)])
                             .sum(-1).sum(0) / scale for l in range(model.cfg.n_layers)])  # [layer, pos(, head)]
        for method, values in (("exact", exact), ("attribution", first)):
            values = values if site == "z" else values[..., None]
            for (layer, pos, head), v in np.ndenumerate(values.detach().cpu().numpy()):
                rows.append({"site": site, "layer": layer, "pos": pos, "head": head if site == "z" else -1,
                             "method": method, "recovery": float(v)})
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
