import math

import pandas as pd
import pytest
import torch

from analyses.base.walk import across_checkpoints
from analyses.llc.calibrate import Calibration, calibrate, flat_after_burnin, relaxes
from analyses.llc.components import component_llc, component_masks
from analyses.llc.data import SGLDConfig
from analyses.llc.estimator import llc_per_step, local_learning_coefficient
from analyses.llc.figures import plot_llc
from analyses.llc.known import dln_learning_coefficient, dln_posterior_llc, rrr_learning_coefficient
from analyses.llc.sampler import llc_from_traces, sgld_traces
from mechlrmc.errors import OptionError

DIAGNOSTICS = ["diverged", "flat", "stable", "localization_ok", "ok"]


def _regression(d_in: int, n: int = 2000, seed: int = 0, noise: float = 0.5, scale: float = 1.0, mean: float = 0.0,
                spread: float = 1.0):
    """Least-squares fit of a linear model (d_in weights + a bias) to noisy Gaussian data (inputs of
    standard deviation `scale` and mean `mean`, feature j scaled by spread^(j / (d_in - 1))): a
    regular model with d = d_in + 1 parameters at its minimum."""
    g = torch.Generator().manual_seed(seed)
    x = scale * (torch.randn(n, d_in, generator=g) + mean) * torch.logspace(0, math.log10(spread), d_in)
    y = x @ torch.randn(d_in, generator=g) + 0.3 + noise * torch.randn(n, generator=g)
    model = torch.nn.Linear(d_in, 1)
    design = torch.cat([x, torch.ones(n, 1)], 1).double()
    solution = torch.linalg.lstsq(design, y[:, None].double()).solution[:, 0].float()
    with torch.no_grad():
        model.weight.copy_(solution[:-1][None])
        model.bias.copy_(solution[-1:])
    return model, (x, y)


@pytest.mark.parametrize("d_in", [4, 15])
def test_regular_model_has_llc_half_its_dimension(d_in):
    """SGLD step 5e-4 at nbeta 100 on a Hessian of 2 I leaves ~5 % discretisation bias (measured
    +6 % at d = 5 and d = 16); localization 1 is negligible against nbeta * 2 = 200."""
    model, data = _regression(d_in)
    before = [p.detach().clone() for p in model.parameters()]
    config = SGLDConfig(num_chains=4, num_burnin=200, num_draws=800, lr=5e-4, localization=1.0,
                        batch_size=200, nbeta=100.0)
    frame = local_learning_coefficient(model, data, config)
    d = d_in + 1
    assert len(frame) == 4 and frame.llc_mean.nunique() == 1
    assert frame.llc_mean.iloc[0] == pytest.approx(d / 2, rel=0.2)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the model is left alone


def test_loader_and_overrides(tiny_run):
    model = tiny_run.load_model(40)
    from analyses.base.walk import analysis_batch

    batch = analysis_batch(tiny_run, 64)
    loader = [batch[i:i + 16] for i in range(0, 64, 16)]
    frame = local_learning_coefficient(model, loader, calibrate=False, num_chains=2, num_burnin=2, num_draws=4,
                                       batch_size=16)
    assert list(frame.chain) == [0, 1] and (frame.num_draws == 4).all() and frame.llc.notna().all()
    with pytest.raises(ValueError, match="lr=-1"):
        local_learning_coefficient(model, batch, calibrate=False, lr=-1)


def test_maps_over_a_run(tiny_run):
    frame = across_checkpoints(tiny_run, local_learning_coefficient, steps=[0, 40], progress=False,
                               calibrate=False, num_chains=2, num_burnin=2, num_draws=3)
    assert list(frame.step.unique()) == [0, 40] and len(frame) == 4
    traces = across_checkpoints(tiny_run, sgld_traces, steps=[40], progress=False, num_chains=2, num_burnin=2,
                                num_draws=3)
    assert len(traces) == 2 * 5 and traces.burnin.sum() == 4
    pd.testing.assert_series_equal(llc_from_traces(traces).llc, frame[frame.step == 40].llc.reset_index(drop=True))


def _traces(step: int, chain_levels: list[float], init_loss: float, nbeta: float) -> pd.DataFrame:
    """Traces whose draws sit at a known loss per chain; the burn-in is far off so it must be skipped."""
    rows = [(chain, i, 100.0 if i < 2 else level + (0.01 if i % 2 else -0.01), i < 2)
            for chain, level in enumerate(chain_levels) for i in range(6)]
    frame = pd.DataFrame(rows, columns=["chain", "sgld_step", "loss", "burnin"])
    return frame.assign(init_loss=init_loss, nbeta=nbeta, step=step)


def test_llc_per_step_averages_the_chains_of_each_checkpoint():
    traces = pd.concat([_traces(40, [1.5, 2.5], init_loss=1.0, nbeta=10.0),  # chains: LLC 5 and 15
                        _traces(0, [3.0, 3.0, 3.0], init_loss=2.0, nbeta=4.0),  # LLC 4, 4, 4
                        _traces(10, [0.5], init_loss=0.25, nbeta=2.0)], ignore_index=True)  # one chain: LLC 0.5
    table = llc_per_step(traces.sample(frac=1, random_state=0))
    assert list(table.columns) == ["step", "llc_mean", "llc_std", "llc_se", "init_loss", *DIAGNOSTICS]
    assert not table.ok.any() and table.stable.isna().all()  # uncalibrated settings are never ok
    assert table.step.tolist() == [0, 10, 40]
    assert table.llc_mean.tolist() == pytest.approx([4.0, 0.5, 10.0])
    assert table.llc_std.iloc[0] == pytest.approx(0.0) and pd.isna(table.llc_std.iloc[1])
    assert table.llc_std.iloc[2] == pytest.approx(50 ** 0.5)  # sample std of 5 and 15
    assert table.llc_se.iloc[2] == pytest.approx(5.0) and table.llc_se.iloc[0] == pytest.approx(0.0)  # std / sqrt(2)
    assert table.init_loss.tolist() == [2.0, 0.25, 1.0]


# ----- calibrated estimates: known answers ------------------------------------------------------

def test_default_call_calibrates_a_regular_model_to_half_its_dimension():
    """The default call chooses its own settings: d / 2 within 10 %, with its diagnostics."""
    model, data = _regression(11)
    frame = local_learning_coefficient(model, data)
    assert {"llc", "llc_std", "lr", "localization", "nbeta", *DIAGNOSTICS} <= set(frame.columns)
    assert frame.ok.all() and frame.preconditioned.all() and (frame.preconditioner == "full").all()
    assert frame.nbeta.iloc[0] == pytest.approx(2000 / math.log(2000))  # n / log n of the data
    assert frame.llc_mean.iloc[0] == pytest.approx(12 / 2, rel=0.1)


@pytest.mark.parametrize("mean, spread", [(3.0, 1.0), (0.0, 100.0)])
def test_curvature_within_a_tensor_is_whitened(mean, spread):
    """Inputs of mean 3 (one direction of X^T X ~ 100 times the rest) and features 1 to 100 in scale
    (curvatures 1 to 10^4 within one weight tensor): per-tensor preconditioning gave 0.72 and 0.39
    of d / 2 with every diagnostic passing; the whole-Hessian preconditioner gives d / 2 within 10 %
    (measured 1.01 and 1.02), and the per-tensor path still falls short (a test that can fail)."""
    model, data = _regression(11, mean=mean, spread=spread)
    frame = local_learning_coefficient(model, data)
    assert frame.ok.all() and frame.llc_mean.iloc[0] == pytest.approx(6.0, rel=0.1)
    per_tensor = local_learning_coefficient(model, data, full_limit=0)
    assert (per_tensor.preconditioner == "per-tensor").all()
    assert per_tensor.llc_mean.iloc[0] < 0.85 * 6.0


def test_whitening_gives_the_resolved_directions_curvature_one():
    """T^T H T: eigenvalue 1 for every direction above the floor; a negative or flat direction is
    scaled like the sharpest, so its curvature stays within the floor of 0."""
    from analyses.llc.calibrate import whitening

    q = torch.linalg.qr(torch.randn(5, 5, generator=torch.Generator().manual_seed(0)))[0].double()
    hessian = q @ torch.diag(torch.tensor([1e4, 30.0, 1.0, 0.0, -2.0], dtype=torch.float64)) @ q.T
    T = whitening(hessian, floor=1e-5).double()
    curvature = torch.linalg.eigvalsh(T.T @ hessian @ T)
    assert curvature.tolist() == pytest.approx([-2e-4, 0.0, 1.0, 1.0, 1.0], abs=1e-6)
    coarse = torch.linalg.eigvalsh(whitening(hessian, floor=1e-2).double().T @ hessian @ whitening(hessian, 1e-2).double())
    assert coarse.tolist() == pytest.approx([-2e-4, 0.0, 1e-4, 3e-3, 1.0], abs=1e-6)  # 1 and 30 below 1 % of 1e4


def test_above_full_limit_the_sharp_directions_are_whitened():
    """100 weights above a lowered full_limit (50): inputs of mean 3 give X^T X one eigenvalue ~900
    times the rest. The low-rank path resolves it (k = 1: the spectrum falls below 1 % of the
    sharpest right after it) and rescales the rest: d / 2 within 10 % (measured 1.01); one scale
    per tensor gives 7.1 of 50 calibrated in full, 2.9 with this short budget (a test that can fail)."""
    from analyses.llc.estimator import estimate_with

    model, data = _regression(99, mean=3.0)
    calibration = calibrate(model, data, full_limit=50)
    assert calibration.preconditioner == "low-rank" and len(calibration.low_rank.values) == 1
    frame = estimate_with(model, data, calibration.config, calibration.scales, calibration=calibration.diagnostics(),
                          transform=calibration.transform())
    assert frame.ok.all() and frame.llc_mean.iloc[0] == pytest.approx(50.0, rel=0.1)
    per_tensor = local_learning_coefficient(model, data, full_limit=50, rank=0, rounds=1, max_steps=1000)
    assert per_tensor.llc_mean.iloc[0] < 0.5 * 50.0


def test_low_rank_transform_with_every_direction_is_the_whitening():
    """With k = d sharp directions the low-rank preconditioner is the whole-Hessian one: the same
    T T^T (= H^-1 for a regular model), curvature 1 in every direction, and so is its restriction
    to some weights (a component) against `whitening` of that block of the Hessian."""
    from analyses.llc.calibrate import curvature_scales, default_nbeta, sampled_hessian, sharp_directions, whitening

    model, data = _regression(11, mean=1.0, spread=10.0)
    nbeta = default_nbeta(2000)
    hessian = sampled_hessian(model, data, nbeta)
    low_rank = sharp_directions(model, data, nbeta, curvature_scales(model, data, nbeta), fraction=0.0)
    assert len(low_rank.values) == 12

    def dense(transform):
        return torch.stack([transform.apply(e) for e in torch.eye(transform.dim, dtype=torch.float64)], 1)

    def close(T, W):  # the same preconditioner T T^T, to 1e-3 (subspace iteration's tolerance)
        return float(torch.linalg.norm(T @ T.T - W @ W.T)) <= 1e-3 * float(torch.linalg.norm(W @ W.T))

    T, W = dense(low_rank), whitening(hessian).double()
    assert close(T, W)
    assert torch.linalg.eigvalsh(T.T @ hessian @ T).tolist() == pytest.approx([1.0] * 12, abs=1e-3)
    keep = torch.tensor([0, 3, 5, 11])  # three weights and the bias
    assert close(dense(low_rank.restrict(keep)), whitening(hessian[keep][:, keep]).double())


def test_low_rank_transform_rescales_the_rest_and_floors_like_whitening():
    """Two sharp directions (1e4 and 30) of a Hessian whose other curvatures are 1, 0 and -2: they get
    curvature 1, the rest is divided by its largest |curvature| (2). At floor 1e-2, 30 and the rest
    are below 1 % of the sharpest and are scaled like it, as `whitening` scales them."""
    from analyses.llc.calibrate import whitening
    from analyses.llc.coordinates import LowRankTransform

    q = torch.linalg.qr(torch.randn(5, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64))[0]
    values = torch.tensor([1e4, 30.0, 1.0, 0.0, -2.0], dtype=torch.float64)
    hessian = q @ torch.diag(values) @ q.T
    transform = LowRankTransform(torch.ones(5, dtype=torch.float64), q[:, :2], values[:2], rest=2.0, floor=1e-5)
    T = torch.stack([transform.apply(e) for e in torch.eye(5, dtype=torch.float64)], 1)
    assert torch.linalg.eigvalsh(T.T @ hessian @ T).tolist() == pytest.approx([-1.0, 0.0, 0.5, 1.0, 1.0], abs=1e-9)
    coarse = transform.with_floor(1e-2)
    T = torch.stack([coarse.apply(e) for e in torch.eye(5, dtype=torch.float64)], 1)
    W = whitening(hessian, 1e-2).double()
    assert torch.linalg.eigvalsh(T.T @ hessian @ T).tolist() == pytest.approx(
        torch.linalg.eigvalsh(W.T @ hessian @ W).tolist(), abs=1e-6)  # -2e-4, 0, 1e-4, 3e-3, 1


def test_deep_linear_learning_coefficient_formula():
    """Aoyagi (2024) against what is known: with one hidden layer it is Aoyagi & Watanabe's
    reduced-rank regression (every (M, H, N, r) up to 6, all four cases of that formula); with a
    width equal to r, half the dimension of the rank-r maps; one layer, a regular model."""
    cases = set()
    for M in range(1, 7):
        for H in range(1, 7):
            for N in range(1, 7):
                for r in range(min(M, H, N) + 1):
                    assert dln_learning_coefficient([M, H, N], r) == rrr_learning_coefficient(M, N, H, r)
                    cases.add(0 if N + r <= M + H and M + r <= N + H and H + r <= M + N else
                              1 if M + H < N + r else 2 if N + H < M + r else 3)
    assert cases == {0, 1, 2, 3}
    for widths in ([5, 3, 7, 4], [4, 9, 3, 9, 6], [8, 3, 3, 8], [3, 5, 6, 5]):
        r = min(widths)
        assert dln_learning_coefficient(widths, r) == r * (widths[0] + widths[-1] - r) / 2
    assert dln_learning_coefficient([7, 4], 2) == 7 * 4 / 2
    # widths 150-200-200-150, r = 10: M = 140, 190, 190, 140, all four in S (l = 3), a = 3:
    # 1450 + 0 - 1.5 * 220^2 + (140^2 + 4 * 140 * 190 + 190^2) / 2 = 9900, below 150 * 150 / 2
    assert dln_learning_coefficient([150, 200, 200, 150], 10) == 9900.0
    assert dln_learning_coefficient([100, 200, 200, 100], 10) == 100 * 100 / 2  # wide hidden layers: l = 1
    with pytest.raises(ValueError, match="allowed"):
        dln_learning_coefficient([4, 3, 5], 4)


def test_dln_posterior_llc_is_exact_for_one_layer():
    """One layer is a regular model: under the localized tempered posterior the excess loss has the
    closed form 1/2 sum_i h_i / (h_i + localization) over the eigenvalues h_i of the Hessian of
    nbeta L, each eigenvalue of X^T X once per output. The localization is of the order of the
    curvatures, so the answer is far below d / 2 and a sampler that ignored it would miss."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 6, generator=g, dtype=torch.float64) * torch.logspace(0, 1, 6, dtype=torch.float64)
    y = x @ torch.randn(6, 2, generator=g, dtype=torch.float64) + torch.randn(300, 2, generator=g, dtype=torch.float64)
    weight = torch.linalg.lstsq(x, y).solution.T  # [2, 6]
    nbeta, localization = 300 / math.log(300), 200.0
    outputs = 2
    h = 2 * nbeta / (300 * outputs) * torch.linalg.eigvalsh(x.T @ x)
    exact = outputs * float((h / (h + localization)).sum()) / 2  # each eigenvalue once per output
    result = dln_posterior_llc([weight], (x, y), localization, sweeps=3000, burnin=0)
    assert 1.0 < exact < 5.0  # the localization matters: d / 2 is 6
    assert abs(result["llc"] - exact) < 4 * result["se"] + 0.02 * exact
    assert len(result["trace"]) == 3000


@pytest.mark.parametrize("depth", [2, 3])
def test_dln_posterior_llc_counts_a_rank_one_network_modulo_its_rescaling(depth):
    """x -> b a^T x (3 inputs, 1 hidden unit, 2 outputs; with depth 3 a scalar layer between) at its
    rank-1 fit, with much data: every direction but the rescalings (a -> t a, b -> b / t) is
    regular, so the exact value is Aoyagi's (3 + 2 - 1) / 2 = 2 within a few per cent. Swapping the
    roles of the layers' factors A and Z, or the precision's scale, gives another number."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20000, 3, generator=g, dtype=torch.float64)
    y = x @ torch.tensor([[1.0, -0.5], [0.5, 1.0], [-1.0, 0.5]], dtype=torch.float64) @ torch.diag(
        torch.tensor([1.5, 0.1], dtype=torch.float64)) + 0.5 * torch.randn(20000, 2, generator=g, dtype=torch.float64)
    fitted = torch.linalg.lstsq(x, y).solution  # [3, 2]
    direction = torch.linalg.svd(x @ fitted, full_matrices=False).Vh[:1]  # the fitted values' top direction, [1, 2]
    left, s, right = torch.linalg.svd(direction.T @ direction @ fitted.T, full_matrices=False)
    root = s[:1] ** (1 / depth)
    layers = [root[:, None] * right[:1]] + [root[:, None]] * (depth - 2) + [left[:, :1] * root]  # [1, 3] ... [2, 1]
    result = dln_posterior_llc(layers, (x, y), localization=1.0, sweeps=1500, burnin=100)
    assert dln_learning_coefficient([3] + [1] * (depth - 1) + [2], 1) == 2.0
    assert result["llc"] == pytest.approx(2.0, rel=0.05)
    with pytest.raises(ValueError, match="allowed"):
        dln_posterior_llc(layers, (x, y), localization=0.0)


@pytest.mark.slow
@pytest.mark.parametrize("d_in, n, noise, scale, mean", [(4, 2000, 0.5, 1.0, 0.0), (11, 5000, 3.0, 10.0, 0.0),
                                                         (20, 1000, 1.0, 0.1, 0.5), (49, 3000, 0.2, 1.0, 1.0)])
def test_calibration_holds_across_dimensions_noise_and_input_scales(d_in, n, noise, scale, mean):
    """d 5 to 50, n 1000 to 5000, noise 0.2 to 3, inputs of scale 0.1 to 10 (the bias then has a
    curvature 100 times off the weights') and of mean 0 to 1: d / 2 within 10 %."""
    model, data = _regression(d_in, n, noise=noise, scale=scale, mean=mean)
    frame = local_learning_coefficient(model, data)
    assert frame.ok.all()
    assert frame.llc_mean.iloc[0] == pytest.approx((d_in + 1) / 2, rel=0.1)


class _ReducedRank(torch.nn.Module):
    """x -> B A x, A [H, M], B [N, H]."""

    def __init__(self, M: int, N: int, H: int):
        super().__init__()
        self.A, self.B = torch.nn.Parameter(torch.zeros(H, M)), torch.nn.Parameter(torch.zeros(N, H))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [batch, M] -> [batch, N]
        return x @ self.A.T @ self.B.T


def _reduced_rank(M: int, N: int, H: int, r: int, n: int = 5000, seed: int = 0):
    """A reduced-rank regression at its true parameter: a rank-r map with H - r redundant hidden units."""
    g = torch.Generator().manual_seed(seed)
    U, V = torch.linalg.qr(torch.randn(N, r, generator=g))[0], torch.linalg.qr(torch.randn(M, r, generator=g))[0]
    s = torch.linspace(1, 2, r).sqrt()
    model = _ReducedRank(M, N, H)
    with torch.no_grad():
        model.A[:r], model.B[:, :r] = s[:, None] * V.T, U * s
    x = torch.randn(n, M, generator=g)
    truth = (U * s ** 2) @ V.T  # [N, M] = B A
    return model, (x, x @ truth.T + 0.5 * torch.randn(n, N, generator=g))


def test_reduced_rank_learning_coefficient_formula():
    """Aoyagi & Watanabe (2005): every case, and the regular limit H = r (half the dimension of the rank-r maps)."""
    assert rrr_learning_coefficient(1, 1, 1, 0) == 0.5  # y = a b x at 0
    assert rrr_learning_coefficient(4, 4, 3, 1) == 6.0  # (2*4*8 - 0 - 16) / 8, M + N + H + r even
    assert rrr_learning_coefficient(3, 2, 2, 1) == 2.5  # (2*3*5 - 1 - 9 + 1) / 8 - odd: the extra 1/8
    assert rrr_learning_coefficient(1, 6, 2, 1) == (2 * 1 - 2 * 1 + 6 * 1) / 2  # M + H < N + r
    assert rrr_learning_coefficient(6, 1, 2, 1) == (2 * 1 - 2 * 1 + 6 * 1) / 2  # N + H < M + r
    assert rrr_learning_coefficient(2, 2, 5, 3) == 2.0  # M + N < H + r: M N / 2
    for M, N, r in [(3, 5, 2), (4, 4, 4), (6, 2, 1)]:
        assert rrr_learning_coefficient(M, N, r, r) == r * (M + N - r) / 2
    with pytest.raises(ValueError, match="allowed"):
        rrr_learning_coefficient(3, 3, 2, 3)


@pytest.mark.slow
def test_singular_model_matches_aoyagi_watanabe():
    """Reduced-rank regression M=3, N=2, H=2, r=1 (5 of 10 weights' worth of a regular model):
    the default call within 20 % of lambda = 2.5, far from d / 2 = 5. At n = 4096 the default
    minibatch is all of the data (measured 2.30 for data seed 0; 2.25, 2.28, 2.40 for seeds 1-3;
    at n = 5000, minibatches of 4096, 2.83 in four times the time)."""
    model, data = _reduced_rank(3, 2, 2, 1, n=4096)
    frame = local_learning_coefficient(model, data)
    assert frame.ok.all()
    assert frame.llc_mean.iloc[0] == pytest.approx(rrr_learning_coefficient(3, 2, 2, 1), rel=0.2)


# ----- diagnostics ------------------------------------------------------------------------------

def _synthetic(levels: list[list[float]], init: float = 1.0) -> pd.DataFrame:
    rows = [(c, i, level, False) for c, chain in enumerate(levels) for i, level in enumerate(chain)]
    return pd.DataFrame(rows, columns=["chain", "sgld_step", "loss", "burnin"]).assign(init_loss=init, nbeta=10.0)


def test_flatness_tells_a_level_trace_from_a_climbing_one():
    g = torch.Generator().manual_seed(0)
    noise = (0.01 * torch.randn(2, 200, generator=g)).tolist()
    level = _synthetic([[1.5 + e for e in chain] for chain in noise])
    climbing = _synthetic([[1.0 + i / 200 + e for i, e in enumerate(chain)] for chain in noise])
    assert flat_after_burnin(level) and not flat_after_burnin(climbing)


def test_failing_settings_are_flagged():
    """A step size far too large diverges; the row says so and is not ok."""
    model, data = _regression(4, n=500)
    frame = local_learning_coefficient(model, data, SGLDConfig(num_chains=2, num_burnin=5, num_draws=20, lr=10.0,
                                                               localization=0.0, batch_size=100, nbeta=50.0))
    assert len(frame) == 2 and frame.diverged.all() and not frame.ok.any()  # a row per chain, diverged or not
    with pytest.raises(ValueError, match="config is invalid"):
        local_learning_coefficient(model, data, SGLDConfig(), calibrate=True)


def test_calibration_round_trips_through_its_cache_frames():
    model, data = _regression(3, n=300)
    with pytest.raises(ValueError, match="full preconditioner is invalid"):  # a Hessian is not kept in the frames
        calibrate(model, data, rounds=1, max_steps=200).scales_frame()
    with pytest.raises(ValueError, match="low-rank preconditioner is invalid"):  # nor its sharp directions
        calibrate(model, data, rounds=1, max_steps=200, full_limit=2).scales_frame()
    calibration = calibrate(model, data, rounds=1, max_steps=200, full_limit=0)
    again = Calibration.from_frames(calibration.scales_frame(), calibration.sweep)
    assert again.config == calibration.config and again.scales == pytest.approx(calibration.scales)
    assert again.diagnostics() == calibration.diagnostics()
    assert calibration.sweep.chosen.sum() == 1


def test_localization_check_fails_when_its_chains_cannot_relax():
    """Chains capped below the relaxation time 2 / (lr localization / 2) measure a transient: the
    check at half the localization fails then, whatever the estimates; the same model with room to
    relax passes it."""
    model, data = _regression(3, n=300)
    assert relaxes(0.2, 0.01, 2000) and not relaxes(0.2, 0.01, 1999) and not relaxes(0.2, 0.01, 300)
    capped = calibrate(model, data, rounds=1, max_steps=400)  # 200-step chains against 1,000
    room = calibrate(model, data, rounds=1, max_steps=2000)
    assert not capped.localization_ok and not capped.ok
    assert room.localization_ok


def test_report_note_names_a_localization_check_its_chains_cannot_settle():
    from analyses.llc.adapters import checks_note

    def sweep(steps):
        return pd.DataFrame({"lr": [0.2, 0.1, 0.2], "localization": [0.02, 0.02, 0.01], "steps": steps,
                             "llc": [6.3, 6.1, 6.4], "llc_std": [2.8, 3.0, 3.0], "flat": True,
                             "chosen": [True, False, False], "calibrated_at": 14000})

    short, long = checks_note(sweep(30)), checks_note(sweep(1000))
    assert "ran 30 burn-in steps against the 1000" in short and "no proof for flatter ones" in short
    assert "burn-in steps against" not in long and "half the localization 6.40" in long


def test_plot_marks_failing_checkpoints_hollow():
    chains = pd.DataFrame({"step": [0, 0, 10, 10], "llc": [1.0, 1.2, 2.0, 2.2], "ok": [True, True, False, False]})
    metrics = pd.DataFrame({"step": [0, 10], "eval_loss": [1.0, 0.5]})
    fig = plot_llc(chains, metrics)
    symbols = {t.name: (list(t.x), t.marker.symbol) for t in fig.data if t.name and "diagnostics" in t.name}
    assert symbols == {"diagnostics pass": ([0], "circle"), "diagnostics fail (hollow)": ([10], "circle-open")}
    assert fig.layout.yaxis.dtick is None  # half a decade of loss: plotly's own ticks
    spanning = plot_llc(chains, pd.DataFrame({"step": [0, 5, 10], "eval_loss": [1.0, 1e-2, 1e-4]}))
    assert spanning.layout.yaxis.dtick == 1 and spanning.layout.yaxis.exponentformat == "power"  # one label a decade


# ----- per-component (weight-restricted) LLC ----------------------------------------------------

def test_restricting_to_k_weights_gives_k_halves():
    """A planted answer: sampling k of the 12 weights of a regular model (the rest fixed) gives k / 2."""
    model, data = _regression(11)
    first = torch.zeros(1, 11, dtype=torch.bool)
    first[0, :4] = True
    frame = component_llc(model, data, {"4 weights": {"weight": first}, "bias": "bias",
                                        "all": {"weight": None, "bias": None}})
    table = frame.set_index("component")
    assert table.dimension.to_dict() == {"4 weights": 4, "bias": 1, "all": 12}
    assert table.llc["4 weights"] == pytest.approx(2.0, rel=0.15)
    assert table.llc["all"] == pytest.approx(6.0, rel=0.1)
    assert table.llc["bias"] == pytest.approx(0.5, rel=0.3)
    assert table.ok.all()


def test_a_head_moves_only_its_own_slices(tiny_run):
    """A head of the component vocabulary (`attn.0.1`) on this encoder: SGLD on head 1 of layer 0
    changes only that head's slices of W_Q/W_K/W_V/W_O (and b_Q/b_K/b_V); every other weight stays at w*."""
    model = tiny_run.load_model(40)
    cfg = model.cfg
    masks = component_masks(model, "attn.0.1")
    assert sorted(masks) == sorted(f"blocks.0.attn.{n}" for n in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V"))
    assert int(masks["blocks.0.attn.W_Q"].sum()) == cfg.d_model * cfg.d_head
    seen = []

    def loss_fn(sampler, data):
        seen.append(sampler)
        from analyses.llc.data import mse_loss

        return mse_loss(sampler, data)

    from analyses.base.walk import analysis_batch

    sgld_traces(model, analysis_batch(tiny_run, 32), SGLDConfig(num_chains=1, num_burnin=1, num_draws=3, lr=1e-3,
                                                                 batch_size=16), loss_fn=loss_fn, masks=masks)
    before, after = dict(model.named_parameters()), dict(seen[-1].named_parameters())
    for name, p in before.items():
        moved = after[name].detach() != p.detach()
        if name in masks:
            assert moved[masks[name]].all() and not moved[~masks[name]].any(), name
        else:
            assert not moved.any(), name
    with pytest.raises(OptionError, match="component 'attn.9.0' is out of range"):
        component_masks(model, "attn.9.0")


def test_the_component_vocabulary_selects_what_devinterp_selects(tiny_run):
    """`attn.L.H`, `attn.L` and `mlp.L` mask exactly the entries devinterp 2.0.1's restriction strings
    `lLhH`, `lL attn` and `lL mlp` mask (the names changed, the sampled weights did not)."""
    from devinterp.slt.weight_restrictions import create_param_masks

    model = tiny_run.load_model(40)
    params = dict(model.named_parameters())

    def full(masks):
        return {n: (torch.ones_like(params[n], dtype=torch.bool) if m is None else m.bool()) for n, m in masks.items()}

    for ours, theirs in (("attn.0.1", "l0h1"), ("attn.1.0", "l1h0"), ("attn.0", "l0 attn"), ("mlp.1", "l1 mlp")):
        a, b = full(component_masks(model, ours)), full(create_param_masks(model, theirs))
        assert sorted(a) == sorted(b), ours
        assert all(torch.equal(a[n], b[n]) for n in a), ours


def test_report_section_calibrates_once_and_flags(tiny_run):
    """The registry entry: one calibration per run (cached in the run directory, reused by a second
    call), the per-step table with its diagnostics, the failing checkpoints named in the note."""
    from analyses.base.context import QUICK, Context
    from analyses.base.registry import get

    ctx = Context(tiny_run, QUICK, progress=False, steps_asked=[20, 40])
    tables = get("llc").compute(ctx)
    assert list(tables["llc"].step) == [20, 40] and set(DIAGNOSTICS) <= set(tables["llc"].columns)
    assert tables["llc_calibration"].chosen.sum() == 1
    cache = tiny_run.path / "cache"
    assert len(list((cache / "llc_calibration").iterdir())) == 1 and len(list((cache / "llc_traces").iterdir())) == 2
    again = get("llc").compute(ctx)
    pd.testing.assert_frame_equal(again["llc"], tables["llc"])
    assert len(list((cache / "llc_traces").iterdir())) == 2  # the same settings, read back: nothing new
    parts = get("llc").draw(ctx, tables)
    failing = tables["llc"].step[~tables["llc"].ok].tolist()
    assert ("diagnostics fail at steps" in parts["note"]) == bool(failing)


def test_component_llc_over_a_run_and_a_family(tiny_run):
    """The key checkpoints' refined LLC per component with the run's one calibration, cached; the
    family table counts a planted rise and a planted fall against the chains' spread."""
    from analyses.base.context import QUICK, Context
    from analyses.llc.adapters import run_component_llc
    from analyses.llc.components import component_changes
    from analyses.llc.figures import plot_component_llc

    ctx = Context(tiny_run, QUICK, progress=False)
    rows = run_component_llc(ctx, ["attn.0", "embeddings"])
    assert set(rows.moment) == set(ctx.key) and set(rows.component) == {"attn.0", "embeddings"}
    assert {"llc", "llc_std", "dimension", "ok"} <= set(rows.columns)
    cached = len(list((tiny_run.path / "cache" / "llc_components").iterdir()))
    assert cached == len(set(ctx.key.values()))
    pd.testing.assert_frame_equal(run_component_llc(ctx, ["attn.0", "embeddings"]), rows)  # read back

    def planted(run, attn, embed):
        return pd.DataFrame([{"run": run, "moment": m, "component": c, "llc": v, "llc_std": 0.1, "ok": True}
                             for c, values in (("attn", attn), ("embed", embed))
                             for m, v in zip(("plateau", "drop", "end"), values)])

    family = pd.concat([planted("a", (1, 3, 4), (2, 2.1, 1)), planted("b", (1, 1.2, 3), (2, 1, 1))])
    table = component_changes(family).set_index("component")
    assert table.loc["attn", "rises_end"] == "2 of 2" and table.loc["attn", "rises_drop"] == "1 of 2"
    assert table.loc["embed", "falls_end"] == "2 of 2" and table.loc["embed", "rises_end"] == "0 of 2"
    assert table.loc["attn", "end_over_plateau"] == pytest.approx(3.5)
    assert len(plot_component_llc(family).data) == 4


def test_family_llc_verdict_counts_only_a_rise_beyond_the_chains_spread():
    from analyses.llc.figures import plot_family_llc
    from analyses.llc.runs import family_llc

    def table(values, stds, ok=True):
        return pd.DataFrame({"step": [100, 200, 300], "llc_mean": values, "llc_std": stds, "ok": ok})

    tables = {"up": table([5.0, 6.0, 6.5], [0.1, 0.1, 0.1]), "noisy": table([5.0, 6.0, 6.5], [0.5, 0.5, 0.5]),
              "flagged": table([5.0, 8.0, 8.0], [0.1, 0.1, 0.1], ok=[True, False, False])}
    frame = family_llc(tables, {"up": 150, "noisy": 150, "flagged": 150, "never": None}).set_index("run")
    assert (frame.loc["up", "before"], frame.loc["up", "after"]) == (100, 200)
    assert frame.rises.to_dict() == {"up": True, "noisy": False, "flagged": True}
    assert frame.ok.to_dict() == {"up": True, "noisy": True, "flagged": False}
    assert frame.loc["up", "ratio"] == pytest.approx(1.2)
    fig = plot_family_llc(tables, {"up": 150, "noisy": 150, "flagged": 150})
    assert list(fig.data[2].marker.symbol) == ["circle", "circle-open", "circle-open"] and fig.data[0].x[0] == -50
