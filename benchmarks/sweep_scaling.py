"""Sweep scaling: N equal trials through `mechlrmc sweep` (Ray Tune, one 1-thread trial per core)
against the same N trials trained back to back in one process, in the same run.

    python benchmarks/sweep_scaling.py                     # 2 trials of the cpu preset, 4000 steps
    python benchmarks/sweep_scaling.py --trials 4 --steps 1500

The trials differ only in their seed, so they do the same work. The sweep's time is end to end:
Ray's start-up, worker start-up and the trials. Ray's start-up alone is measured by starting and
stopping a local instance first. The last line ends with the speed-up, e.g. `1.87x`.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import pandas as pd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4000, help="steps per trial (a launch costs ~13 s, so short "
                        "trials understate the speed-up)")
    parser.add_argument("--out", help="scratch folder (default: a temporary one)")
    args = parser.parse_args()

    import logging

    import ray
    import torch

    from mechlrmc.sweep import sweep
    from mechlrmc.train import train
    from mechlrmc.trials import SweepSpec

    out = Path(args.out or tempfile.mkdtemp(prefix="sweep_scaling_"))
    spec = SweepSpec.from_dict({"preset": args.preset, "steps": args.steps, "seeds": args.trials,
                                "set": {"train.checkpoint_every": args.steps},
                                "resources": {"cpus_per_trial": 1}})
    trials = spec.trials()

    start = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    ray.shutdown()
    ray_startup = time.perf_counter() - start

    start = time.perf_counter()
    summary = sweep(spec, out / "sweep", progress=False)
    t_sweep = time.perf_counter() - start
    assert (summary.status == "finished").all(), summary

    torch.set_num_threads(1)
    start = time.perf_counter()
    for trial in trials:
        train(trial.config, out / "sequential" / trial.name, progress=False)
    t_seq = time.perf_counter() - start

    for trial in trials:  # the same numbers either way
        a = pd.read_csv(out / "sweep" / trial.name / "metrics.csv").drop(columns="wall_time")
        b = pd.read_csv(out / "sequential" / trial.name / "metrics.csv").drop(columns="wall_time")
        assert a.equals(b), f"{trial.name}: sweep and sequential metrics differ"

    cpus = os.cpu_count()
    print(f"preset={args.preset} trials={args.trials} steps={args.steps} cores={cpus} cpus_per_trial=1 "
          f"torch={torch.__version__} ray={ray.__version__}")
    print(f"  back to back in one process: {t_seq:7.1f} s ({t_seq / args.trials:.1f} s per trial)")
    print(f"  mechlrmc sweep (Ray Tune):   {t_sweep:7.1f} s (Ray start-up alone: {ray_startup:.1f} s)")
    print(f"  ideal on {cpus} cores: {min(cpus, args.trials):.2f}x; metrics identical in both")
    print(f"speed-up of mechlrmc sweep over back-to-back training: {t_seq / t_sweep:.2f}x")


if __name__ == "__main__":
    main()
