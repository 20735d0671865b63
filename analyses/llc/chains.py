"""SGLD chains for the LLC, run for speed: the same sampler as `analyses.llc.sampler.sgld_traces`, cheaper.

Time to a given standard error is what an LLC costs. On a CPU it comes less from raw throughput than
from the work each precise digit needs, so these chains differ from the plain loop in four ways,
none of which changes what is sampled (the tempered posterior localised at w*, `analyses.llc.estimator`):

- **one flat step**: all sampled weights are one vector u (`analyses.llc.coordinates.Reparametrized`)
  and the Langevin step u <- u - lr/2 (nbeta grad + localization u) + sqrt(lr) xi is four vector
  operations (per-tensor preconditioning: an lr and a localization per element), not an optimizer's
  loop over parameter groups;
- **minibatches fixed once**: the data is cut into n // batch_size minibatches that every step draws
  from at random (devinterp's loader cycles a fixed shuffle the same way), so L(w*) on each one, the
  paired control variate (`SGLDConfig.paired`), is computed once instead of once per step;
- **the noise's own control variate**: the first-order change of nbeta L that a step's noise causes,
  nbeta grad . sqrt(lr) xi, has mean exactly zero (xi is drawn after the gradient). Its running sum
  tracks the slow wandering of the loss, so the estimate is read as mean(excess) - b mean(noise term),
  b fitted across blocks of draws (`estimate`): the same mean with less variance;
- **chains spread over processes and stopped by their traces**: chains advance in rounds over
  `workers` lanes (this process and spawned ones) until the standard error reaches `target_error`
  of the estimate, and the burn-in is read off the traces (MSER: the cut that minimises the
  standard error of what is left).
"""

from __future__ import annotations

import copy
import math
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from multiprocessing import get_context
from typing import Callable

import numpy as np
import pandas as pd
import torch

from analyses.llc.coordinates import Reparametrized
from analyses.llc.data import Data, Masks, SGLDConfig, data_size, full_loss, is_batch, is_indexable, mse_loss

BLOCKS = 4  # the fewest blocks of draws per chain, each twice the autocorrelation time, for a trusted error


@dataclass
class Chain:
    """One chain's state between rounds: its coordinates u, its two generators' states, its trace rows
    `(step, loss, reference_loss, noise_term)` (a round's new ones only, while it runs in a worker)."""

    index: int
    steps: int = 0
    ended: bool = False  # its loss stopped being finite
    u: torch.Tensor | None = None
    noise_state: torch.Tensor | None = None
    order_state: torch.Tensor | None = None
    rows: list = field(default_factory=list)


def fixed_minibatches(data: Data, batch_size: int, seed: int = 0) -> list:
    """`data` cut once into n // batch_size minibatches of a seeded shuffle (the rest dropped), or an
    iterable's own items."""
    if not is_indexable(data):
        return list(data)
    n = data_size(data)
    if n < batch_size:
        raise ValueError(f"batch_size={batch_size} is invalid for {n} examples: allowed <= {n}")
    rows = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    parts = [rows[i:i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]
    return [data[r] if is_batch(data) else (data[0][r], data[1][r]) for r in parts]


def _step_vectors(sampler: Reparametrized, config: SGLDConfig, scales: dict[str, float] | None,
                  transform) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-coordinate step size and localization of u: lr / k_t and localization * k_t for tensor t
    under per-tensor scales, else the config's own."""
    u = sampler.u
    if scales is None or transform is not None:
        return torch.full_like(u, config.lr), torch.full_like(u, config.localization)
    k = torch.cat([torch.full((size,), float(scales[name]), dtype=u.dtype, device=u.device)
                   for (name, _, _), size in zip(sampler.sampled, sampler.sizes)])
    return config.lr / k, config.localization * k


def langevin_step(u: torch.Tensor, grad: torch.Tensor, lr: torch.Tensor, localization: torch.Tensor,
                  nbeta: float, xi: torch.Tensor) -> torch.Tensor:
    """u <- u - lr / 2 (nbeta grad + localization u) + xi in place (xi ~ N(0, lr), drawn by the
    caller): devinterp's SGLD step with its Gaussian prior centred at w* (u = 0). `grad` is overwritten."""
    drift = grad.mul_(nbeta).addcmul_(localization, u).mul_(lr)
    return u.sub_(drift, alpha=0.5).add_(xi)


def advance(chain: Chain, model: torch.nn.Module, batches: list, references: list[float], config: SGLDConfig,
            steps: int, scales: dict[str, float] | None = None, transform=None, masks: Masks | None = None,
            loss_fn: Callable = mse_loss, threads: int | None = None) -> Chain:
    """`chain` moved `steps` SGLD steps further (its state and trace rows); a chain whose loss stops
    being finite ends with a row of loss inf and is not moved again."""
    if threads:
        torch.set_num_threads(threads)
    if chain.ended:
        return chain
    sampler = Reparametrized(copy.deepcopy(model).train(), masks, transform)
    u = sampler.u.data
    lr, localization = _step_vectors(sampler, config, scales, transform)
    noise_scale = lr.sqrt()
    noise, order = torch.Generator(device=u.device), torch.Generator()
    if chain.u is None:
        noise.manual_seed(config.seed * 1000 + chain.index + 1)
        order.manual_seed(config.seed * 1000 + chain.index)
    else:
        u.copy_(chain.u)
        noise.set_state(chain.noise_state)
        order.set_state(chain.order_state)
    nbeta, start = config.inverse_temperature, chain.steps
    for step in range(start, start + steps):
        k = int(torch.randint(len(batches), (1,), generator=order))
        with torch.enable_grad():
            loss = loss_fn(sampler, batches[k])
            (grad,) = torch.autograd.grad(loss, [sampler.u])
        value = loss.item()
        if not math.isfinite(value):
            chain.rows.append((step, math.inf, references[k], 0.0))
            chain.ended = True
            break
        with torch.no_grad():
            xi = torch.randn(u.shape, generator=noise, dtype=u.dtype, device=u.device).mul_(noise_scale)
            noise_term = nbeta * float(grad @ xi)
            langevin_step(u, grad, lr, localization, nbeta, xi)
        chain.rows.append((step, value, references[k], noise_term))
    chain.u, chain.noise_state, chain.order_state = u.clone(), noise.get_state(), order.get_state()
    chain.steps = start + steps
    return chain


def mser_burnin(excess: np.ndarray, batch: int = 5) -> int:
    """The burn-in read off a trace (MSER-5): the cut, in batches of `batch` steps and at most half the
    trace, that minimises the squared standard error of the mean of what is left."""
    n = len(excess) // batch
    if n < 4:
        return 0
    means = excess[:n * batch].reshape(n, batch).mean(1)
    scores = [means[d:].var() / (n - d) for d in range(n // 2 + 1)]
    return int(np.argmin(scores)) * batch


def autocorrelation_time(series: list[np.ndarray], window: float = 5.0) -> float:
    """The integrated autocorrelation time of equally long traces (their autocorrelations averaged),
    summed up to Sokal's window: the first lag M with M >= `window` times the sum so far. At least 1."""
    n = min((len(x) for x in series), default=0)
    if n < 4:
        return 1.0
    curves = []
    for x in series:
        x = x[:n] - x[:n].mean()
        spectrum = np.fft.rfft(x, 2 * n)
        curve = np.fft.irfft(spectrum * np.conj(spectrum))[:n]
        if curve[0] > 0:
            curves.append(curve / curve[0])
    if not curves:
        return 1.0
    taus = 2 * np.cumsum(np.mean(curves, 0)) - 1
    inside = np.arange(n) >= window * taus
    return float(max(1.0, taus[np.argmax(inside)] if inside.any() else taus[-1]))


def _blocks(frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, list, float, int]:
    """The draws (rows not marked burn-in) of each chain cut into blocks of twice the excess loss's
    autocorrelation time (at least 2 per chain): the block means of the excess nbeta (loss -
    reference_loss) and of the noise term, each block's chain, the time and the block length."""
    nbeta = float(frame.nbeta.iloc[0])
    parts = [(chain, nbeta * (part.loss.to_numpy() - part.reference_loss.to_numpy()), part.noise_term.to_numpy())
             for chain, part in frame[~frame.burnin].groupby("chain")]
    parts = [p for p in parts if len(p[1]) >= 2]
    tau = autocorrelation_time([x for _, x, _ in parts])
    shortest = min((len(x) for _, x, _ in parts), default=0)
    length = max(1, min(math.ceil(2 * tau), shortest // 2))
    excess, noise, owners = [], [], []
    for chain, x, z in parts:
        count = len(x) // length
        excess += list(x[:count * length].reshape(count, length).mean(1))
        noise += list(z[:count * length].reshape(count, length).mean(1))
        owners += [chain] * count
    return np.array(excess), np.array(noise), owners, tau, length


def control_coefficient(frame: pd.DataFrame) -> float:
    """b of the noise's control variate: the regression coefficient of the excess's block means on
    the noise term's (0 where the traces have no noise term or too few blocks)."""
    if "noise_term" not in frame or not np.isfinite(frame.loss).all():
        return 0.0
    excess, noise, *_ = _blocks(frame)
    return float(np.cov(excess, noise)[0, 1] / noise.var(ddof=1)) if len(noise) > 2 and noise.var() > 0 else 0.0


def estimate(frame: pd.DataFrame, control: bool = True) -> dict:
    """The LLC from chains' traces (`traces`): the draws of each chain (after its marked burn-in) in
    blocks of twice their autocorrelation time; nbeta times the mean excess loss (paired with L(w*)
    on the same minibatch) minus b times the mean noise term (`control_coefficient`, when
    `control`), and its standard error from the scatter of the corrected block means. Returns `llc`,
    `se`, `b`, `tau` (steps), `trusted` (at least `BLOCKS` blocks per chain: the error is then an
    error, not a guess), `burnin` (mean over chains), `draws` (all chains) and `chains` (each chain's
    corrected mean)."""
    if not np.isfinite(frame.loss).all():
        return {"llc": math.inf, "se": math.inf, "b": 0.0, "tau": math.nan, "trusted": False, "burnin": 0.0,
                "draws": 0, "chains": [math.inf]}
    excess, noise, owners, tau, length = _blocks(frame)
    burnin = float(frame[frame.burnin].groupby("chain").size().reindex(frame.chain.unique(), fill_value=0).mean())
    if len(excess) < 3:
        return {"llc": math.nan, "se": math.inf, "b": 0.0, "tau": tau, "trusted": False, "burnin": burnin,
                "draws": 0, "chains": []}
    b = control_coefficient(frame) if control else 0.0
    corrected = excess - b * noise
    per_chain = pd.Series(corrected).groupby(owners)
    return {"llc": float(corrected.mean()), "se": float(corrected.std(ddof=1 + bool(b)) / math.sqrt(len(corrected))),
            "b": b, "tau": tau, "trusted": bool(per_chain.size().min() >= BLOCKS and length >= 2 * tau),
            "burnin": burnin, "draws": int((~frame.burnin).sum()), "chains": per_chain.mean().tolist()}


def traces(chains: list[Chain], init_loss: float, nbeta: float, burnin: int | None = None) -> pd.DataFrame:
    """The chains' rows as `sgld_traces` frames them (`chain, sgld_step, loss, burnin, reference_loss,
    init_loss, nbeta`) with the `noise_term` column; `burnin` marks the first `burnin` steps of each
    chain, or (None) each chain's MSER cut (`mser_burnin`)."""
    frames = []
    for chain in chains:
        part = pd.DataFrame(chain.rows, columns=["sgld_step", "loss", "reference_loss", "noise_term"])
        excess = nbeta * (part.loss - part.reference_loss).to_numpy()
        cut = burnin if burnin is not None else mser_burnin(excess) if np.isfinite(excess).all() else 0
        frames.append(part.assign(chain=chain.index, burnin=part.sgld_step < cut))
    frame = pd.concat(frames, ignore_index=True).assign(init_loss=init_loss, nbeta=nbeta)
    return frame[["chain", "sgld_step", "loss", "burnin", "reference_loss", "init_loss", "nbeta", "noise_term"]]


def _prepared(model: torch.nn.Module, data: Data, config: SGLDConfig, loss_fn: Callable) -> tuple[list, list, float]:
    """The fixed minibatches, L(w*) on each and on all of `data`."""
    batches = fixed_minibatches(data, config.batch_size, config.seed)
    with torch.no_grad():
        references = [float(loss_fn(model, b)) for b in batches]
    return batches, references, full_loss(model, data, loss_fn)


def sample_many(estimates: list[dict], workers: int = 1, progress: bool = False) -> list[pd.DataFrame]:
    """The traces of several estimates' chains, all run together over `workers` lanes: each
    estimate a dict of `fast_traces` arguments (`model`, `data`, `config`, and optionally `loss_fn`,
    `scales`, `transform`, `masks`), each chain num_burnin + num_draws steps. One pool for all of them
    keeps both cores busy to the end (the report's checkpoints and its calibration's checks). Each
    chain's first num_burnin steps are its burn-in."""
    from tqdm.auto import tqdm

    jobs, setups = [], []
    for spec in estimates:
        config = spec["config"].validate()
        options = {k: spec.get(k) for k in ("scales", "transform", "masks")} | {"loss_fn": spec.get("loss_fn", mse_loss)}
        batches, references, init_loss = _prepared(spec["model"], spec["data"], config, options["loss_fn"])
        setups.append((init_loss, config.inverse_temperature, config.num_burnin))
        jobs += [(len(setups) - 1, (Chain(c), spec["model"], batches, references, config,
                                    config.num_burnin + config.num_draws), options)
                 for c in range(config.num_chains)]
    done = _run_jobs([(args, options) for _, args, options in jobs], workers,
                     tqdm(total=len(jobs), desc="SGLD chains", unit="chain", disable=not progress))
    return [traces([chain for (owner, _, _), chain in zip(jobs, done) if owner == i], *setup)
            for i, setup in enumerate(setups)]


def fast_traces(model: torch.nn.Module, data: Data, config: SGLDConfig, loss_fn: Callable = mse_loss,
                scales: dict[str, float] | None = None, transform=None, masks: Masks | None = None,
                workers: int = 1, target_error: float | None = None, round_steps: int = 100,
                max_steps: int | None = None, progress: bool = False) -> pd.DataFrame:
    """`config.num_chains` SGLD chains of `model` on `data` (the settings, preconditioner and masks of
    `analyses.llc.sampler.sgld_traces`), framed like its traces plus a `noise_term` column.

    Without `target_error` each chain runs num_burnin + num_draws steps. With it, chains advance
    `round_steps` at a time (at least twice) until `estimate` gives a trusted standard error (at
    least `BLOCKS` blocks of twice the autocorrelation time per chain) below `target_error` of the
    estimate, or `max_steps` (default ten times num_burnin + num_draws).
    Chains run over `workers` lanes, this process and workers - 1 spawned ones (one thread each),
    where the model, data and loss function can be sent there, else in this process alone."""
    from tqdm.auto import tqdm

    config = config.validate()
    nbeta = config.inverse_temperature
    batches, references, init_loss = _prepared(model, data, config, loss_fn)
    least = config.num_burnin + config.num_draws if target_error is None else 2 * round_steps
    most = max(least, max_steps if max_steps is not None else 10 * (config.num_burnin + config.num_draws))
    chains = [Chain(i) for i in range(config.num_chains)]
    options = {"scales": scales, "transform": transform, "masks": masks, "loss_fn": loss_fn}
    pool = _executor(workers)
    bar = tqdm(total=most if target_error else least, desc="SGLD chains", unit="step", disable=not progress)
    try:
        done = 0
        while done < most:
            steps = min(least if done == 0 else round_steps, most - done)
            sent = [replace(c, rows=[]) for c in chains]  # the rows so far stay here
            moved = _run_jobs([((c, model, batches, references, config, steps), options) for c in sent], pool)
            chains = [replace(new, rows=old.rows + new.rows) for old, new in zip(chains, moved)]
            done += steps
            bar.update(steps)
            if target_error is None:
                break
            result = estimate(traces(chains, init_loss, nbeta))  # burn-in: each chain's MSER cut
            if not math.isfinite(result["llc"]) or (result["trusted"]
                                                    and result["se"] <= target_error * abs(result["llc"])):
                break
    finally:
        bar.close()
        if isinstance(pool, ProcessPoolExecutor):
            pool.shutdown()
    return traces(chains, init_loss, nbeta, None if target_error else config.num_burnin)


def _advance_job(job: tuple[tuple, dict]) -> Chain:
    args, options = job
    return advance(*args, **options)


def _advance_remote(payload: bytes) -> Chain:
    import pickle

    torch.set_num_threads(1)  # a worker's one core
    return _advance_job(pickle.loads(payload))


def _executor(workers: int) -> ProcessPoolExecutor | None:
    """The spawned processes beside this one for `workers` lanes (None for one lane: this process)."""
    if workers <= 1:
        return None
    executor = ProcessPoolExecutor(workers - 1, mp_context=get_context("spawn"))
    executor.lanes = workers - 1
    return executor


def _payload(job: tuple[tuple, dict]) -> bytes | None:
    """`job` pickled for a spawned process, or None where it cannot go. The classes and functions of
    modules that process could not import by name (a model factory's file loaded by its path,
    `mechlrmc.factory.import_object`; a notebook's `__main__`) travel by value (cloudpickle): a
    recorded run's model is rebuilt there from its pickled class, not looked up."""
    from importlib.machinery import PathFinder

    import cloudpickle

    (_, model, *_), options = job
    names = {type(m).__module__ for m in model.modules()} | {getattr(options.get("loss_fn"), "__module__", None)}
    for name in sorted(n for n in names if n and n != "__main__" and n in sys.modules):
        top = name.partition(".")[0]  # looked for where the spawned process looks: on sys.path, not in sys.modules
        if top not in sys.builtin_module_names and PathFinder.find_spec(top) is None:
            cloudpickle.register_pickle_by_value(sys.modules[name])
    try:
        return cloudpickle.dumps(job)
    except Exception:  # noqa: BLE001 - whatever does not pickle is sampled in this process
        return None


def _run_jobs(jobs: list[tuple[tuple, dict]], pool: ProcessPoolExecutor | int | None, bar=None) -> list[Chain]:
    """`advance` on every job over lanes that each take the next job when free: this process (a
    thread: torch releases the GIL) and the processes of `pool` (an executor, or a number of lanes
    for one made here), or this process alone where the jobs cannot be sent."""
    import threading

    own = isinstance(pool, int)
    executor = _executor(pool) if own else pool
    try:
        payloads = [_payload(job) for job in jobs] if executor is not None else []
        if executor is None or None in payloads:
            results = []
            for job in jobs:
                results.append(_advance_job(job))
                if bar is not None:
                    bar.update(1)
            return results
        results, errors, lock, order = [None] * len(jobs), [], threading.Lock(), iter(range(len(jobs)))

        def lane(remote: bool):
            while not errors:
                with lock:
                    i = next(order, None)
                if i is None:
                    return
                try:
                    results[i] = executor.submit(_advance_remote, payloads[i]).result() if remote else _advance_job(jobs[i])
                except BaseException as error:  # noqa: BLE001 - raised again in the caller
                    errors.append(error)
                if bar is not None:
                    bar.update(1)

        lanes = [threading.Thread(target=lane, args=(True,)) for _ in range(executor.lanes)]
        lanes.append(threading.Thread(target=lane, args=(False,)))
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # this process's lane gets one core, as each spawned one does
        try:
            for thread in lanes:
                thread.start()
            for thread in lanes:
                thread.join()
        finally:
            torch.set_num_threads(threads)
        if errors:
            raise errors[0]
        return results
    finally:
        if own and executor is not None:
            executor.shutdown()
        if bar is not None:
            bar.close()
