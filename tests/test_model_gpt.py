"""The causal pre-LN variant with a vocabulary read-out is GPT-2: the same weights in
`transformers.GPT2Model` plus an untied linear head give the same logits (like test_model.py's BERT
check), and the other variants (linear attention, GPT init, tanh GELU) do what they say."""

import math

import pytest
import torch

from mechlrmc.config import preset
from mechlrmc.model import HookedEncoder

transformers = pytest.importorskip("transformers")


def gpt_cfg(**model):
    changes = {"model.d_model": 32, "model.n_heads": 4, "model.d_mlp": 64, "model.n_layers": 3,
               "model.attention": "softmax", **{f"model.{k}": v for k, v in model.items()}}
    return preset("mws_tiny").override(changes)


def gpt2_weights_into(model: HookedEncoder, gpt2, head: torch.nn.Linear) -> None:
    """Copy GPT-2's weights (Conv1D: x @ W) into the TransformerLens-shaped parameters."""
    h, d = model.cfg.n_heads, model.cfg.d_model
    dh = d // h
    sd = {"W_E": gpt2.wte.weight, "W_pos": gpt2.wpe.weight[:model.cfg.n_ctx], "W_U": head.weight.T,
          "ln_final.w": gpt2.ln_f.weight, "ln_final.b": gpt2.ln_f.bias}
    for i, block in enumerate(gpt2.h):
        w_q, w_k, w_v = block.attn.c_attn.weight.split(d, dim=1)  # each [d, h * dh]
        b_q, b_k, b_v = block.attn.c_attn.bias.split(d)
        p = f"blocks.{i}."
        sd |= {p + "attn.W_Q": w_q.reshape(d, h, dh).transpose(0, 1), p + "attn.W_K": w_k.reshape(d, h, dh).transpose(0, 1),
               p + "attn.W_V": w_v.reshape(d, h, dh).transpose(0, 1), p + "attn.b_Q": b_q.reshape(h, dh),
               p + "attn.b_K": b_k.reshape(h, dh), p + "attn.b_V": b_v.reshape(h, dh),
               p + "attn.W_O": block.attn.c_proj.weight.reshape(h, dh, d), p + "attn.b_O": block.attn.c_proj.bias,
               p + "mlp.W_in": block.mlp.c_fc.weight, p + "mlp.b_in": block.mlp.c_fc.bias,
               p + "mlp.W_out": block.mlp.c_proj.weight, p + "mlp.b_out": block.mlp.c_proj.bias,
               p + "ln1.w": block.ln_1.weight, p + "ln1.b": block.ln_1.bias,
               p + "ln2.w": block.ln_2.weight, p + "ln2.b": block.ln_2.bias}
    missing, unexpected = model.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, strict=False)
    assert not missing and not unexpected, (missing, unexpected)


def test_causal_pre_ln_softmax_with_vocabulary_readout_is_gpt2():
    cfg = gpt_cfg()
    m = cfg.model
    torch.manual_seed(0)
    gpt2 = transformers.GPT2Model(transformers.GPT2Config(
        vocab_size=cfg.data.vocab_size, n_positions=cfg.n_ctx, n_embd=m.d_model, n_layer=m.n_layers,
        n_head=m.n_heads, n_inner=m.d_mlp, activation_function="gelu_new", layer_norm_epsilon=m.ln_eps,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="eager")).eval()
    head = torch.nn.Linear(m.d_model, cfg.data.vocab_size, bias=False)
    with torch.no_grad():  # move every weight off its init so that each one matters
        for p in [*gpt2.parameters(), *head.parameters()]:
            p.add_(torch.randn_like(p) * 0.2)
    model = HookedEncoder(cfg, seed=None).eval()
    gpt2_weights_into(model, gpt2, head)
    tokens = torch.randint(0, cfg.data.vocab_size, (8, cfg.n_ctx - 1), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for length in (1, 5, cfg.n_ctx - 1, cfg.n_ctx):
            t = torch.cat([tokens, tokens[:, :1]], 1)[:, :length]
            expected = head(gpt2(input_ids=t).last_hidden_state)
            ours = model(t)
            assert ours.shape == (8, length, cfg.data.vocab_size)
            torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)
        cached, cache = model.run_with_cache(tokens)
        torch.testing.assert_close(cached, head(gpt2(input_ids=tokens).last_hidden_state), atol=1e-4, rtol=0)
    assert expected.abs().mean() > 0.1
    pattern = cache["blocks.0.attn.hook_pattern"]  # [batch, head, q, k]
    assert torch.all(pattern.triu(1) == 0) and torch.allclose(pattern.sum(-1), torch.ones(()))


def test_linear_attention_pattern_is_the_scaled_scores_below_the_diagonal():
    model = HookedEncoder(gpt_cfg(attention="linear"), seed=0).eval()
    tokens = torch.randint(0, 7, (4, 12), generator=torch.Generator().manual_seed(0))
    _, cache = model.run_with_cache(tokens)
    q, k = cache["blocks.0.attn.hook_q"], cache["blocks.0.attn.hook_k"]  # [b, pos, h, dh]
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    expected = scores.masked_fill(torch.ones(12, 12, dtype=torch.bool).triu(1), 0.0)
    torch.testing.assert_close(cache["blocks.0.attn.hook_pattern"], expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(cache["blocks.0.attn.hook_attn_scores"], expected, atol=1e-6, rtol=0)


def test_causal_model_output_at_a_position_ignores_later_tokens():
    for attention in ("softmax", "linear"):
        model = HookedEncoder(gpt_cfg(attention=attention), seed=0).eval()
        tokens = torch.randint(0, 7, (2, 12), generator=torch.Generator().manual_seed(0))
        changed = tokens.clone()
        changed[:, 7:] = (changed[:, 7:] + 1) % 7
        with torch.no_grad():
            a, b = model(tokens), model(changed)
        torch.testing.assert_close(a[:, :7], b[:, :7], atol=1e-6, rtol=0)
        assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_gpt_init_and_the_vocabulary_readout_without_bias():
    cfg = preset("mws")  # the paper's model: 1 layer, d_model 256, GPT init, no read-out bias
    model = HookedEncoder(cfg, seed=0)
    assert model.b_U is None and model.W_U.shape == (256, 18) and "b_U" not in model.state_dict()
    residual = 0.02 / math.sqrt(2 * cfg.model.n_layers)
    for name, std in [("W_E", 0.02), ("W_pos", 0.02), ("W_U", 0.02), ("blocks.0.attn.W_Q", 0.02),
                      ("blocks.0.mlp.W_in", 0.02), ("blocks.0.attn.W_O", residual), ("blocks.0.mlp.W_out", residual)]:
        p = model.get_parameter(name)
        assert abs(p.std().item() - std) < 0.1 * std and abs(p.mean().item()) < 0.1 * std, name
    for name, p in model.named_parameters():
        if name.split(".")[-1].startswith("b_") or name.endswith(".b"):
            assert torch.all(p == 0), name
    assert model.blocks[0].mlp.approximate == "tanh"
