"""Import the reference implementation's weights (HF `BertModel` + `Linear(d, 1)` read-out).

HF stores linear weights as [out, in]; TransformerLens shapes are [in, out] split by head:
`W_Q [n_heads, d_model, d_head]`, `W_O [n_heads, d_head, d_model]`, `W_in [d_model, d_mlp]`.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch

from mechlrmc.config import RunConfig

if TYPE_CHECKING:
    from mechlrmc.model import EncoderConfig, HookedEncoder

PREFIXES = ("_backbone.", "bert.", "backbone.")


def _strip(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state_dict.items():
        for prefix in PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        out[key] = value
    return out


def reference_to_encoder(
    cls: type[HookedEncoder],
    state_dict: dict[str, torch.Tensor],
    cfg: EncoderConfig | RunConfig | None = None,
) -> HookedEncoder:
    from mechlrmc.model import EncoderConfig

    sd = _strip(state_dict)
    for key in ("embeddings.word_embeddings.weight", "read_out.weight", "read_out.bias"):
        if key not in sd:
            raise KeyError(f"reference state dict has no {key!r}: is it HF BertModel + read_out?")
    d_vocab, d_model = sd["embeddings.word_embeddings.weight"].shape
    n_ctx = sd["embeddings.position_embeddings.weight"].shape[0]
    n_layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.layer."))
    d_mlp = sd["encoder.layer.0.intermediate.dense.weight"].shape[0]
    if isinstance(cfg, RunConfig):
        cfg = EncoderConfig.from_run_config(cfg)
    if cfg is None:
        raise ValueError("pass cfg (a RunConfig or EncoderConfig): the head count is not in the weights")
    shapes = {"d_vocab": d_vocab, "d_model": d_model, "n_layers": n_layers, "d_mlp": d_mlp}
    wrong = {k: (getattr(cfg, k), v) for k, v in shapes.items() if getattr(cfg, k) != v}
    if wrong:
        raise ValueError(f"cfg disagrees with the state dict (cfg, weights): {wrong}")
    if cfg.norm != "post":
        raise ValueError(f"cfg.norm={cfg.norm!r}: the reference BERT is post-LN, allowed 'post'")
    cfg = dataclasses.replace(cfg, n_ctx=n_ctx)
    h, dh = cfg.n_heads, cfg.d_head

    def heads_in(w: torch.Tensor) -> torch.Tensor:  # HF [h*dh, d] -> [h, d, dh]
        return w.T.reshape(d_model, h, dh).permute(1, 0, 2)

    pos = sd["embeddings.position_embeddings.weight"].clone()
    if "embeddings.token_type_embeddings.weight" in sd:
        pos += sd["embeddings.token_type_embeddings.weight"][0]
    ours = {
        "W_E": sd["embeddings.word_embeddings.weight"],
        "W_pos": pos,
        "ln_embed.w": sd["embeddings.LayerNorm.weight"],
        "ln_embed.b": sd["embeddings.LayerNorm.bias"],
        "W_U": sd["read_out.weight"].T,
        "b_U": sd["read_out.bias"],
    }
    for l in range(n_layers):
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
    model = cls(cfg, seed=None)
    model.load_state_dict({k: v.to(cfg.dtype).contiguous() for k, v in ours.items()})
    return model
