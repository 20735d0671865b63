"""Time to a given precision of the LLC: devinterp's own SGLD loop against mechlrmc's chains.

    python benchmarks/llc_speed.py --run checkpoints/cpu --target 0.02

For each case (the shipped cpu run at a plateau checkpoint and at its last, post-drop, checkpoint)
both samplers use the same settings: nbeta = n / log n of the 512-example analysis batch, minibatch
64, the report's step size and localization (0.2 and 0.02 in curvature units) and the same
per-tensor preconditioning (`analyses.llc.calibrate.curvature_scales`, one SGMCMC parameter group
per tensor for devinterp), 4 chains.

- **devinterp**: its `SGMCMC.sgld` optimizer stepped as `devinterp.slt.sampler.sample_single_chain`
  steps it (a deep copy per chain, a cycled loader of fixed minibatches, forward, backward,
  `optimizer.step()`, `zero_grad`, the loss kept), chains one after another, no observables or
  storage, and the estimate nbeta (mean loss after burn-in - L(w*)). Its burn-in is the report's
  (`--burnin`); its draws grow until the standard error is at most `--target` of the estimate and
  trusted (the same reading as mechlrmc's: blocks of twice the autocorrelation time, at least 4
  per chain): the time is that of the shortest run that gets there, measured step by step on one
  long run.
- **mechlrmc**: `analyses.llc.chains.fast_traces(..., workers=2, target_error=target)`, wall clock
  from the call to its return (process start-up included).

The last line is devinterp's time over mechlrmc's at the post-drop checkpoint, e.g. `3.10x`.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import math
import time

import numpy as np
import pandas as pd
import torch

from analyses.base.walk import analysis_batch
from analyses.llc.calibrate import curvature_scales, default_nbeta
from analyses.llc.chains import estimate, fast_traces, fixed_minibatches
from analyses.llc.data import SGLDConfig, full_loss, mse_loss
from mechlrmc.runs import Run


def devinterp_chain(model, batches, scales, config: SGLDConfig, steps: int, chain: int) -> tuple[np.ndarray, np.ndarray]:
    """One chain of devinterp's loop: the minibatch loss and the elapsed seconds after each step."""
    from devinterp.optim import SGMCMC
    from devinterp.optim.prior import GaussianPrior

    start = time.perf_counter()
    sampler = copy.deepcopy(model).train()
    torch.manual_seed(config.seed * 1000 + chain)
    groups = [{"params": [p], "lr": config.lr / scales[name],
               "prior": GaussianPrior(config.localization * scales[name], "initial")}
              for name, p in sampler.named_parameters()]
    optimizer = SGMCMC.sgld(groups, lr=config.lr, localization=config.localization, nbeta=config.inverse_temperature)
    order = torch.randperm(len(batches), generator=torch.Generator().manual_seed(chain)).tolist()
    feed = itertools.cycle([batches[i] for i in order])
    losses, clock = np.empty(steps), np.empty(steps)
    for i in range(steps):
        loss = mse_loss(sampler, next(feed))
        loss.backward()
        if not math.isfinite(loss.item()):
            raise SystemExit(f"devinterp's chain {chain} diverged at step {i}")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses[i], clock[i] = loss.item(), time.perf_counter() - start
    return losses, clock


def devinterp_time_to(losses: list[np.ndarray], clocks: list[np.ndarray], init_loss: float, nbeta: float,
                      burnin: int, target: float, grain: int = 50) -> dict:
    """The shortest devinterp run (chains of burnin + N steps, N a multiple of `grain`) whose
    estimate has a trusted standard error of at most `target` of itself, by the same reading as
    mechlrmc's (`analyses.llc.chains.estimate` without a control variate: L(w*) for every
    reference, blocks of twice the autocorrelation time): its estimate, error and wall time."""
    longest = min(len(x) for x in losses) - burnin
    result = {"llc": math.nan, "se": math.inf}
    for draws in range(grain, longest + 1, grain):
        frame = pd.concat([pd.DataFrame({"chain": c, "sgld_step": np.arange(burnin + draws), "loss": x[:burnin + draws],
                                         "burnin": np.arange(burnin + draws) < burnin, "reference_loss": init_loss,
                                         "noise_term": 0.0, "nbeta": nbeta}) for c, x in enumerate(losses)])
        result = estimate(frame, control=False)
        if result["trusted"] and result["se"] <= target * abs(result["llc"]):
            seconds = sum(float(c[burnin + draws - 1]) for c in clocks)
            return {"llc": result["llc"], "se": result["se"], "seconds": seconds,
                    "steps": len(losses) * (burnin + draws)}
    return {"llc": result["llc"], "se": result["se"], "seconds": math.inf, "steps": len(losses) * (burnin + longest)}


def case(model, batch, args) -> dict:
    nbeta = default_nbeta(len(batch))
    scales = curvature_scales(model, batch, nbeta)
    config = SGLDConfig(num_chains=args.chains, num_burnin=args.burnin, num_draws=args.burnin, lr=args.lr,
                        localization=args.localization, batch_size=args.batch_size, nbeta=nbeta, paired=True)
    start = time.perf_counter()
    frame = fast_traces(model, batch, config, scales=scales, workers=args.workers, target_error=args.target,
                        max_steps=args.max_steps)
    ours = estimate(frame) | {"seconds": time.perf_counter() - start, "steps": len(frame)}
    batches = fixed_minibatches(batch, args.batch_size, config.seed)
    init_loss = full_loss(model, batch, mse_loss)
    runs = [devinterp_chain(model, batches, scales, config, args.max_steps, c) for c in range(args.chains)]
    theirs = devinterp_time_to([r[0] for r in runs], [r[1] for r in runs], init_loss, nbeta, args.burnin, args.target)
    return {"devinterp": theirs, "mechlrmc": ours}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="checkpoints/cpu")
    parser.add_argument("--target", type=float, default=0.02, help="standard error / estimate to reach")
    parser.add_argument("--chains", type=int, default=4)
    parser.add_argument("--burnin", type=int, default=150, help="devinterp's burn-in (the report's)")
    parser.add_argument("--max-steps", type=int, default=3000, help="per chain, both samplers")
    parser.add_argument("--lr", type=float, default=0.2)
    parser.add_argument("--localization", type=float, default=0.02)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from analyses.base.context import Context

    run = Run(args.run)
    ctx = Context(run, progress=False)
    batch = analysis_batch(run, 512)
    moments = {"plateau": ctx.key["plateau"], "post-drop": run.steps[-1]}
    rows = []
    for moment, step in moments.items():
        result = case(run.load_model(step), batch, args)
        for who, r in result.items():
            rows.append({"checkpoint": f"{moment} ({step})", "sampler": who, "llc": r["llc"], "se": r["se"],
                         "steps": r["steps"], "seconds": r["seconds"]})
        print(pd.DataFrame(rows[-2:]).to_string(index=False, float_format=lambda v: f"{v:.3g}"), flush=True)
    table = pd.DataFrame(rows)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    last = table[table.checkpoint.str.startswith("post-drop")].set_index("sampler")
    gap = abs(last.llc["devinterp"] - last.llc["mechlrmc"])
    joint = 2 * math.hypot(last.se["devinterp"], last.se["mechlrmc"])
    print(f"estimates {'agree' if gap <= joint else 'DIFFER'}: |difference| {gap:.3g} vs 2 joint standard errors {joint:.3g}")
    print(f"devinterp's time over mechlrmc's to {args.target:.0%} standard error, post-drop checkpoint: "
          f"{last.seconds['devinterp'] / last.seconds['mechlrmc']:.2f}x")


if __name__ == "__main__":
    main()
