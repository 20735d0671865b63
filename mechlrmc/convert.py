"""Map the reference implementation's tensors (HF `BertModel` + `Linear(d, 1)` read-out) to ours.

HF stores linear weights as [out, in]; TransformerLens shapes are [in, out] split by head:
`W_Q [n_heads, d_model, d_head]`, `W_O [n_heads, d_head, d_model]`, `W_in [d_model, d_mlp]`.
`reference_tensors` applies these reshapes to any per-parameter dict with HF names, so the same
function converts the weights and each of Adam's moment tensors (`mechlrmc.reference`).
"""

from __future__ import annotations

import dataclasses

import torch

from mechlrmc.config import ConfigError, RunConfig
from mechlrmc.model import EncoderConfig, HookedEncoder

PREFIXES = ("_backbone.", "bert.", "backbone.")


def strip_prefix(key: str) -> str:
    for prefix in PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def reference_shapes(state_dict: dict[str, torch.Tensor]) -> dict[str, int]:
    """d_vocab, d_model, n_ctx, n_layers and d_mlp read off a reference state dict."""
    sd = {strip_prefix(k): v for k, v in state_dict.items()}
    for key in ("embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight",
                "encoder.layer.0.intermediate.dense.weight", "read_out.weight", "read_out.bias"):
        if key not in sd:
            raise ConfigError(f"reference state dict has no {key!r}: is it HF BertModel + read_out?")
    d_vocab, d_model = sd["embeddings.word_embeddings.weight"].shape
    return {
        "d_vocab": d_vocab,
        "d_model": d_model,
        "n_ctx": sd["embeddings.position_embeddings.weight"].shape[0],
        "n_layers": 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.layer.")),
        "d_mlp": sd["encoder.layer.0.intermediate.dense.weight"].shape[0],
    }


def reference_tensors(
    state_dict: dict[str, torch.Tensor], n_heads: int, fold_token_type: bool = True
) -> dict[str, torch.Tensor]:
    """HF-named tensors (weights, or any per-parameter statistic of them) renamed and reshaped to
    ours. Token-type row 0 (every token's type) is added to the position table when
    `fold_token_type` (weights; not for optimizer moments); the pooler is dropped."""
    sd = {strip_prefix(k): v for k, v in state_dict.items()}
    shapes = reference_shapes(state_dict)
    d_model, h = shapes["d_model"], n_heads
    dh = d_model // h

    def heads_in(w: torch.Tensor) -> torch.Tensor:  # HF [h*dh, d] -> [h, d, dh]
        return w.T.reshape(d_model, h, dh).permute(1, 0, 2)

    pos = sd["embeddings.position_embeddings.weight"].clone()
    if fold_token_type and "embeddings.token_type_embeddings.weight" in sd:
        pos += sd["embeddings.token_type_embeddings.weight"][0]
    ours = {
        "W_E": sd["embeddings.word_embeddings.weight"],
        "W_pos": pos,
        "ln_embed.w": sd["embeddings.LayerNorm.weight"],
        "ln_embed.b": sd["embeddings.LayerNorm.bias"],
        "W_U": sd["read_out.weight"].T,
        "b_U": sd["read_out.bias"],
    }
    for l in range(shapes["n_layers"]):
        hf, tl = f"encoder.layer.{l}.", f"blocks.{l}."
        for name, part in (("Q", "query"), ("K", "key"), ("V", "value")):
            ours[f"{tl}attn.W_{name}"] = heads_in(sd[f"{hf}attention.self.{part}.weight"])
            ours[f"{tl}attn.b_{name}"] = sd[f"{hf}attention.self.{part}.bias"].reshape(h, dh)
        ours[f"{tl}attn.W_O"] = sd[f"{hf}attention.output.dense.weight"].T.reshape(h, dh, d_model)
        ours[f"{tl}attn.b_O"] = sd[f"{hf}attention.output.dense.bias"]
        ours[f"{tl}ln1.w"] = sd[f"{hf}attention.output.LayerNorm.weight"]
        ours[f"{tl}ln1.b"] = sd[f"{hf}attention.output.LayerNorm.bias"]
        ours[f"{tl}mlp.W_in"] = sd[f"{hf}intermediate.dense.weight"].T
        ours[f"{tl}mlp.b_in"] = sd[f"{hf}intermediate.dense.bias"]
        ours[f"{tl}mlp.W_out"] = sd[f"{hf}output.dense.weight"].T
        ours[f"{tl}mlp.b_out"] = sd[f"{hf}output.dense.bias"]
        ours[f"{tl}ln2.w"] = sd[f"{hf}output.LayerNorm.weight"]
        ours[f"{tl}ln2.b"] = sd[f"{hf}output.LayerNorm.bias"]
    return {k: v.contiguous() for k, v in ours.items()}


def from_reference_state_dict(
    state_dict: dict[str, torch.Tensor], cfg: EncoderConfig | RunConfig
) -> HookedEncoder:
    """The reference implementation's model as a `HookedEncoder`: HF `BertModel` keys (optionally
    under `_backbone.`) plus `read_out.weight/bias`, with or without token-type embeddings.

    Shapes come from the state dict, including the position table's size (`n_ctx`; 512 rows in
    the reference); `cfg` supplies the head count, eps and mask_embedding_zero and is checked
    against the weights (a mismatch names both values)."""
    if isinstance(cfg, RunConfig):
        cfg = EncoderConfig.from_run_config(cfg)
    shapes = reference_shapes(state_dict)
    wrong = {k: (getattr(cfg, k), v) for k, v in shapes.items() if k != "n_ctx" and getattr(cfg, k) != v}
    if wrong:
        raise ConfigError("the config disagrees with the weights: " + ", ".join(
            f"{k} is {c} in the config, {w} in the weights" for k, (c, w) in wrong.items()))
    if cfg.norm != "post":
        raise ConfigError(f"model.norm={cfg.norm!r} is invalid for the reference BERT: allowed 'post'")
    cfg = dataclasses.replace(cfg, n_ctx=shapes["n_ctx"])
    model = HookedEncoder(cfg, seed=None)
    model.load_state_dict({k: v.to(cfg.dtype) for k, v in reference_tensors(state_dict, cfg.n_heads).items()})
    return model
