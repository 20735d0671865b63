"""The hooked transformer: by default the LRMC paper's bidirectional post-LayerNorm BERT, as a
TransformerLens `HookedRootModule`; variants give the plateau paper's causal GPT (`ModelConfig`).

Tokens [batch, pos] -> one real number per position [batch, pos] (scalar read-out, LRMC) or
logits [batch, pos, d_vocab] (vocabulary read-out, token tasks): the task picks. Hook names and weight shapes
follow TransformerLens (`blocks.{l}.attn.hook_pattern`, `W_Q [n_heads, d_model, d_head]`, ...), so
`run_with_cache`, `transformer_lens.patching` and `FactoredMatrix` circuits work unchanged.

Post-LN block (the paper's, and TransformerLens' BERT naming):
    resid_mid = resid_pre + attn(resid_pre);  x = ln1(resid_mid)
    resid_post = x + mlp(x);                  out = ln2(resid_post)   (hook_normalized_resid_post)
Pre-LN block (`norm="pre"`): resid_mid = resid_pre + attn(ln1(resid_pre)),
    resid_post = resid_mid + mlp(ln2(resid_mid)), and ln_final before the read-out.
Attention: softmax (optionally causal: -inf above the diagonal before the softmax) or linear (the
pattern is the scaled scores, 0 above the diagonal when causal). `hook_attn_scores` sees the masked
scores and `hook_pattern` the pattern in every variant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformer_lens import ActivationCache, FactoredMatrix, HookedRootModule
from transformer_lens.hook_points import HookPoint

from mechlrmc.config import ModelConfig, RunConfig
from mechlrmc.sites import Sites


@dataclass
class EncoderConfig:
    """The model's `cfg`, with the fields TransformerLens' tools read."""

    n_layers: int
    n_heads: int
    d_model: int
    d_head: int
    d_mlp: int
    d_vocab: int
    n_ctx: int
    norm: str = "post"
    causal: bool = False
    attention: str = "softmax"
    init: str = "bert"
    readout: str = "scalar"
    readout_bias: bool = True
    mask_embedding_zero: bool = True
    init_range: float = 0.02
    eps: float = 1e-12
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    normalization_type: str = "LN"
    attn_only: bool = False
    n_key_value_heads: int | None = None
    act_fn: str = "gelu"
    positional_embedding_type: str = "standard"
    original_architecture: str = "mechlrmc.HookedEncoder"
    use_attn_result: bool = False
    use_split_qkv_input: bool = False
    use_attn_in: bool = False
    use_hook_mlp_in: bool = False
    default_prepend_bos: bool = False
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_run_config(cls, run_cfg: RunConfig) -> EncoderConfig:
        m: ModelConfig = run_cfg.model
        return cls(
            n_layers=m.n_layers, n_heads=m.n_heads, d_model=m.d_model, d_head=m.d_head,
            d_mlp=m.d_mlp, d_vocab=run_cfg.data.vocab_size, n_ctx=run_cfg.n_ctx, norm=m.norm,
            causal=m.causal, attention=m.attention, init=m.init, readout=run_cfg.task.readout,
            readout_bias=m.readout_bias, mask_embedding_zero=m.mask_embedding_zero,
            init_range=m.init_range, eps=m.ln_eps, act_fn={"gelu": "gelu", "gelu_tanh": "gelu_new"}[m.act_fn],
        )


def _has_hooks(*points: HookPoint) -> bool:
    return any(p._forward_hooks or p._backward_hooks for p in points)


class LayerNorm(nn.Module):
    """LayerNorm with TransformerLens hooks: `hook_scale` [batch, pos, 1] and `hook_normalized`
    (after the affine map). Uses the fused kernel unless one of its hooks is in use."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.eps = cfg.eps
        self.w = nn.Parameter(torch.ones(cfg.d_model, dtype=cfg.dtype))
        self.b = nn.Parameter(torch.zeros(cfg.d_model, dtype=cfg.dtype))
        self.hook_scale = HookPoint()
        self.hook_normalized = HookPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _has_hooks(self.hook_scale, self.hook_normalized):
            return F.layer_norm(x, x.shape[-1:], self.w, self.b, self.eps)
        x = x - x.mean(-1, keepdim=True)
        scale = self.hook_scale((x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
        return self.hook_normalized(x / scale * self.w + self.b)


class Attention(nn.Module):
    """Multi-head self-attention: bidirectional (no mask) or causal; softmax or linear."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.causal, self.linear = cfg.causal, cfg.attention == "linear"
        h, d, dh = cfg.n_heads, cfg.d_model, cfg.d_head
        self.W_Q = nn.Parameter(torch.empty(h, d, dh, dtype=cfg.dtype))
        self.W_K = nn.Parameter(torch.empty(h, d, dh, dtype=cfg.dtype))
        self.W_V = nn.Parameter(torch.empty(h, d, dh, dtype=cfg.dtype))
        self.W_O = nn.Parameter(torch.empty(h, dh, d, dtype=cfg.dtype))
        self.b_Q = nn.Parameter(torch.zeros(h, dh, dtype=cfg.dtype))
        self.b_K = nn.Parameter(torch.zeros(h, dh, dtype=cfg.dtype))
        self.b_V = nn.Parameter(torch.zeros(h, dh, dtype=cfg.dtype))
        self.b_O = nn.Parameter(torch.zeros(d, dtype=cfg.dtype))
        self.scale = 1.0 / math.sqrt(dh)
        self.hook_q = HookPoint()  # [batch, pos, head, d_head]
        self.hook_k = HookPoint()
        self.hook_v = HookPoint()
        self.hook_attn_scores = HookPoint()  # [batch, head, query_pos, key_pos]
        self.hook_pattern = HookPoint()
        self.hook_z = HookPoint()  # [batch, pos, head, d_head]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, p, _ = x.shape
        h, d, dh = self.W_Q.shape
        # One matmul for Q, K and V: [d_model, 3 * head * d_head].
        w_qkv = torch.cat([self.W_Q, self.W_K, self.W_V]).permute(1, 0, 2).reshape(d, 3 * h * dh)
        b_qkv = torch.cat([self.b_Q, self.b_K, self.b_V]).reshape(3 * h * dh)
        q, k, v = torch.addmm(b_qkv, x.reshape(b * p, d), w_qkv).view(b, p, 3, h, dh).unbind(2)
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        scores = torch.matmul(q.transpose(1, 2), k.permute(0, 2, 3, 1)) * self.scale
        if self.causal:  # [query, key]: True above the diagonal (a key after its query)
            future = torch.ones(p, p, dtype=torch.bool, device=x.device).triu(1)
            scores = scores.masked_fill(future, 0.0 if self.linear else float("-inf"))
        scores = self.hook_attn_scores(scores)
        pattern = self.hook_pattern(scores if self.linear else torch.softmax(scores, dim=-1))
        z = self.hook_z(torch.matmul(pattern, v.transpose(1, 2)).transpose(1, 2))
        return torch.addmm(self.b_O, z.reshape(b * p, h * dh), self.W_O.reshape(h * dh, d)).view(b, p, d)


class MLP(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.W_in = nn.Parameter(torch.empty(cfg.d_model, cfg.d_mlp, dtype=cfg.dtype))
        self.b_in = nn.Parameter(torch.zeros(cfg.d_mlp, dtype=cfg.dtype))
        self.W_out = nn.Parameter(torch.empty(cfg.d_mlp, cfg.d_model, dtype=cfg.dtype))
        self.b_out = nn.Parameter(torch.zeros(cfg.d_model, dtype=cfg.dtype))
        self.hook_pre = HookPoint()  # [batch, pos, d_mlp]
        self.hook_post = HookPoint()
        self.approximate = "tanh" if cfg.act_fn == "gelu_new" else "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.hook_pre(x @ self.W_in + self.b_in)
        return self.hook_post(F.gelu(pre, approximate=self.approximate)) @ self.W_out + self.b_out


class Block(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.post_ln = cfg.norm == "post"
        self.attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.ln1 = LayerNorm(cfg)
        self.ln2 = LayerNorm(cfg)
        self.hook_resid_pre = HookPoint()  # [batch, pos, d_model]
        self.hook_attn_out = HookPoint()
        self.hook_resid_mid = HookPoint()
        self.hook_mlp_out = HookPoint()
        self.hook_resid_post = HookPoint()
        if self.post_ln:
            self.hook_normalized_resid_post = HookPoint()

    def forward(self, resid_pre: torch.Tensor) -> torch.Tensor:
        resid_pre = self.hook_resid_pre(resid_pre)
        if self.post_ln:
            resid_mid = self.hook_resid_mid(resid_pre + self.hook_attn_out(self.attn(resid_pre)))
            x = self.ln1(resid_mid)
            resid_post = self.hook_resid_post(x + self.hook_mlp_out(self.mlp(x)))
            return self.hook_normalized_resid_post(self.ln2(resid_post))
        resid_mid = self.hook_resid_mid(resid_pre + self.hook_attn_out(self.attn(self.ln1(resid_pre))))
        return self.hook_resid_post(resid_mid + self.hook_mlp_out(self.mlp(self.ln2(resid_mid))))


class HookedEncoder(HookedRootModule):
    """`model(tokens [batch, pos]) -> predictions [batch, pos]` (scalar read-out) or
    `logits [batch, pos, d_vocab]` (vocabulary read-out), for any pos <= n_ctx."""

    anatomy_source = "mechlrmc"  # `mechlrmc.anatomy`: its parts are its hook points, its groups the whole vocabulary

    def __init__(self, cfg: EncoderConfig | RunConfig, seed: int | None = 0):
        super().__init__()
        if isinstance(cfg, RunConfig):
            cfg = EncoderConfig.from_run_config(cfg)
        self.cfg = cfg
        self.W_E = nn.Parameter(torch.empty(cfg.d_vocab, cfg.d_model, dtype=cfg.dtype))
        self.W_pos = nn.Parameter(torch.empty(cfg.n_ctx, cfg.d_model, dtype=cfg.dtype))
        self.hook_embed = HookPoint()  # [batch, pos, d_model]
        self.hook_pos_embed = HookPoint()
        self.ln_embed = LayerNorm(cfg) if cfg.norm == "post" else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_final = LayerNorm(cfg) if cfg.norm == "pre" else None
        d_out = cfg.d_vocab if cfg.readout == "vocab" else 1
        self.W_U = nn.Parameter(torch.empty(cfg.d_model, d_out, dtype=cfg.dtype))
        self.b_U = nn.Parameter(torch.zeros(d_out, dtype=cfg.dtype)) if cfg.readout_bias else None
        if seed is not None:
            self.init_weights(seed)
        self.setup()

    def sites(self) -> Sites:
        """Where the measures read this model (`mechlrmc.sites`): each block's output ("0", "1",
        ...; after its LayerNorm in the post-LN model), the final LayerNorm ("final", pre-LN), and
        every layer's attention pattern."""
        cfg = self.cfg
        last = "hook_normalized_resid_post" if cfg.norm == "post" else "hook_resid_post"
        hidden = {str(layer): f"blocks.{layer}.{last}" for layer in range(cfg.n_layers)}
        if self.ln_final is not None:
            hidden["final"] = "ln_final"
        return Sites(hidden=hidden, attention=tuple(f"blocks.{layer}.attn.hook_pattern" for layer in range(cfg.n_layers)))

    def init_weights(self, seed: int) -> None:
        """The reference's initialisation. Inside BERT: N(0, init_range) weights, zero biases,
        unit LayerNorm gains, and a zero MASK embedding row when `mask_embedding_zero` (HF's
        padding row). The read-out is a plain `Linear(d_model, 1)` outside BERT, so it gets
        PyTorch's default: weight and bias uniform in +-1/sqrt(d_model).

        `init="gpt"` (minGPT's, the plateau paper's): every weight N(0, init_range), the residual
        output projections W_O and W_out N(0, init_range / sqrt(2 n_layers)), zero biases."""
        generator = torch.Generator().manual_seed(seed)
        if self.cfg.init == "gpt":
            residual = self.cfg.init_range / math.sqrt(2 * self.cfg.n_layers)
            with torch.no_grad():
                for name, p in self.named_parameters():
                    leaf = name.split(".")[-1]
                    if leaf.startswith("W_"):
                        std = residual if leaf in ("W_O", "W_out") else self.cfg.init_range
                        p.copy_(torch.randn(p.shape, generator=generator) * std)
                    elif leaf.startswith("b_") or leaf == "b":
                        p.zero_()
                if self.cfg.mask_embedding_zero:
                    self.W_E[0].zero_()
            return
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.split(".")[-1].startswith("W_") and name != "W_U":
                    p.copy_(torch.randn(p.shape, generator=generator) * self.cfg.init_range)
            bound = 1 / math.sqrt(self.cfg.d_model)
            for p in (self.W_U, self.b_U) if self.b_U is not None else (self.W_U,):
                p.copy_((torch.rand(p.shape, generator=generator) * 2 - 1) * bound)
            if self.cfg.mask_embedding_zero:
                self.W_E[0].zero_()

    @property
    def W_Q(self) -> torch.Tensor:
        return torch.stack([b.attn.W_Q for b in self.blocks])  # [layer, head, d_model, d_head]

    @property
    def W_K(self) -> torch.Tensor:
        return torch.stack([b.attn.W_K for b in self.blocks])

    @property
    def W_V(self) -> torch.Tensor:
        return torch.stack([b.attn.W_V for b in self.blocks])

    @property
    def W_O(self) -> torch.Tensor:
        return torch.stack([b.attn.W_O for b in self.blocks])  # [layer, head, d_head, d_model]

    @property
    def QK(self) -> FactoredMatrix:
        """[layer, head, d_model, d_model] query-key circuits W_Q W_K^T."""
        return FactoredMatrix(self.W_Q, self.W_K.transpose(-2, -1))

    @property
    def OV(self) -> FactoredMatrix:
        """[layer, head, d_model, d_model] output-value circuits W_V W_O."""
        return FactoredMatrix(self.W_V, self.W_O)

    def run_with_cache(
        self, *model_args, return_cache_object: bool = True, remove_batch_dim: bool = False, **kwargs
    ) -> tuple[torch.Tensor, ActivationCache | dict[str, torch.Tensor]]:
        """`(output, ActivationCache)`; takes `names_filter`, `device` and the other options of
        `HookedRootModule.run_with_cache`."""
        out, cache = super().run_with_cache(*model_args, remove_batch_dim=remove_batch_dim, **kwargs)
        if return_cache_object:
            cache = ActivationCache(cache, self, has_batch_dim=not remove_batch_dim)
        return out, cache

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token plus position embedding (plus LayerNorm in the post-LN model) [batch, pos, d_model]."""
        pos = tokens.shape[1]
        if pos > self.cfg.n_ctx:
            raise ValueError(f"sequence length {pos} exceeds the position table: allowed <= n_ctx={self.cfg.n_ctx}")
        padding_idx = 0 if self.cfg.mask_embedding_zero else None
        x = self.hook_embed(F.embedding(tokens, self.W_E, padding_idx=padding_idx))
        pos_embed = self.W_pos[:pos].expand_as(x)  # a broadcast view; hooks get their own copy
        x = x + self.hook_pos_embed(pos_embed.contiguous() if _has_hooks(self.hook_pos_embed) else pos_embed)
        return self.ln_embed(x) if self.ln_embed is not None else x

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        if self.ln_final is not None:
            x = self.ln_final(x)
        if self.cfg.readout == "vocab":
            logits = x @ self.W_U  # [batch, pos, d_vocab]
            return logits + self.b_U if self.b_U is not None else logits
        out = (x @ self.W_U).squeeze(-1)  # [batch, pos]
        return out + self.b_U if self.b_U is not None else out


def model_from_state(
    cfg: EncoderConfig | RunConfig, state: dict[str, torch.Tensor], device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> HookedEncoder:
    """The model of `cfg` holding the weights `state`, in eval mode on `device` (`Run.load_model`,
    `analyses.weights.swaps`). The weights pass through `dtype` on the way in; the parameters keep the
    config's dtype. A ValueError names the missing and unexpected keys when `state` does not fit."""
    model = HookedEncoder(cfg, seed=None)
    missing, unexpected = model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False)
    if missing or unexpected:
        raise ValueError(f"missing {missing}, unexpected {unexpected}")
    model.cfg.device = str(device)
    return model.to(device).eval()
