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

import re
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from mechlrmc import measures
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


def hub_cache_series(path: str | Path, model_id: str | None = None) -> list[tuple[int, Path]]:
    """(step, snapshot folder) of every revision with a step in its name in a local Hugging Face
    hub cache: `path` is a model's cache folder (`models--ORG--NAME`, with `refs/` and
    `snapshots/`) or the hub cache holding it (then `model_id`, "ORG/NAME", picks the model where
    there are several)."""
    root = Path(path)
    if not (root / "refs").is_dir():
        models = sorted(p for p in root.glob("models--*") if (p / "refs").is_dir())
        wanted = [p for p in models if model_id is None or p.name == "models--" + model_id.replace("/", "--")]
        if len(wanted) != 1:
            names = [p.name[len("models--"):].replace("--", "/") for p in models]
            raise OptionError(f"{root} holds {'no' if not wanted else len(wanted)} cached model(s) "
                              f"{'named ' + repr(model_id) if model_id else ''}: allowed model_id one of {names}")
        root = wanted[0]
    found: dict[int, Path] = {}
    for ref in sorted(p for p in (root / "refs").rglob("*") if p.is_file()):
        name = str(ref.relative_to(root / "refs"))
        step = _folder_step(name)
        snapshot = root / "snapshots" / ref.read_text().strip()
        if step is None or not (snapshot / "config.json").is_file():
            continue
        if step in found and found[step] != snapshot:
            raise OptionError(f"revisions of {root.name} name step {step} twice ({name}); allowed: one revision per step")
        found[step] = snapshot
    if not found:
        raise OptionError(f"no revision with a step in its name and a downloaded snapshot in {root}; allowed refs "
                          f"such as step1000 (Pythia) or stage1-step1000-tokens4B (OLMo) under refs/")
    return sorted(found.items())


def checkpoint_series(path: str | Path, model_id: str | None = None) -> list[tuple[int, Path]]:
    """(step, folder) for every checkpoint of `path`: a local Hugging Face hub cache
    (`hub_cache_series`, when `path` has `refs/` or `models--*` folders), else every sub-folder that
    holds a Hugging Face checkpoint (a `config.json`) and has its step in its name; sorted by step."""
    root = Path(path)
    if root.is_dir() and ((root / "refs").is_dir() or any(root.glob("models--*"))):
        return hub_cache_series(root, model_id)
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
def generating_states(model, ids: torch.Tensor, n_new: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Greedy continuation of one prompt ids [pos] (`mechlrmc.measures.greedy_generate` on the
    model's logits): the `n_new` tokens [n_new], and per hidden-state layer the states that
    generated them [n_new, d_model] (the last prompt position and the first `n_new - 1` generated
    ones), from one forward over the prompt and its continuation."""
    device = next(model.parameters()).device
    prompt = ids[None].to(device)
    tokens = measures.greedy_generate(measures.logits_of(model), prompt, n_new)  # [1, n_new]
    out = model(input_ids=torch.cat([prompt, tokens], dim=1), output_hidden_states=True)
    start = prompt.shape[1] - 1
    per_layer = [h[0, start:start + n_new] for h in out.hidden_states]
    return tokens[0].cpu(), per_layer


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
            tokens, per_layer = generating_states(model, prompt, n_new)
            generated = tokenizer.decode(tokens) if tokenizer is not None else " ".join(map(str, tokens.tolist()))
            common = {"prompt": index, "n_layers": len(per_layer) - 1,
                      "repetition": measures.consecutive_repetition(tokens),
                      "reference_repetition": float("nan") if ref is None else measures.consecutive_repetition(ref[:n_new]),
                      "generated": generated}
            rows += [{**common, "layer": layer, "collapse": measures.mean_pairwise_cosine(hidden)}
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
    model_id: str | None = None,
) -> pd.DataFrame:
    """`lm_repetition_collapse` at every checkpoint of `checkpoint_series(path, model_id)` (a folder
    series or a local hub cache), each loaded with
    `AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)`, concatenated with a
    `step` column first. Prompts are tokenized once; one model is in memory at a time."""
    from transformers import AutoModelForCausalLM  # heavy: imported on first use

    series = checkpoint_series(path, model_id)
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
