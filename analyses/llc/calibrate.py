"""Calibrated SGLD settings for the LLC: chosen from the model and the data, kept only where they pass.

The estimate LLC = nbeta (E[L(w)] - L(w*)) is only as good as the sampler's settings (devinterp's
"LLC estimation guide"). `calibrate` chooses them by this procedure:

1. nbeta = n / log n from the effective sample size n, the number of examples that L averages
   (devinterp's `default_nbeta`, applied to the data rather than to one minibatch).
2. Curvature: each parameter tensor t gets a scale k_t = nbeta * h_t * lambda_P, with h_t its mean
   Hessian diagonal (Hutchinson probes; where the probes do not resolve it, the largest resolved
   value) and lambda_P the top eigenvalue of the Hessian of
   nbeta * L in the coordinates u_t = sqrt(nbeta h_t) w_t (power iteration). In the coordinates
   u_t = sqrt(k_t) w_t the sharpest direction has curvature 1 and tensors of very different
   curvature (a weight matrix on large inputs beside a bias) move alike. SGLD runs in these
   coordinates: tensor t moves with step lr / k_t and localization localization * k_t, so `lr` and
   `localization` below are dimensionless. The LLC does not depend on the coordinates. (A point
   with no curvature at all is scaled as if it had curvature 1.)
   One scale per tensor cannot undo curvature that differs within a tensor: inputs with a mean
   (X^T X has one eigenvalue d times the rest) or features of very different scales leave most
   directions so flat, next to the sharpest that sets the step, that the localization holds them
   and the estimate falls short (0.72 and 0.39 of d / 2 for a regression with inputs of mean 3, and
   with features 1 to 100 in scale). So a model with at most `FULL_LIMIT` sampled weights is
   preconditioned by its whole Hessian instead (`sampled_hessian`, `whitening`): SGLD runs in
   u = T^-1 (w - w*) where every resolved direction has curvature 1 (`analyses.llc.coordinates.Reparametrized`).
   Directions flatter than a floor (a fraction of the sharpest), or negative, are scaled like the
   sharpest; the floor starts at 1e-5 and coarsens (1e-3, 0.1, 1) while the first chains diverge: a
   singular model's near-flat directions, whitened, run away from w*.
   A larger model is preconditioned by its sharpest directions instead (`sharp_directions`,
   `analyses.llc.coordinates.LowRankTransform`): in the per-tensor coordinates above, the top
   eigenpairs of the Hessian by subspace iteration with Hessian-vector products, k of them (those
   above 1 % of the sharpest when the spectrum falls below that within `RANK_LIMIT` directions, else
   those above its largest drop if it is tenfold, else none: per-tensor scales), each given
   curvature 1, and every other direction divided by the largest |curvature| left off them (block
   power iteration on the deflated Hessian). This undoes a few directions far sharper than the
   rest (an input mean: one per output of a layer), not a spread through the bulk; it costs O(k d)
   memory and, per step, O(k d) memory traffic besides the model. The same floors apply (a sharp
   direction below the floor, and the rest when its curvature is, are scaled like the sharpest).
   `full_limit=0` keeps the per-tensor scales alone.
3. A small sweep, walked from lr 0.2, localization 0.02: at each point (lr, gamma) chains run
   at (lr, gamma), (lr / 2, gamma) and (lr, gamma / 2), each for 2 / (lr gamma) burn-in steps and as
   many draws (the relaxation time of a direction held only by the localization), at most
   `max_steps`. The point is kept when
   - no chain diverges (a non-finite loss, or an LLC beyond the number of sampled weights);
   - the traces are flat after burn-in: the trend of the draws' block means is below `tol` of the
     mean excess loss, or within three standard errors of zero (minibatch noise);
   - the estimate is stable: at lr / 2 it changes by less than `tol` / 2 (plus one standard error
     of the difference of the chains' means); the step's bias (discretisation, minibatch noise) is
     about linear in lr, so it is then below ~`tol`;
   - the localization does not dominate: at gamma / 2 it changes by less than `tol` / 2 likewise
     (in a singular model the estimate keeps rising as gamma falls, slowly: the test is strict), and
     the chains at gamma / 2 were long enough to relax (`relaxes`: 2 / (lr gamma / 2) steps within
     `max_steps` / 2; capped shorter they measure a transient and the check fails).
   Otherwise lr is halved (divergence, instability) and / or gamma is halved (localization); when
   only the traces fail the chains are made twice as long; at most `rounds` points. If none passes,
   the last point is returned with `ok` False. The chosen point then gets `num_chains` chains with
   enough draws for a standard error of about `target_error` (block means of the sweep's traces).

Minibatches are all examples up to 4096 and their losses are paired with L(w*) on the same
minibatch (`SGLDConfig.paired`). For a regular model in these coordinates the step's bias is about
+lr / 4 and the localization's about -gamma, so the starting point is within ~2 % of d / 2. Known
answers for the tests: d / 2 for a regular model, and the learning coefficients of reduced-rank
regression and deep linear networks (`analyses.llc.known`). On a deep linear network of 10^5
weights the default call gives 0.99-1.05 of the exact value at its n (`dln_posterior_llc`, block
Gibbs) at n = 1,000, where that value is itself 0.84 of the n -> infinity coefficient, and 1.06-1.11
of it at n = 10,000 (0.93), flagged there (benchmarks/llc_known.py, benchmarks/RESULTS.md).
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from analyses.llc.coordinates import LowRankTransform, Reparametrized, flat_positions
from analyses.llc.data import (Data, Masks, SGLDConfig, data_size, is_batch, is_indexable, mse_loss, sampled_dimension,
    sampled_parameters)
from analyses.llc.sampler import diverged_chains, excess_loss, llc_from_traces, sgld_traces

START_LR, START_LOCALIZATION = 0.2, 0.02


FULL_LIMIT = 4096  # models with at most this many sampled weights are preconditioned by their whole Hessian


# whole-Hessian preconditioning: eigenvalues below this fraction of the largest are not whitened; the
# calibration starts at the first and coarsens while the chains diverge
FULL_FLOORS = (1e-5, 1e-3, 1e-1, 1.0)


# above FULL_LIMIT: the low-rank preconditioner resolves at most RANK_LIMIT sharp directions, those above
# RANK_FRACTION of the sharpest (or above a drop of RANK_GAP in the spectrum); the search starts with a
# block of RANK_START; REST_PROBES directions measure the curvature left off them
RANK_LIMIT, RANK_FRACTION, RANK_GAP, RANK_START, REST_PROBES = 256, 1e-2, 10.0, 32, 8


CHAINS = 2  # chains per setting of the sweep


FLOOR = 1e-6  # a tensor's curvature is at least FLOOR times the largest one (flat tensors stay bounded)


def effective_sample_size(data: Data) -> int:
    """The number of examples the loss L averages over: rows of a batch or tensor pair, or all
    examples of an iterable of them (one pass)."""
    if is_indexable(data):
        return data_size(data)
    return sum(data_size(item) for item in data)


def default_nbeta(n: int) -> float:
    """n / log n (devinterp's guidance, the WBIC temperature); 1 for a single example."""
    return n / math.log(n) if n > 1 else 1.0


def _head(data: Data, size: int):
    """At most `size` examples of `data` (for the curvature probes)."""
    if is_indexable(data):
        return data[:size] if is_batch(data) else (data[0][:size], data[1][:size])
    return next(iter(data))


def curvature_scales(model: torch.nn.Module, data: Data, nbeta: float, loss_fn: Callable = mse_loss,
                     masks: Masks | None = None, probes: int = 8, iterations: int = 20, examples: int = 128,
                     seed: int = 0) -> dict[str, float]:
    """The preconditioner k_t of every sampled tensor (step 2 of the procedure): nbeta times its mean
    Hessian diagonal, times the top eigenvalue of the Hessian in the coordinates that scaling gives.
    A tensor whose diagonal estimate is not above two standard errors of the probes (off-diagonal
    terms swamp it, as in a network's attention weights) gets the largest trusted value instead, so
    a network is mostly preconditioned by one scalar. Hessian-vector products by double
    backpropagation on at most `examples` examples."""
    sampler = copy.deepcopy(model).train()
    named = sampled_parameters(sampler, masks)
    params = [p.requires_grad_(True) for _, p, _ in named]
    weights = [torch.ones_like(p) if m is None else m.to(p.dtype) for _, p, m in named]
    with torch.enable_grad():  # also inside a caller's no_grad (the report)
        loss = nbeta * loss_fn(sampler, _head(data, examples))
        grads = torch.autograd.grad(loss, params, create_graph=True)

    @torch.enable_grad()
    def hvp(vectors):
        out = torch.autograd.grad(grads, params, grad_outputs=vectors, retain_graph=True, allow_unused=True)
        return [torch.zeros_like(p) if h is None else h * w for h, p, w in zip(out, params, weights)]

    generator = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(probes):  # Hutchinson: E[v * Hv] is the Hessian diagonal
        v = [(torch.randint(0, 2, p.shape, generator=generator).to(p) * 2 - 1) * w for p, w in zip(params, weights)]
        samples.append([float((a * b).sum()) / max(float(w.sum()), 1.0) for a, b, w in zip(v, hvp(v), weights)])
    samples = torch.tensor(samples, dtype=torch.float64)  # [probe, tensor]
    mean, error = samples.mean(0), samples.std(0) / math.sqrt(probes)
    trusted = mean > 2 * error  # off-diagonal terms can swamp the diagonal (a network's Q, K...)
    common = float(mean[trusted].max()) if bool(trusted.any()) else 1.0
    diagonal = torch.where(trusted, mean, torch.full_like(mean, common))
    diagonal = diagonal.clamp_min(float(diagonal.max()) * FLOOR)
    root = [1 / math.sqrt(float(h)) for h in diagonal]
    v = [torch.randn(p.shape, generator=generator).to(p) * w for p, w in zip(params, weights)]
    top = 1.0
    for _ in range(iterations):  # power iteration on D^-1/2 H D^-1/2
        norm = math.sqrt(sum(float((x * x).sum()) for x in v))
        v = [x / norm for x in v]
        hv = [r * h for r, h in zip(root, hvp([r * x for r, x in zip(root, v)]))]
        top = abs(sum(float((x * y).sum()) for x, y in zip(v, hv))) or 1.0
        v = hv
    return {name: float(h) * top for (name, _, _), h in zip(named, diagonal)}


def _hessian_products(model: torch.nn.Module, data: Data, nbeta: float, loss_fn: Callable, masks: Masks | None,
                      examples: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """rows [b, d] -> rows H [b, d], H the Hessian of nbeta L over the sampled weights (`flat_positions`
    order) on at most `examples` examples: double backpropagation, batched with vmap (one row at a
    time for an op without a batching rule)."""
    sampler = Reparametrized(copy.deepcopy(model).train(), masks)
    u = sampler.u
    with torch.enable_grad():
        grad = torch.autograd.grad(nbeta * loss_fn(sampler, _head(data, examples)), u, create_graph=True)[0]

    @torch.enable_grad()
    def products(rows: torch.Tensor) -> torch.Tensor:
        rows = rows.to(u)
        try:
            return torch.cat([torch.autograd.grad(grad, u, part, retain_graph=True, is_grads_batched=True)[0]
                              for part in rows.split(64)])
        except RuntimeError:
            return torch.stack([torch.autograd.grad(grad, u, row, retain_graph=True)[0] for row in rows])

    return products


def sampled_hessian(model: torch.nn.Module, data: Data, nbeta: float, loss_fn: Callable = mse_loss,
                    masks: Masks | None = None, examples: int = 4096) -> torch.Tensor:
    """The Hessian of nbeta L over the sampled weights (`flat_positions` order), float64, on at most
    `examples` examples: one Hessian-vector product (double backpropagation) per weight."""
    products = _hessian_products(model, data, nbeta, loss_fn, masks, examples)
    d = sampled_dimension(model, masks)
    hessian = products(torch.eye(d)).double()
    return (hessian + hessian.T) / 2


def _subspace_iteration(curvature: Callable[[torch.Tensor], torch.Tensor], block: torch.Tensor, fraction: float,
                        iterations: int = 8, tol: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """The Ritz values (descending) and vectors ([d, b]) of the symmetric operator `curvature`
    ([d, b] -> [d, b]) on the block `block` after at most `iterations` steps of subspace iteration:
    until the values of at least `fraction` of the largest |value| change by less than `tol` of it."""
    basis, previous = torch.linalg.qr(block).Q, None
    for step in range(iterations):
        image = curvature(basis)
        small = basis.T @ image
        values, rotation = torch.linalg.eigh((small + small.T) / 2)
        values, rotation = values.flip(0), rotation.flip(1)
        scale = float(values.abs().max()) or 1.0
        watched = values.abs() >= fraction * scale
        if previous is not None and float((values - previous)[watched].abs().max()) <= tol * scale:
            break
        if step < iterations - 1:
            basis, previous = torch.linalg.qr(image).Q, values
    return values, basis @ rotation


def sharp_directions(model: torch.nn.Module, data: Data, nbeta: float, scales: dict[str, float],
                     loss_fn: Callable = mse_loss, masks: Masks | None = None, rank: int = RANK_LIMIT,
                     fraction: float = RANK_FRACTION, examples: int = 4096, seed: int = 0,
                     progress: bool = False) -> LowRankTransform | None:
    """The low-rank preconditioner of a model above `FULL_LIMIT` sampled weights (step 2 of the
    procedure), at floor `FULL_FLOORS[0]`: in the per-tensor coordinates v = D^1/2 w (D: `scales`),
    the top eigenpairs of the Hessian of nbeta L by subspace iteration with Hessian-vector products
    (a block of 32 random directions, doubled while its smallest Ritz value is above `fraction` of
    the largest, up to `rank`), and the largest |curvature| off them (block power iteration on the
    deflated Hessian). k is where the spectrum falls below `fraction` of the sharpest; where it does
    not within `rank` directions, at its largest drop if that is at least `RANK_GAP`-fold, else None
    (per-tensor scales): whitening k of a smoothly falling spectrum gains only lambda_1 / lambda_k+1
    and costs O(k d) a step. A block method rather than single-vector Lanczos (scipy's eigsh): its
    products batch (vmap; ~7x cheaper a vector on a 10^5-weight linear layer), and a repeated
    eigenvalue (a layer's Hessian is often X^T X once per output row, so is its sharp eigenvalue) is
    one Krylov direction in exact arithmetic, which Lanczos recovers only through rounding."""
    named = sampled_parameters(model, masks)
    root = torch.cat([torch.full((p.numel() if m is None else int(m.sum()),), float(scales[name]) ** -0.5,
                                 dtype=torch.float64) for name, p, m in named])
    d = len(root)
    products = _hessian_products(model, data, nbeta, loss_fn, masks, examples)
    with tqdm(desc="sharp directions", unit="hvp", disable=not progress) as bar:

        def curvature(block):  # [d, b] -> D^-1/2 H D^-1/2 block
            bar.update(block.shape[1])
            return products((block * root[:, None]).T).double().T * root[:, None]

        generator = torch.Generator().manual_seed(seed)
        size, vectors = min(RANK_START, rank, d), torch.zeros(d, 0, dtype=torch.float64)
        while True:
            fresh = torch.randn(d, size - vectors.shape[1], generator=generator, dtype=torch.float64)
            values, vectors = _subspace_iteration(curvature, torch.cat([vectors, fresh], 1), fraction)
            if size == min(rank, d) or float(values[-1]) < fraction * float(values[0]):
                break
            size = min(2 * size, rank, d)
        top = float(values[0])
        if size == d or float(values[-1]) < fraction * top:  # the spectrum fell below `fraction` in the block
            kept = (values >= fraction * top) & (values > 0)
        else:  # it did not within `rank` directions: down to its largest drop, if that is a clear one
            drops = values[:-1] / values[1:]
            last = int(drops.argmax())
            kept = torch.arange(len(values)) <= last
            if float(drops[last]) < RANK_GAP:
                return None
        basis, rest = vectors[:, kept], float(values[~kept].abs().max()) if bool((~kept).any()) else 0.0
        if basis.shape[1] < d:  # the largest curvature off the sharp directions (a lower bound from the block above)

            def deflated(block):
                block = block - basis @ (basis.T @ block)
                image = curvature(block)
                return image - basis @ (basis.T @ image)

            probes = torch.randn(d, min(REST_PROBES, d - basis.shape[1]), generator=generator, dtype=torch.float64)
            rest = max(rest, float(_subspace_iteration(deflated, probes, 1.0)[0].abs().max()))
        return LowRankTransform(root, basis, values[kept], rest, FULL_FLOORS[0])


def whitening(hessian: torch.Tensor, floor: float = FULL_FLOORS[0]) -> torch.Tensor:
    """The full preconditioner T = Q diag(lambda')^-1/2 of a Hessian H = Q diag(lambda) Q^T: lambda' =
    lambda where it is at least `floor` times the largest, else the largest. In u = T^-1 (w - w*)
    every direction of resolved positive curvature has curvature 1 (the sharpest included), so none
    is left to the localization because a sharper one sets the step (correlated inputs, features of
    very different scales). A flat or negative direction (a singular model's, or a saddle's) is
    scaled like the sharpest, as the per-tensor preconditioner would: its curvature in u stays
    within `floor` of 0 and the localization holds it."""
    values, vectors = torch.linalg.eigh(hessian.double())
    top = float(values.max()) if float(values.max()) > 0 else 1.0
    resolved = torch.where(values >= floor * top, values, torch.full_like(values, top))
    return (vectors * resolved.rsqrt()).float()


def _block_means(traces: pd.DataFrame, blocks: int) -> pd.DataFrame:
    """The drawn excess losses averaged in `blocks` consecutive blocks per chain: `chain, block, x, excess`
    (x: the block's centre as a fraction of the draws)."""
    drawn = traces[~traces.burnin]
    position = drawn.groupby("chain").cumcount().to_numpy()
    block = np.minimum(position * blocks // (position.max() + 1), blocks - 1)
    frame = pd.DataFrame({"chain": drawn.chain.to_numpy(), "block": block, "excess": excess_loss(drawn).to_numpy()})
    means = frame.groupby(["chain", "block"]).excess.mean().reset_index()
    return means.assign(x=(means.block + 0.5) / blocks)


def flat_after_burnin(traces: pd.DataFrame, tol: float = 0.1, blocks: int = 8) -> bool:
    """Whether the drawn losses have no trend: the least-squares slope of the draws' block means
    (all chains), over the span of the draws, is below `tol` of the mean excess loss E[L] - L(w*)
    or within three standard errors of zero (the scatter of the block means: minibatch noise)."""
    drawn = traces[~traces.burnin]
    if drawn.empty or not np.isfinite(drawn.loss).all():
        return False
    means = _block_means(traces, blocks)
    x, y = means.x.to_numpy(), means.excess.to_numpy()
    if len(np.unique(x)) < 2:
        return True
    slope, intercept = np.polyfit(x, y, 1)
    residual = y - (slope * x + intercept)
    se = math.sqrt(residual.var(ddof=2) / ((x - x.mean()) ** 2).sum()) if len(y) > 2 else 0.0
    return bool(abs(slope) <= tol * abs(y.mean()) or abs(slope) <= 3 * se)


def relative_standard_error(traces: pd.DataFrame, blocks: int = 8) -> float:
    """The standard error of the mean excess loss over the draws (block means: autocorrelation
    within a block does not count twice), relative to that mean."""
    if traces[~traces.burnin].empty:
        return math.inf
    means = _block_means(traces, blocks).excess
    return float(means.std(ddof=1) / math.sqrt(len(means)) / abs(means.mean())) if len(means) > 1 else math.inf


def agree(a: pd.DataFrame, b: pd.DataFrame, tol: float) -> bool:
    """Two estimates (rows per chain) agree within `tol` relative plus one standard error of the difference."""
    ma, mb = a.llc.mean(), b.llc.mean()
    if not (math.isfinite(ma) and math.isfinite(mb)):
        return False
    se = math.sqrt(sum(f.llc.var(ddof=1) / len(f) if len(f) > 1 else 0.0 for f in (a, b)))
    return bool(abs(ma - mb) <= tol * max(abs(ma), abs(mb)) + se)


def relaxation_time(lr: float, localization: float) -> float:
    """2 / (lr * localization): the SGLD steps a direction held only by the localization takes to relax."""
    return 2 / (lr * localization)


def chain_length(lr: float, localization: float, max_steps: int, stretch: float = 1.0, min_steps: int = 50) -> int:
    """Burn-in (= draws) steps: `stretch` times the `relaxation_time`, within [min_steps, max_steps / 2]."""
    return int(min(max(math.ceil(stretch * relaxation_time(lr, localization)), min_steps), max_steps // 2))


def relaxes(lr: float, localization: float, max_steps: int) -> bool:
    """Whether chains of at most `max_steps` (burn-in and as many draws) reach the `relaxation_time`.
    Capped below it, the estimate at half the localization measures a transient, so the localization
    check cannot pass: on a deep linear network of 10^5 weights the estimate kept rising as the
    localization fell, at the cap, while the check passed, and the exact value does not rise there
    (benchmarks/RESULTS.md, 2026-12-07)."""
    return math.ceil(relaxation_time(lr, localization)) <= max_steps // 2


@dataclass
class Calibration:
    """The chosen SGLD settings (`config`, dimensionless lr and localization), the preconditioner
    (`scales` per tensor; for a model of at most `FULL_LIMIT` sampled weights the `hessian` of
    nbeta L, above it its sharp directions `low_rank`, whose `transform` is used instead), the
    diagnostics at the chosen point and the `sweep` (one row per setting tried)."""

    config: SGLDConfig
    scales: dict[str, float]
    dimension: int
    diverged: bool
    flat: bool
    stable: bool
    localization_ok: bool
    sweep: pd.DataFrame
    hessian: torch.Tensor | None = None
    floor: float | None = None  # of the full or low-rank preconditioner (`whitening`, `LowRankTransform`)
    low_rank: LowRankTransform | None = None
    traces: dict = field(default_factory=dict, repr=False)  # chains sampled with it, by step (`analyses.llc.adapters`)

    @property
    def ok(self) -> bool:
        return not self.diverged and self.flat and self.stable and self.localization_ok

    @property
    def preconditioner(self) -> str:
        return "full" if self.hessian is not None else "low-rank" if self.low_rank is not None else "per-tensor"

    def transform(self, model: torch.nn.Module | None = None,
                  masks: Masks | None = None) -> torch.Tensor | LowRankTransform | None:
        """The full or low-rank preconditioner (None: per-tensor `scales`), restricted to the weights
        `masks` selects (a component of the calibrated model: its rows and columns of the Hessian,
        `LowRankTransform.restrict`)."""
        if self.hessian is None and self.low_rank is None:
            return None
        if masks is None:
            return whitening(self.hessian, self.floor) if self.low_rank is None else self.low_rank
        size = len(self.hessian) if self.low_rank is None else self.low_rank.dim
        if model is None or size != sum(p.numel() for p in model.parameters()):
            raise ValueError("masks are invalid for this calibration: allowed with the model it calibrated whole")
        keep = flat_positions(model, masks)
        return whitening(self.hessian[keep][:, keep], self.floor) if self.low_rank is None else \
            self.low_rank.restrict(keep)

    def diagnostics(self) -> dict:
        return {"diverged": self.diverged, "flat": self.flat, "stable": self.stable,
                "localization_ok": self.localization_ok, "ok": self.ok}

    def scales_frame(self) -> pd.DataFrame:
        """One row per sampled tensor with its scale; the settings and diagnostics as columns (a cache entry)."""
        settings = asdict(self.config)
        if self.preconditioner != "per-tensor":
            raise ValueError(f"a calibration with a {self.preconditioner} preconditioner is invalid for the cache "
                             "frames: allowed per-tensor scales (calibrate with full_limit=0)")
        return pd.DataFrame({"param": list(self.scales), "scale": list(self.scales.values())}).assign(
            dimension=self.dimension, **settings, **self.diagnostics())

    @classmethod
    def from_frames(cls, scales: pd.DataFrame, sweep: pd.DataFrame) -> Calibration:
        row = scales.iloc[0]
        fields = {k: int(row[k]) for k in ("num_chains", "num_burnin", "num_draws", "batch_size", "seed")}
        fields |= {k: float(row[k]) for k in ("lr", "localization", "nbeta")} | {"paired": bool(row.paired)}
        return cls(SGLDConfig(**fields), dict(zip(scales.param, scales.scale.astype(float))), int(row.dimension),
                   bool(row.diverged), bool(row.flat), bool(row.stable), bool(row.localization_ok), sweep)


def calibrate(model: torch.nn.Module, data: Data, loss_fn: Callable = mse_loss, masks: Masks | None = None,
              nbeta: float | None = None, batch_size: int | None = None, num_chains: int = 4,
              max_steps: int = 4000, rounds: int = 4, tol: float = 0.1, target_error: float = 0.03,
              full_limit: int = FULL_LIMIT, rank: int = RANK_LIMIT, seed: int = 0,
              progress: bool = False) -> Calibration:
    """SGLD settings for the LLC of `model` at its weights on `data`, by the procedure of the module
    docstring: the sweep runs `CHAINS` chains per setting; the chosen config has `num_chains` chains
    and enough draws (at most `max_steps`) for a standard error of about `target_error` of the
    estimate. `batch_size` defaults to all examples up to 4096 (the paired minibatch losses keep
    the minibatch noise small beyond). A model with at most `full_limit` sampled weights is
    preconditioned by its whole Hessian (`whitening`) rather than per tensor, a larger one by its
    sharpest directions, at most `rank` (`sharp_directions`); full_limit=0 keeps the per-tensor
    scales alone (what the report's cache holds), and so does rank=0 above `full_limit`."""
    n = effective_sample_size(data)
    nbeta = default_nbeta(n) if nbeta is None else float(nbeta)
    batch_size = min(n, 4096) if batch_size is None else batch_size
    scales = curvature_scales(model, data, nbeta, loss_fn, masks, seed=seed)
    dimension = sampled_dimension(model, masks)
    hessian = sampled_hessian(model, data, nbeta, loss_fn, masks) if dimension <= full_limit else None
    low_rank = sharp_directions(model, data, nbeta, scales, loss_fn, masks, rank, seed=seed, progress=progress) \
        if dimension > full_limit > 0 and rank > 0 else None

    def preconditioner(floor: float | None):
        if hessian is not None:
            return whitening(hessian, floor)
        return None if low_rank is None else low_rank.with_floor(floor)

    floor = None if hessian is None and low_rank is None else FULL_FLOORS[0]
    transform = preconditioner(floor)
    base = SGLDConfig(num_chains=CHAINS, batch_size=batch_size, nbeta=nbeta, seed=seed, paired=True)
    results: dict[tuple[float, float, int, float | None], tuple[pd.DataFrame, bool, bool, float]] = {}

    def estimate(lr: float, localization: float, stretch: float):
        steps = chain_length(lr, localization, max_steps, stretch)
        if (lr, localization, steps, floor) not in results:
            config = replace(base, lr=lr, localization=localization, num_burnin=steps, num_draws=steps)
            traces = sgld_traces(model, data, config, loss_fn, masks=masks, scales=scales, transform=transform)
            chains = llc_from_traces(traces)
            diverged = bool(diverged_chains(traces)) or bool((chains.llc.abs() > dimension).any())
            flat = not diverged and flat_after_burnin(traces, tol)
            results[(lr, localization, steps, floor)] = (chains, diverged, flat, relative_standard_error(traces))
        return results[(lr, localization, steps, floor)]

    point = (START_LR, START_LOCALIZATION, 1.0)  # (lr, localization, chain-length stretch)
    for coarser in FULL_FLOORS[1:] if floor is not None else ():  # a whitened direction that runs away
        if not estimate(*point)[1]:  # (a singular model's near-flat one) is left to the localization
            break
        floor, transform = coarser, preconditioner(coarser)
    for round_ in tqdm(range(rounds), desc="LLC calibration", disable=not progress):
        lr, localization, stretch = point
        chains, diverged, flat, error = estimate(*point)
        stable = localization_ok = False
        if not diverged:
            half_lr, half_loc = estimate(lr / 2, localization, stretch), estimate(lr, localization / 2, stretch)
            stable = not half_lr[1] and agree(chains, half_lr[0], tol / 2)
            localization_ok = (relaxes(lr, localization / 2, max_steps) and not half_loc[1]
                               and agree(chains, half_loc[0], tol / 2))
            flat = flat and half_lr[2] and half_loc[2]
        if (not diverged and flat and stable and localization_ok) or round_ == rounds - 1:
            break
        if diverged or not stable or not localization_ok:
            point = (lr / 2 if diverged or not stable else lr,
                     localization / 2 if not diverged and not localization_ok else localization, stretch)
        else:  # only the traces fail: longer chains are the remedy
            point = (lr, localization, stretch * 2)
    steps = chain_length(lr, localization, max_steps, stretch)
    draws = CHAINS * steps * (error / target_error) ** 2 / num_chains if math.isfinite(error) else steps
    chosen = replace(base, num_chains=num_chains, lr=lr, localization=localization, num_burnin=steps,
                     num_draws=int(min(max(math.ceil(draws), steps), max_steps - steps)))
    sweep = pd.DataFrame([{"lr": a, "localization": b, "steps": s, "floor": e, "llc": c.llc.mean(),
                           "llc_std": c.llc.std(ddof=1), "diverged": d, "flat": f,
                           "chosen": (a, b, s, e) == (lr, localization, steps, floor)}
                          for (a, b, s, e), (c, d, f, _) in results.items()])
    return Calibration(chosen, scales, dimension, diverged, flat, stable, localization_ok, sweep, hessian, floor,
                       transform if low_rank is not None else None)
