import dataclasses

import pandas as pd
import pytest
import torch

from analyses.attribution import FAILS_PEARSON, HOLDS_PEARSON, attribution, attribution_agreement, \
    attribution_sweep, attribution_verdict, compare_with_patching
from analyses.patching import DEFAULT_SITES, GRANULARITIES, SITES, _masks, _patch_grid, batched_sweep, corrupt, \
    hook_name, patching, recovery_metrics
from analyses.walk import analysis_batch
from mechlrmc.config import preset
from mechlrmc.tasks.lrmc import sample
from mechlrmc.model import HookedEncoder

ALL_SITES = {s: tuple(g for g in GRANULARITIES if "head" not in g or s == "z") for s in SITES}


@pytest.fixture(scope="module")
def setup(tiny_run):
    model = tiny_run.load_model(40).to(torch.float64)
    clean = analysis_batch(tiny_run, size=6)
    return model, clean, corrupt(clean, "negate", tiny_run.config.data), tiny_run.config.data


def test_same_table_as_patching(setup):
    model, clean, _, cfg = setup
    exact = patching(model, clean, cfg)
    approx = attribution(model, clean, cfg)
    assert list(approx.columns) == [*exact.columns, "method"] and (approx.method == "attribution").all()
    keys = ["site", "granularity", "layer", "pos", "head"]
    pd.testing.assert_frame_equal(approx[keys], exact[keys])


def test_zero_when_clean_equals_corrupted(setup):
    model, clean, _, _ = setup
    frame = attribution_sweep(model, clean, clean, ALL_SITES)
    assert len(frame) > 100
    assert (frame[["recovery_mask", "recovery_obs"]] == 0).all().all()


def _interpolated_recovery(model, clean, corrupted, site, patch, alpha):
    """Exact recovery when the patched entries move a fraction alpha of the way to clean."""
    name = hook_name(site, patch[0])
    _, cache = model.run_with_cache(clean.tokens, names_filter=lambda n: n == name)
    mask = _masks([patch], clean.tokens.shape[1], model.cfg.n_heads, site)[0][None, ..., None]  # [1, pos, (h,) 1]

    def nudge(act, hook):
        return torch.where(mask, act + alpha * (cache[name] - act), act)

    with model.hooks(fwd_hooks=[(name, nudge)]):
        pred = model(corrupted.tokens)
    metrics = recovery_metrics(model(clean.tokens), model(corrupted.tokens), clean.observed)
    return torch.stack([metrics["recovery_mask"](pred), metrics["recovery_obs"](pred)])


@pytest.mark.parametrize("site", SITES)
def test_matches_a_finite_difference(setup, site):
    """The estimate is the derivative of recovery along the straight path from corrupted to clean."""
    model, clean, corrupted, _ = setup
    grans = ALL_SITES[site]
    frame = attribution_sweep(model, clean, corrupted, {site: grans})
    checked = 0
    for g in grans:
        part = frame[frame.granularity == g].reset_index(drop=True)
        patches = _patch_grid(model, site, g, clean.tokens.shape[1])
        for k in range(0, len(patches), max(1, len(patches) // 5)):
            eps = 1e-4
            slope = (_interpolated_recovery(model, clean, corrupted, site, patches[k], eps)
                     - _interpolated_recovery(model, clean, corrupted, site, patches[k], -eps)) / (2 * eps)
            got = torch.tensor(part.loc[k, ["recovery_mask", "recovery_obs"]].to_numpy(dtype=float), dtype=slope.dtype)
            torch.testing.assert_close(got, slope, atol=1e-6, rtol=1e-4)
            checked += 1
    assert checked >= 5


def test_exact_where_the_output_is_linear_in_the_site():
    """Without a final LayerNorm a pre-LN model reads the last MLP output and residual stream out
    linearly: there the first-order estimate is exact patching, however large the patch."""
    cfg = preset("tiny")
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, norm="pre"))
    model = HookedEncoder(cfg, seed=3).to(torch.float64)
    model.ln_final = None
    clean = sample(cfg.data, 8, torch.Generator().manual_seed(5))  # corrupt() resamples from seed 0
    corrupted = corrupt(clean, "resample", cfg.data)
    last = model.cfg.n_layers - 1
    for site in ("mlp_out", "resid_post"):
        for g in ("layer", "layer_pos"):
            exact = batched_sweep(model, clean, corrupted, site, g)
            approx = attribution_sweep(model, clean, corrupted, {site: (g,)})
            at_last = (exact.layer == last).to_numpy()
            assert exact.loc[at_last, "recovery_mask"].abs().max() > 0.01
            for col in ("recovery_mask", "recovery_obs"):
                torch.testing.assert_close(torch.tensor(approx[col].to_numpy()[at_last]),
                                           torch.tensor(exact[col].to_numpy()[at_last]), atol=1e-9, rtol=1e-7)
            if g == "layer":  # and not before it: the MLPs in between bend the path
                assert not torch.allclose(torch.tensor(approx.recovery_mask.to_numpy()[~at_last]),
                                          torch.tensor(exact.recovery_mask.to_numpy()[~at_last]), atol=1e-3)


def test_agreement_table(setup):
    model, clean, _, cfg = setup
    frame = compare_with_patching(model, clean, cfg, sites={"z": ("layer_pos_head",)})
    table = attribution_agreement(frame)
    assert set(table.metric) == {"recovery_mask", "recovery_obs"}
    assert table.patches.eq(len(frame) / 2).all()
    assert table.pearson.between(-1, 1).all()


def test_agreement_correlations_are_pearson_and_spearman_of_ranks():
    exact = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]
    frame = pd.DataFrame({"site": "z", "granularity": "layer", "metric": "recovery_mask", "exact": exact,
                          "attribution": [v ** 3 for v in exact]})  # monotone, not linear
    row = attribution_agreement(frame).iloc[0]
    assert row.spearman == pytest.approx(1.0) and 0.9 < row.pearson < 1.0
    assert row.pearson == pytest.approx(torch.corrcoef(torch.tensor([exact, [v ** 3 for v in exact]]))[0, 1].item())
    flat = attribution_agreement(frame.assign(attribution=0.3)).iloc[0]
    assert pd.isna(flat.pearson) and pd.isna(flat.spearman) and flat.slope == pytest.approx(0.3 * 1.5 / 0.55)


def test_verdict_per_moment_and_site():
    agreement = pd.DataFrame({
        "step": [10, 10, 10, 10, 40, 40],
        "site": ["z", "attn_out", "mlp_out", "resid_pre", "z", "attn_out"],
        "granularity": ["layer_head", "layer", "layer", "layer", "layer_head", "layer"],
        "pearson": [HOLDS_PEARSON, FAILS_PEARSON, FAILS_PEARSON - 0.01, float("nan"), 0.99, -0.2],
    })
    verdict = attribution_verdict(agreement, {"plateau": 10, "after": 40, "unused": 20})
    assert list(verdict.columns) == ["moment", "step", "site", "granularity", "pearson", "verdict"]
    assert verdict[["moment", "step", "site", "verdict"]].values.tolist() == [
        ["plateau", 10, "z", "holds"], ["plateau", 10, "attn_out", "partial"], ["plateau", 10, "mlp_out", "fails"],
        ["after", 40, "z", "holds"], ["after", 40, "attn_out", "fails"]]
    assert (HOLDS_PEARSON, FAILS_PEARSON) == (0.9, 0.5)


def test_default_sites_are_patchings():
    import analyses.attribution

    assert analyses.attribution.DEFAULT_SITES is DEFAULT_SITES
