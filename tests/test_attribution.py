import dataclasses

import pandas as pd
import pytest
import torch

from analyses.base.walk import analysis_batch
from analyses.causal.agreement import (FAILS_PEARSON, HOLDS_PEARSON, attribution_agreement, attribution_verdict,
    compare_with_patching)
from analyses.causal.attribution import attribution, attribution_sweep
from analyses.causal.integrated_gradients import (diagonal_groups, integrated_gradients_sweep,
    joint_integrated_gradients_sweep)
from analyses.causal.patching import (DEFAULT_SITES, GRANULARITIES, SITES, batched_sweep, corrupt, hook_name,
    patch_grid, patch_masks, patching, recovery_metrics)
from mechlrmc.config import preset
from mechlrmc.errors import OptionError
from mechlrmc.model import HookedEncoder
from mechlrmc.tasks.lrmc import sample

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
    mask = patch_masks([patch], clean.tokens.shape[1], model.cfg.n_heads, site)[0][None, ..., None]  # [1, pos, (h,) 1]

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
        patches = patch_grid(model, site, g, clean.tokens.shape[1])
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
    import analyses.causal.attribution

    assert analyses.causal.attribution.DEFAULT_SITES is DEFAULT_SITES


# ----- integrated gradients ----------------------------------------------------------------------

def _sharpened_model(scale: float = 16.0, n_layers: int = 2) -> HookedEncoder:
    """The tiny encoder with every weight matrix scaled up: GELU and LayerNorm bend hard, so a
    patch's effect is far from linear in the patched activation (a planted nonlinear case)."""
    cfg = preset("tiny")
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, n_layers=n_layers))
    model = HookedEncoder(cfg, seed=3).to(torch.float64)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(scale)
    return model


@pytest.mark.parametrize("sweep", ["integrated_gradients_sweep", "joint_integrated_gradients_sweep"])
def test_integrated_gradients_with_one_step_is_attribution(setup, sweep):
    """Both path estimators (per layer, and every layer on one path) reduce to first order at 1 step."""
    model, clean, corrupted, _ = setup
    first = attribution_sweep(model, clean, corrupted, ALL_SITES)
    one = {"integrated_gradients_sweep": integrated_gradients_sweep,
           "joint_integrated_gradients_sweep": joint_integrated_gradients_sweep}[sweep](
        model, clean, corrupted, ALL_SITES, steps=1)
    pd.testing.assert_frame_equal(one.drop(columns=["recovery_mask", "recovery_obs"]),
                                  first.drop(columns=["recovery_mask", "recovery_obs"]))
    for col in ("recovery_mask", "recovery_obs"):
        torch.testing.assert_close(torch.tensor(one[col].to_numpy()), torch.tensor(first[col].to_numpy()),
                                   atol=1e-10, rtol=1e-7)


def test_integrated_gradients_matches_exact_where_first_order_misses():
    """Where each patch moves alone along its own path (whole layers; single positions with one
    position per group), the integral converges to exact patching; first order visibly does not."""
    model = _sharpened_model()
    cfg = preset("tiny").data
    clean = sample(cfg, 8, torch.Generator().manual_seed(5))
    corrupted = corrupt(clean, "negate", cfg)
    alone = torch.eye(clean.tokens.shape[1], dtype=torch.bool)
    sites = {"resid_pre": ("layer", "layer_pos"), "mlp_out": ("layer", "layer_pos")}
    exact = pd.concat([batched_sweep(model, clean, corrupted, s, g).assign(site=s, granularity=g)
                       for s, grans in sites.items() for g in grans], ignore_index=True)
    first = attribution_sweep(model, clean, corrupted, sites)
    coarse, fine = (integrated_gradients_sweep(model, clean, corrupted, sites, steps=k, groups=alone) for k in (4, 64))
    x = exact.recovery_mask.to_numpy()
    err = {name: abs(f.recovery_mask.to_numpy() - x).max() for name, f in
           (("first", first), ("coarse", coarse), ("fine", fine))}
    assert abs(x).max() > 0.2
    assert err["first"] > 0.1 and exact.recovery_mask.corr(first.recovery_mask) < 0.95
    assert err["fine"] < 0.01 and exact.recovery_mask.corr(fine.recovery_mask) > 0.999
    assert err["fine"] < err["coarse"] < err["first"]  # the Riemann sum converges with the steps
    torch.testing.assert_close(torch.tensor(fine.recovery_obs.to_numpy()), torch.tensor(exact.recovery_obs.to_numpy()),
                               atol=0.01, rtol=0.0)


def test_default_groups_keep_rows_and_columns_apart():
    for m, n in ((3, 3), (2, 5), (4, 3)):
        groups = diagonal_groups(m, n)
        assert groups.shape == (max(m, n), m * n) and (groups.sum(0) == 1).all()
        for group in groups:
            rows, cols = group.nonzero().squeeze(1) // n, group.nonzero().squeeze(1) % n
            assert len(set(rows.tolist())) == len(rows) and len(set(cols.tolist())) == len(cols)


def test_integrated_gradients_zero_when_clean_equals_corrupted(setup):
    model, clean, _, _ = setup
    frame = integrated_gradients_sweep(model, clean, clean, {"z": ("layer_head", "layer_pos_head")}, steps=2)
    assert (frame[["recovery_mask", "recovery_obs"]] == 0).all().all()


@pytest.mark.parametrize("kwargs, message", [
    ({"steps": 0}, "steps=0"), ({"steps": 2.5}, "steps=2.5"),
    ({"groups": torch.ones(2, 9, dtype=torch.bool)}, "groups of shape (2, 9)"),  # not a partition
    ({"groups": torch.ones(1, 4, dtype=torch.bool)}, "groups of shape (1, 4)"),  # 9 positions
])
def test_integrated_gradients_rejects_bad_options(setup, kwargs, message):
    model, clean, corrupted, _ = setup
    with pytest.raises(OptionError, match=message.replace("(", r"\(").replace(")", r"\)")):
        integrated_gradients_sweep(model, clean, corrupted, {"z": ("layer_head",)}, **kwargs)


def test_agreement_covers_both_estimators(setup):
    model, clean, _, cfg = setup
    frame = compare_with_patching(model, clean, cfg, sites={"z": ("layer_pos_head",)}, steps=2)
    assert {"exact", "attribution", "integrated_gradients", "joint_integrated_gradients"} <= set(frame.columns)
    table = attribution_agreement(frame)
    assert sorted(set(table.estimator)) == ["attribution", "integrated_gradients", "joint_integrated_gradients"]
    assert len(table) == 6 and table.patches.eq(len(frame) / 2).all()
    verdict = attribution_verdict(table[table.metric == "recovery_mask"].assign(step=40), {"end": 40})
    assert list(verdict.columns[:4]) == ["moment", "step", "estimator", "site"] and len(verdict) <= 3


def test_registry_section_shows_both_estimators(tiny_run):
    from analyses.base.context import QUICK, Context
    from analyses.base.registry import get

    ctx = Context(tiny_run, QUICK, progress=False)
    tables = get("attribution").compute(ctx)
    estimators = {"attribution", "integrated_gradients", "joint_integrated_gradients"}
    assert set(tables["attribution_agreement"].estimator) == estimators
    assert set(tables["attribution_verdict"].estimator) <= estimators
    frame, paths = tables["attribution"], ["integrated_gradients", "joint_integrated_gradients"]
    masked = frame.metric == "recovery_mask"  # the section's paths follow the metric it compares and draws
    assert frame.loc[masked, paths].notna().all().all() and frame.loc[~masked, paths].isna().all().all()
    assert frame[["exact", "attribution"]].notna().all().all()
    parts = get("attribution").draw(ctx, tables)
    assert {"attribution_last", "integrated_gradients_last", "joint_integrated_gradients_last"} <= set(parts)
    assert estimators == set(parts["attribution_table"].index.get_level_values("estimator"))


# ----- joint integrated gradients (all layers of a site on one path) ----------------------------

def test_joint_integrated_gradients_is_the_layer_path_for_one_layer():
    """With one layer the joint path is that layer's own path: the same estimate as
    `integrated_gradients_sweep`, whose shared alpha = 0 point and row chunks change nothing."""
    model = _sharpened_model(n_layers=1)
    cfg = preset("tiny").data
    clean = sample(cfg, 8, torch.Generator().manual_seed(5))
    corrupted = corrupt(clean, "negate", cfg)
    sites = {"resid_pre": ("layer", "layer_pos"), "z": ("layer_head", "layer_pos_head")}
    per_layer = integrated_gradients_sweep(model, clean, corrupted, sites, steps=4)
    joint = joint_integrated_gradients_sweep(model, clean, corrupted, sites, steps=4, max_rows=24)  # 3 rows a chunk
    assert per_layer.recovery_mask.abs().max() > 0.1
    for col in ("recovery_mask", "recovery_obs"):
        torch.testing.assert_close(torch.tensor(joint[col].to_numpy()), torch.tensor(per_layer[col].to_numpy()),
                                   atol=1e-10, rtol=1e-7)


def test_joint_integrated_gradients_beats_first_order_where_the_path_bends():
    """On the planted nonlinear two-layer model the joint path's estimate is much closer to exact
    patching than first order (what it still misses is the interaction between the layers, which
    the per-layer paths of `integrated_gradients_sweep` do not have); the metric left out is NaN."""
    model = _sharpened_model()
    cfg = preset("tiny").data
    clean = sample(cfg, 8, torch.Generator().manual_seed(5))
    corrupted = corrupt(clean, "negate", cfg)
    sites = {"resid_pre": ("layer", "layer_pos"), "attn_out": ("layer", "layer_pos"), "mlp_out": ("layer_pos",)}
    exact = pd.concat([batched_sweep(model, clean, corrupted, s, g) for s, grans in sites.items() for g in grans],
                      ignore_index=True)
    first = attribution_sweep(model, clean, corrupted, sites)
    joint = joint_integrated_gradients_sweep(model, clean, corrupted, sites, steps=8, metrics=("recovery_mask",))
    both = joint_integrated_gradients_sweep(model, clean, corrupted, sites, steps=8)
    assert joint.recovery_obs.isna().all() and both.recovery_obs.notna().all()
    assert all(p.requires_grad for p in model.parameters())  # left as it was
    assert (joint.recovery_mask == both.recovery_mask).all()
    x = exact.recovery_mask.to_numpy()
    err_first, err_joint = (abs(f.recovery_mask.to_numpy() - x).max() for f in (first, joint))
    assert abs(x).max() > 0.2 and err_first > 0.1
    r_first, r_joint = (exact.recovery_mask.corr(f.recovery_mask) for f in (first, joint))
    assert err_joint < err_first / 1.5 and r_first < 0.95 and r_joint > 0.97


@pytest.mark.parametrize("kwargs, message", [
    ({"steps": 0}, "steps=0"), ({"metrics": ()}, r"metrics=\(\)"), ({"metrics": ("loss",)}, "metrics=\\('loss',\\)"),
    ({"groups": torch.ones(2, 9, dtype=torch.bool)}, r"groups of shape \(2, 9\)"),
])
def test_joint_integrated_gradients_rejects_bad_options(setup, kwargs, message):
    model, clean, corrupted, _ = setup
    with pytest.raises(OptionError, match=message):
        joint_integrated_gradients_sweep(model, clean, corrupted, {"z": ("layer_head",)}, **kwargs)


def test_every_estimator_through_the_anatomy_gives_mechlrmcs_numbers(tiny_run):
    """The paths every other model takes (a forward from the tokens, sites read through the anatomy)
    against mechlrmc's model's own (hook names, forwards restarted inside the blocks), on the same model."""
    from dataclasses import replace

    from analyses.base.walk import analysis_batch
    from analyses.causal.agreement import compare_with_patching
    from mechlrmc.anatomy import Anatomy

    model = tiny_run.load_model(40)
    batch = analysis_batch(tiny_run, 8)
    own = compare_with_patching(model, batch, tiny_run.config.data, steps=2)
    foreign = compare_with_patching(model, batch, tiny_run.config.data, steps=2,
                                    anatomy=replace(Anatomy.of(model), source="transformer_lens"))
    assert len(own) == len(foreign) > 0
    for column in ("exact", "attribution", "integrated_gradients", "joint_integrated_gradients"):
        gap = (own[column] - foreign[column]).abs().max()
        assert gap < 1e-4 * max(1.0, own[column].abs().max()), (column, gap)
    assert own.integrated_gradients.abs().max() > 0.05
