from __future__ import annotations

import dataclasses

import pytest
import torch

from analyses.completion.baselines import (compare_baselines, copy_zero_predict, evaluate_ood, model_predict,
    nuclear_norm_complete, nuclear_norms, ood_variants)
from mechlrmc.config import DataConfig, preset
from mechlrmc.model import HookedEncoder
from mechlrmc.tasks.lrmc import MASK_ID, encode_values, sample

DATA = DataConfig(m=4, n=4, rank=1, p_mask=0.3)


def _batch(cfg: DataConfig, size: int, seed: int = 0):
    return sample(cfg, size, torch.Generator().manual_seed(seed))


def test_copy_zero_sits_at_the_plateau_level():
    batch = _batch(DATA, 4000)
    pred = copy_zero_predict(batch)
    assert torch.equal(pred[batch.observed], batch.values[batch.observed])
    mse_mask = float(((pred - batch.values)[batch.masked] ** 2).mean())
    assert mse_mask == pytest.approx(DATA.plateau_mask_loss, rel=0.08)  # r/9, finding 1 (docs/FINDINGS.md)


def test_nuclear_norm_solution_is_feasible_minimal_and_recovers_low_rank():
    batch = _batch(dataclasses.replace(DATA, p_mask=0.15), 48)
    pred = nuclear_norm_complete(batch, progress=False)
    assert torch.allclose(pred[batch.observed], batch.values[batch.observed], atol=1e-4)
    # the truth is feasible, so the minimiser's nuclear norm can only be smaller
    assert (nuclear_norms(pred, 4, 4) <= nuclear_norms(batch.values, 4, 4) + 1e-4).all()
    # with few entries missing, a rank-1 matrix is recovered up to its rounding to 0.01
    err = ((pred - batch.values) ** 2 * batch.masked).sum(-1)
    assert (err < 5e-3).float().mean() > 0.8
    assert float(((pred - batch.values)[batch.masked] ** 2).mean()) < 0.2 * DATA.plateau_mask_loss


def test_smaller_matrices_sit_in_the_top_left_block_of_the_trained_grid():
    torch.manual_seed(0)
    model = HookedEncoder(preset("tiny").override({"data.m": 4, "data.n": 4}), seed=1)
    small = _batch(dataclasses.replace(DATA, m=3, n=3), 8)
    # the same 3 x 3 entries written into a 4 x 4 matrix whose last row and column are masked
    full_values = torch.zeros(8, 4, 4)
    full_values[:, :3, :3] = small.matrices
    full_observed = torch.zeros(8, 4, 4, dtype=torch.bool)
    full_observed[:, :3, :3] = small.observed.view(8, 3, 3)
    tokens = torch.where(full_observed, encode_values(full_values), MASK_ID).view(8, 16)
    block = torch.tensor([0, 1, 2, 4, 5, 6, 8, 9, 10])
    with torch.no_grad():
        expected = model(tokens)[:, block]
    assert torch.allclose(model_predict(model, small, DATA, layout="pad"), expected, atol=1e-5)

    # "gather": only the 9 block positions, each with its grid position embedding
    moved = HookedEncoder(preset("tiny").override({"data.m": 4, "data.n": 4}), seed=1)
    with torch.no_grad():
        moved.W_pos[:9] = model.W_pos[block]
        expected = moved(small.tokens)
    assert torch.allclose(model_predict(model, small, DATA, layout="gather"), expected, atol=1e-5)


def test_larger_matrices_are_refused_with_the_sizes_named():
    model = HookedEncoder(preset("tiny").override({"data.m": 4, "data.n": 4}), seed=1)
    for m, n in ((5, 4), (4, 6)):
        batch = _batch(dataclasses.replace(DATA, m=m, n=n), 2)
        with pytest.raises(ValueError, match=rf"{m} x {n} matrix does not fit the model's 4 x 4"):
            model_predict(model, batch, DATA)
    variants = ood_variants(DATA)
    assert set(variants) == {"in-distribution", "rank 2", "3 rows", "3 columns", "gaussian", "laplace"}


def test_reference_model_beats_copy_zero_only_after_the_drop(reference_run):
    """Findings 2-3 (docs/FINDINGS.md): on the plateau the model is the copy-and-zero predictor; after the
    drop it completes masked entries at every p_mask, and its errors differ from nuclear norm."""
    data = reference_run.config.data
    p_masks = (0.1, 0.3, 0.6)
    plateau = compare_baselines(reference_run.load_model(1000), data, p_masks, n_matrices=64, progress=False)
    final = compare_baselines(reference_run.load_model(reference_run.steps[-1]), data, p_masks,
                              n_matrices=64, progress=False)
    for frame in (plateau, final):
        assert set(frame.predictor) == {"model", "nuclear_norm", "copy_zero", "truth"}
        assert (frame[frame.predictor == "truth"].mse == 0).all()
    mse = {name: f.pivot(index="p_mask", columns="predictor", values="mse_mask") for name, f in
           (("plateau", plateau), ("final", final))}
    assert ((mse["plateau"].model / mse["plateau"].copy_zero - 1).abs() < 0.1).all()
    final_mse = mse["final"]
    # it beats copy-and-zero everywhere, and closes at least half of the gap between copy-and-zero
    # and nuclear norm (at p_mask 0.6 only ~6 of 16 entries are seen and even nuclear norm is poor)
    assert (final_mse.model < 0.9 * final_mse.copy_zero).all()
    assert (final_mse.copy_zero - final_mse.model > 0.5 * (final_mse.copy_zero - final_mse.nuclear_norm)).all()
    to_nn = final[final.predictor == "model"].mse_mask_to_nuclear
    assert (to_nn > 1e-3).all()  # not the nuclear-norm solution


def test_ood_table_covers_the_paper_variants(reference_run):
    model = reference_run.load_model(reference_run.steps[-1])
    frame = evaluate_ood(model, reference_run.config.data, n_matrices=32, progress=False)
    assert set(frame.variant) == set(ood_variants(reference_run.config.data))
    assert len(frame) == 4 * len(set(frame.variant))
    assert frame[["mse", "mse_mask", "nuclear_norm"]].notna().all().all()
    shapes = frame.drop_duplicates("variant").set_index("variant")
    assert (shapes.loc["3 rows", ["m", "n"]] == [3, 4]).all()
    assert shapes.loc["gaussian", "distribution"] == "gaussian"
