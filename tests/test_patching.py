import pytest
import torch

from analyses.base.walk import analysis_batch
from analyses.causal.patching import batched_outputs, batched_sweep, corrupt, patch_grid, patching, stock_sweep


@pytest.fixture(scope="module")
def setup(tiny_run):
    model = tiny_run.load_model(40)
    clean = analysis_batch(tiny_run, size=8)
    return model, clean, corrupt(clean, "negate", tiny_run.config.data), tiny_run.config.data


def test_corruptions_keep_the_mask(setup):
    model, clean, negated, cfg = setup
    assert torch.equal(negated.observed, clean.observed)
    assert torch.allclose(negated.values, -clean.values)
    shuffled = corrupt(clean, "shuffle_rows", cfg)
    assert torch.allclose(shuffled.matrices.sort(1).values, clean.matrices.sort(1).values)
    assert not torch.equal(corrupt(clean, "resample", cfg).values, clean.values)


@pytest.mark.parametrize("site", ["resid_pre", "attn_out", "mlp_out", "resid_mid", "z"])
def test_self_patching_is_a_no_op(setup, site):
    model, clean, _, _ = setup
    grans = ["layer", "layer_pos"] + (["layer_head", "layer_pos_head"] if site == "z" else [])
    reference = model(clean.tokens)
    for g in grans:
        patches = patch_grid(model, site, g, clean.tokens.shape[1])
        out = batched_outputs(model, clean.tokens, clean.tokens, site, patches)
        torch.testing.assert_close(out, reference.expand_as(out), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("site,granularity", [
    ("z", "layer_pos_head"), ("z", "layer_head"), ("resid_pre", "layer_pos"), ("attn_out", "layer_pos"),
    ("mlp_out", "layer_pos"), ("resid_mid", "layer_pos"), ("mlp_out", "layer"),
])
def test_batched_and_stock_transformer_lens_agree(setup, site, granularity):
    model, clean, corrupted, _ = setup
    batched = batched_sweep(model, clean, corrupted, site, granularity, max_rows=24)  # several chunks
    stock = stock_sweep(model, clean, corrupted, site, granularity)
    assert len(batched) == len(stock) > 1
    for col in ("recovery_mask", "recovery_obs"):
        assert batched[col].std() > 0  # the sweep measures something
        torch.testing.assert_close(torch.tensor(batched[col].values), torch.tensor(stock[col].values),
                                   atol=1e-4, rtol=1e-4)


def test_patching_everything_restores_the_clean_output(setup):
    model, clean, corrupted, cfg = setup
    frame = patching(model, clean, cfg, sites={"resid_pre": ("layer",)})
    # block 0's input carries all of the input: patching it gives back the clean output exactly
    row = frame[frame.layer == 0].iloc[0]
    assert row.recovery_mask == pytest.approx(1.0, abs=1e-4) and row.recovery_obs == pytest.approx(1.0, abs=1e-4)


def test_patching_any_model_through_its_anatomy_gives_the_batched_numbers(tiny_run):
    """The one-forward-per-patch path every other model takes (`anatomy_outputs`) against the batched
    path of mechlrmc's model, on the same model read as if it were another's."""
    from dataclasses import replace

    from analyses.base.walk import analysis_batch
    from analyses.causal.patching import batched_sweep, corrupt
    from mechlrmc.anatomy import Anatomy

    model = tiny_run.load_model(40)
    batch = analysis_batch(tiny_run, 8)
    corrupted = corrupt(batch, "negate", tiny_run.config.data)
    foreign = replace(Anatomy.of(model), source="transformer_lens")
    for site, granularity in (("z", "layer_head"), ("resid_pre", "layer_pos"), ("mlp_out", "layer")):
        fast = batched_sweep(model, batch, corrupted, site, granularity)
        slow = batched_sweep(model, batch, corrupted, site, granularity, anatomy=foreign)
        assert (fast[["layer", "pos", "head"]].to_numpy() == slow[["layer", "pos", "head"]].to_numpy()).all()
        assert torch.allclose(torch.tensor(fast.recovery_mask.to_numpy()), torch.tensor(slow.recovery_mask.to_numpy()), atol=1e-4), site
        assert fast.recovery_mask.abs().max() > (0.2 if site == "z" else 0.01)  # the patches move the output
