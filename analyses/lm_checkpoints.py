"""The plateau paper's repetition bias and representation collapse (docs/FINDINGS.md, P1 and P2), measured on
a series of Hugging Face causal-LM checkpoints saved locally, one folder per training step.

The paper measured both on Pythia checkpoints (steps 0 to 10k) with 100 ARC-Easy questions and
8 greedy tokens: early in training the model repeats one token and the hidden states of the
positions that write it are nearly parallel. Here any folder of checkpoints works, e.g. Pythia's
revisions downloaded as `DIR/step1000/`, `DIR/step2000/`, ... (nothing is downloaded here).

- **Repetition**: the fraction of consecutive equal tokens among the `n_new` greedily generated
  tokens (1: one token repeated; the paper's "fraction of consecutive equal generated outputs"),
  and the same for a reference continuation where one is given.
- **Collapse**: per layer, the mean pairwise cosine similarity of the hidden states of the
  positions that generate the `n_new` tokens (the last prompt position and the first
  `n_new - 1` generated ones), i.e. the states the logits of the generated tokens are read from.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import torch
from plotly.colors import sample_colorscale
from plotly.subplots import make_subplots
from tqdm.auto import tqdm

from mechlrmc.errors import OptionError

Prompts = Sequence[str] | Sequence[torch.Tensor] | Sequence[Sequence[int]] | torch.Tensor

_STEP_NAMED = re.compile(r"step[-_]?(\d+)", re.IGNORECASE)
_DIGITS = re.compile(r"\d+")


def _folder_step(name: str) -> int | None:
    """The step in a folder name: the number after `step` (`step1000`, `stage1-step150-tokens1B`),
    else the name's only number (`checkpoint-1000`, `1000`); None when there is none or it is ambiguous."""
    named = _STEP_NAMED.findall(name)
    if len(named) == 1:
        return int(named[0])
    numbers = _DIGITS.findall(name)
    return int(numbers[0]) if not named and len(numbers) == 1 else None


def checkpoint_series(path: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) for every sub-folder of `path` that holds a Hugging Face checkpoint
    (a `config.json`) and has its step in its name, sorted by step."""
    root = Path(path)
    allowed = ("allowed: sub-folders named with their step (step1000/, checkpoint-1000/), "
               "each holding a Hugging Face config.json")
    if not root.is_dir():
        raise OptionError(f"{root} is not a folder of checkpoints; {allowed}")
    found: dict[int, Path] = {}
    for folder in sorted(root.iterdir()):
        step = _folder_step(folder.name) if (folder / "config.json").is_file() else None
        if step is None:
            continue
        if step in found:
            raise OptionError(f"{found[step].name} and {folder.name} in {root} are both step {step}; "
                              f"allowed: one folder per step")
        found[step] = folder
    if not found:
        raise OptionError(f"no checkpoint folders found in {root}; {allowed}")
    return sorted(found.items())


def consecutive_repetition(tokens: Sequence[int] | torch.Tensor) -> float:
    """Fraction of consecutive pairs of equal tokens [n] -> float (NaN for fewer than 2 tokens)."""
    tokens = torch.as_tensor(tokens).flatten()
    if tokens.numel() < 2:
        return float("nan")
    return float((tokens[1:] == tokens[:-1]).float().mean())


def mean_pairwise_cosine(hidden: torch.Tensor) -> float:
    """Mean cosine similarity over pairs of distinct positions, hidden [..., pos, d_model] -> float,
    averaged over any leading (batch) axes (1: all parallel, i.e. collapsed; NaN for fewer than 2
    positions). The one collapse measure of `analyses.sequences` and this module."""
    n = hidden.shape[-2]
    if n < 2:
        return float("nan")
    unit = torch.nn.functional.normalize(hidden.float(), dim=-1)
    cos = unit @ unit.transpose(-2, -1)  # [..., pos, pos]
    off_diagonal = ~torch.eye(n, dtype=torch.bool, device=hidden.device)
    return float(cos[..., off_diagonal].mean())


def _as_ids(prompts: Prompts, tokenizer, what: str) -> list[torch.Tensor]:
    """Each prompt as a 1-D tensor of token ids [pos]: strings go through `tokenizer`."""
    if isinstance(prompts, torch.Tensor):
        prompts = list(prompts) if prompts.dim() == 2 else [prompts]
    out = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            if tokenizer is None:
                raise OptionError(f"{what} {i} is a string but no tokenizer was given; "
                                  f"allowed: token-id tensors, or strings with a tokenizer")
            prompt = tokenizer(prompt, return_tensors="pt").input_ids
        ids = torch.as_tensor(prompt, dtype=torch.long).flatten()
        if ids.numel() == 0:
            raise OptionError(f"{what} {i} is empty; allowed: at least one token")
        out.append(ids)
    return out


@torch.no_grad()
def _greedy(model, ids: torch.Tensor, n_new: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Greedy continuation of one prompt ids [pos] with the key-value cache: the `n_new` tokens
    [n_new], and per hidden-state layer the states that generated them [n_new, d_model]."""
    device = next(model.parameters()).device
    # transformers 5 renamed `past_key_values` to `cache` (in the forward and in its output)
    cache_name = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
    step_input, past = ids[None].to(device), None
    tokens, states = [], []  # states: per generated token, a list over layers of [d_model]
    for _ in range(n_new):
        out = model(input_ids=step_input, use_cache=True, output_hidden_states=True, **{cache_name: past})
        past = out[cache_name]
        next_token = out.logits[0, -1].argmax()
        tokens.append(next_token)
        states.append([h[0, -1] for h in out.hidden_states])
        step_input = next_token.view(1, 1)
    per_layer = [torch.stack(layer) for layer in zip(*states)]
    return torch.stack(tokens).cpu(), per_layer


def lm_repetition_collapse(
    model, tokenizer, prompts: Prompts, n_new: int = 8, references: Prompts | None = None
) -> pd.DataFrame:
    """Repetition and collapse of one causal LM's greedy continuations (docs/FINDINGS.md, P1, P2).

    `prompts` are token-id tensors (a list of 1-D, or one 2-D [prompt, pos]) or, with a
    `tokenizer`, strings; `references` (same forms, optional) are their true continuations.
    Each prompt is continued by `n_new` greedy tokens, one prompt at a time (no padding).

    One row per (prompt, layer), layer 0 = embeddings ... layer L = the last block's output as
    the model returns it (after the final LayerNorm for GPT-NeoX / Pythia):
    `prompt` (index), `layer`, `n_layers` (L), `repetition` (consecutive equal generated tokens),
    `reference_repetition` (the same over the reference's first `n_new` tokens; NaN without one),
    `collapse` (mean pairwise cosine of that layer's hidden states across the generating positions),
    `generated` (the text with a tokenizer, else the ids joined by spaces).
    The per-prompt columns repeat over layers; select `layer == n_layers` for the last layer."""
    if n_new < 2:
        raise OptionError(f"n_new={n_new} is too small: allowed n_new >= 2 (repetition needs two tokens)")
    ids = _as_ids(prompts, tokenizer, "prompt")
    refs = [None] * len(ids) if references is None else _as_ids(references, tokenizer, "reference")
    if len(refs) != len(ids):
        raise OptionError(f"{len(refs)} references for {len(ids)} prompts; allowed: one per prompt")
    was_training = model.training
    model.eval()
    rows = []
    try:
        for index, (prompt, ref) in enumerate(zip(ids, refs)):
            tokens, per_layer = _greedy(model, prompt, n_new)
            generated = tokenizer.decode(tokens) if tokenizer is not None else " ".join(map(str, tokens.tolist()))
            common = {"prompt": index, "n_layers": len(per_layer) - 1,
                      "repetition": consecutive_repetition(tokens),
                      "reference_repetition": float("nan") if ref is None else consecutive_repetition(ref[:n_new]),
                      "generated": generated}
            rows += [{**common, "layer": layer, "collapse": mean_pairwise_cosine(hidden)}
                     for layer, hidden in enumerate(per_layer)]
    finally:
        model.train(was_training)
    columns = ["prompt", "layer", "n_layers", "repetition", "reference_repetition", "collapse", "generated"]
    return pd.DataFrame(rows, columns=columns)


def across_lm_checkpoints(
    path: str | Path,
    prompts: Prompts,
    tokenizer=None,
    n_new: int = 8,
    progress: bool = True,
    references: Prompts | None = None,
    device: str | torch.device = "cpu",
) -> pd.DataFrame:
    """`lm_repetition_collapse` at every checkpoint of `checkpoint_series(path)`, each loaded with
    `AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)`, concatenated with a
    `step` column first. Prompts are tokenized once; one model is in memory at a time."""
    from transformers import AutoModelForCausalLM  # heavy: imported on first use

    series = checkpoint_series(path)
    ids = _as_ids(prompts, tokenizer, "prompt")
    refs = None if references is None else _as_ids(references, tokenizer, "reference")
    frames = []
    for step, folder in tqdm(series, desc="lm checkpoints", unit="ckpt", disable=not progress):
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).to(device)
        frames.append(lm_repetition_collapse(model, tokenizer, ids, n_new, refs).assign(step=step))
        del model
    out = pd.concat(frames, ignore_index=True)
    return out[["step", *[c for c in out.columns if c != "step"]]]


def lm_dynamics_summary(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per (step, layer) of an `across_lm_checkpoints` frame: the means over prompts of
    `repetition`, `reference_repetition` and `collapse`, with `n_layers`."""
    return (frame.groupby(["step", "layer"], as_index=False)
            [["n_layers", "repetition", "reference_repetition", "collapse"]].mean())


def plot_lm_dynamics(frame: pd.DataFrame) -> go.Figure:
    """Two panels against step: mean repetition of the greedy tokens (reference dashed where
    given) and mean collapse per layer (the last layer thick). The step axis is logarithmic when
    all steps are positive and span two decades (as Pythia's early checkpoints do)."""
    summary = lm_dynamics_summary(frame)
    last = summary[summary.layer == summary.n_layers]
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.08, subplot_titles=(
        "repetition: consecutive equal greedy tokens", "collapse: mean pairwise cosine"))
    fig.add_scatter(x=last.step, y=last.repetition, name="generated", legendgroup="rep",
                    legendgrouptitle_text="repetition", mode="lines+markers", line_color="#1f77b4", row=1, col=1)
    if last.reference_repetition.notna().any():
        fig.add_scatter(x=last.step, y=last.reference_repetition, name="reference", legendgroup="rep",
                        mode="lines", line=dict(color="black", dash="dash"), row=1, col=1)
    top = int(summary.layer.max())
    colors = sample_colorscale("Viridis", [layer / max(top, 1) * 0.85 for layer in range(top + 1)])
    for layer, part in summary.groupby("layer"):
        final = bool((part.layer == part.n_layers).all())
        fig.add_scatter(x=part.step, y=part.collapse, name="embeddings" if layer == 0 else f"layer {layer}",
                        legendgroup="collapse", legendgrouptitle_text="collapse", mode="lines+markers",
                        line=dict(color=colors[layer], width=3 if final else 1.5), row=1, col=2)
    fig.update_yaxes(range=[-0.02, 1.02], row=1, col=1)
    steps = summary.step
    log_steps = bool((steps > 0).all() and steps.max() / steps.min() >= 100)
    fig.update_xaxes(title_text="step", type="log" if log_steps else "linear")
    fig.update_layout(height=420, margin=dict(t=40, b=40), legend=dict(groupclick="toggleitem"))
    return fig
