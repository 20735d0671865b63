import pytest
import torch
from transformer_lens import ActivationCache, FactoredMatrix, patching

from mechlrmc.config import preset
from mechlrmc.convert import from_reference_state_dict
from mechlrmc.model import HookedEncoder
from mechlrmc.tasks.lrmc import sample, split_losses

transformers = pytest.importorskip("transformers")


def small_cfg():
    return preset("tiny").override(["model.d_model=32", "model.n_heads=4", "model.d_mlp=48", "model.n_layers=3"])


def reference_bert(cfg, type_vocab_size, seed=0):
    torch.manual_seed(seed)
    bert = transformers.BertModel(
        transformers.BertConfig(
            vocab_size=cfg.data.vocab_size, hidden_size=cfg.model.d_model,
            num_hidden_layers=cfg.model.n_layers, num_attention_heads=cfg.model.n_heads,
            intermediate_size=cfg.model.d_mlp, max_position_embeddings=cfg.data.seq_len + 3,
            type_vocab_size=type_vocab_size, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
            attn_implementation="eager",
        ),
        add_pooling_layer=type_vocab_size > 0,
    ).eval()
    with torch.no_grad():  # move every weight off its init so that each one matters
        for p in bert.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    read_out = torch.nn.Linear(cfg.model.d_model, 1)
    return bert, read_out


@pytest.mark.parametrize("type_vocab_size, prefix", [(2, "_backbone."), (1, ""), (0, "_backbone.")])
def test_same_outputs_as_hf_bert(type_vocab_size, prefix):
    cfg = small_cfg()
    bert, read_out = reference_bert(cfg, max(type_vocab_size, 1))
    sd = {prefix + k: v for k, v in bert.state_dict().items()}
    if type_vocab_size == 0:
        sd = {k: v for k, v in sd.items() if "token_type" not in k}
        with torch.no_grad():
            bert.embeddings.token_type_embeddings.weight.zero_()
    sd["read_out.weight"], sd["read_out.bias"] = read_out.weight, read_out.bias
    model = from_reference_state_dict(sd, cfg).eval()
    tokens = sample(cfg.data, 16, torch.Generator().manual_seed(0)).tokens
    with torch.no_grad():
        expected = read_out(bert(input_ids=tokens).last_hidden_state).squeeze(-1)
        ours = model(tokens)
        cached, cache = model.run_with_cache(tokens)  # the hooked LayerNorm path
    assert expected.abs().mean() > 0.1
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(cached, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        cache["blocks.2.hook_normalized_resid_post"],
        bert(input_ids=tokens, output_hidden_states=True).hidden_states[3], atol=1e-5, rtol=0,
    )


def test_import_rejects_wrong_shapes():
    cfg = small_cfg()
    bert, read_out = reference_bert(cfg, 2)
    sd = {**bert.state_dict(), "read_out.weight": read_out.weight, "read_out.bias": read_out.bias}
    with pytest.raises(ValueError, match="d_model"):
        from_reference_state_dict(sd, cfg.override(["model.d_model=64", "model.d_mlp=48"]))


@pytest.fixture
def model_and_batch():
    cfg = small_cfg()
    model = HookedEncoder(cfg, seed=3).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model, sample(cfg.data, 6, torch.Generator().manual_seed(1))


def test_run_with_cache_is_an_activation_cache(model_and_batch):
    model, batch = model_and_batch
    out, cache = model.run_with_cache(batch.tokens)
    assert isinstance(cache, ActivationCache)
    b, p, h = 6, 9, 4
    assert cache["pattern", 1].shape == (b, h, p, p)
    assert cache["z", 0].shape == (b, p, h, 8) and cache["q", 2].shape == (b, p, h, 8)
    assert cache["resid_post", 2].shape == (b, p, 32) and cache["post", 0].shape == (b, p, 48)
    torch.testing.assert_close(cache["pattern", 0].sum(-1), torch.ones(b, h, p))
    assert not torch.allclose(cache["pattern", 0], cache["pattern", 0].triu())  # bidirectional
    # names filter caches only what is asked
    _, some = model.run_with_cache(batch.tokens, names_filter=lambda n: n.endswith("hook_pattern"))
    assert set(some.keys()) == {f"blocks.{l}.attn.hook_pattern" for l in range(3)}


def test_hooks_change_the_output(model_and_batch):
    model, batch = model_and_batch
    clean = model(batch.tokens)
    zeroed = model.run_with_hooks(batch.tokens, fwd_hooks=[("blocks.1.attn.hook_z", lambda z, hook: z * 0)])
    assert (clean - zeroed).abs().max() > 1e-3
    torch.testing.assert_close(model(batch.tokens), clean)  # hooks were removed


def test_stock_transformer_lens_patching_runs_on_the_model(model_and_batch):
    model, batch = model_and_batch
    corrupted = batch.tokens.flip(0)
    _, clean_cache = model.run_with_cache(batch.tokens)
    clean = model(batch.tokens)

    def metric(pred):
        return -(pred - clean).pow(2).mean()

    resid = patching.get_act_patch_resid_pre(model, corrupted, clean_cache, metric)
    assert resid.shape == (3, 9)
    heads = patching.get_act_patch_attn_head_out_all_pos(model, corrupted, clean_cache, metric)
    assert heads.shape == (3, 4)
    # patching every position of layer 0's residual stream restores the clean output exactly
    full = patching.generic_activation_patch(
        model, corrupted, clean_cache, metric,
        patch_setter=lambda act, index, clean_act: clean_act,
        activation_name="resid_pre", index_axis_names=("layer",),
    )
    assert float(full[0]) == pytest.approx(0.0, abs=1e-10)
    with torch.no_grad():
        assert float(metric(model(corrupted))) < -1e-4
    # patching into the clean run itself changes nothing
    self_patch = patching.get_act_patch_resid_pre(model, batch.tokens, clean_cache, metric)
    assert self_patch.abs().max() < 1e-10


def test_factored_matrix_circuits(model_and_batch):
    model, _ = model_and_batch
    ov, qk = model.OV, model.QK
    assert isinstance(ov, FactoredMatrix) and ov.shape == (3, 4, 32, 32)
    explicit = model.blocks[1].attn.W_V[2] @ model.blocks[1].attn.W_O[2]
    torch.testing.assert_close(ov[1, 2].AB, explicit)
    torch.testing.assert_close(qk[0, 1].AB, model.blocks[0].attn.W_Q[1] @ model.blocks[0].attn.W_K[1].T)
    assert (ov[1, 2].S > 1e-6).sum() == 8  # rank d_head


def test_mask_embedding_is_zero_and_untrained():
    cfg = preset("tiny")
    model = HookedEncoder(cfg, seed=0)
    assert model.W_E[0].abs().max() == 0 and model.W_E[1].abs().max() > 0
    batch = sample(cfg.data, 32, torch.Generator().manual_seed(0))
    split_losses(model(batch.tokens), batch.values, batch.observed)["loss"].backward()
    assert model.W_E.grad[0].abs().max() == 0 and model.W_E.grad[batch.tokens[batch.observed][0]].abs().max() > 0
    free = HookedEncoder(cfg.override(["model.mask_embedding_zero=false"]), seed=0)
    assert free.W_E[0].abs().max() > 0
    split_losses(free(batch.tokens), batch.values, batch.observed)["loss"].backward()
    assert free.W_E.grad[0].abs().max() > 0


def test_pre_ln_variant_runs_and_differs():
    cfg = preset("tiny").override(["model.norm=pre"])
    model = HookedEncoder(cfg, seed=0)
    assert model.ln_embed is None and model.ln_final is not None
    out, cache = model.run_with_cache(sample(cfg.data, 2, torch.Generator()).tokens)
    assert out.shape == (2, 9) and "ln_final.hook_normalized" in cache.keys()


def test_sequence_longer_than_position_table_is_a_clear_error():
    model = HookedEncoder(preset("tiny"), seed=0)
    with pytest.raises(ValueError, match="n_ctx=9"):
        model(torch.ones(1, 16, dtype=torch.long))
