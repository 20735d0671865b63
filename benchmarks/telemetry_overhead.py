"""Training time with live telemetry (`train.log`) against without, at the cpu preset's evaluation interval.

    python benchmarks/telemetry_overhead.py                      # 1000 steps, 3 rounds, tensorboard and wandb
    python benchmarks/telemetry_overhead.py --steps 500 --rounds 5 --logs tensorboard --clock cpu

Each round trains the `cpu` preset (one thread, evaluation every 250 steps, so 1000 steps hold 5
evaluations and 2 image steps) once per setting into a fresh run directory, the settings in a
rotated order each round, so machine noise hits all alike. A run is timed from the Trainer's
construction (W&B starts there) to the end of `train()`. Per setting: the median wall time, the
median process CPU time (threads included; W&B's own service process is not) and the median wall
time spent inside the telemetry's callbacks. W&B runs offline.
The last lines give the ratio of median times per setting, the first of `--logs` last, as
`overhead tensorboard vs none: 1.01x`: wall times, or with `--clock cpu` process CPU times (robust
when other jobs share the cores, as in `train_throughput.py`; blind to W&B's service process).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mechlrmc.config import preset
from mechlrmc.telemetry import Telemetry
from mechlrmc.train import Trainer


def timed_callbacks() -> list[float]:
    """Wrap the telemetry's callbacks so that each call adds its wall time to the returned list."""
    spent: list[float] = []
    for name in ("on_eval", "on_checkpoint", "on_close"):
        original = getattr(Telemetry, name)

        def wrapper(self, trainer, _original=original):
            start = time.perf_counter()
            try:
                _original(self, trainer)
            finally:
                spent.append(time.perf_counter() - start)

        setattr(Telemetry, name, wrapper)
    return spent


def one_run(log: str, steps: int, out: Path, spent: list[float]) -> tuple[float, float, float]:
    """(wall s, process CPU s, s inside the telemetry) of one run."""
    cfg = preset("cpu").override([f"train.steps={steps}", f"train.log={log}", "train.device=cpu"])
    before = len(spent)
    wall, cpu = time.perf_counter(), time.process_time()
    Trainer(cfg, out, progress=False).train()
    return time.perf_counter() - wall, time.process_time() - cpu, sum(spent[before:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--logs", nargs="+", default=["tensorboard", "wandb"], choices=["tensorboard", "wandb", "both"])
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="the time the last lines compare")
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("WANDB_MODE", "offline")
    spent = timed_callbacks()
    settings = ["none", *args.logs]
    times: dict[str, list[tuple[float, float, float]]] = {s: [] for s in settings}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            order = settings[round_ % len(settings):] + settings[:round_ % len(settings)]
            for log in order:
                times[log].append(one_run(log, args.steps, Path(tmp) / f"{log}-{round_}", spent))
                wall, cpu, inside = times[log][-1]
                print(f"round {round_ + 1} {log:>11}: {wall:7.2f} s wall, {cpu:7.2f} s CPU, "
                      f"{inside:5.2f} s in telemetry", flush=True)
    cfg = preset("cpu")
    print(f"cpu preset, {args.steps} steps, eval_every {cfg.train.eval_every} "
          f"({args.steps // cfg.train.eval_every + 1} evaluations), {args.rounds} rounds, 1 thread; medians:")
    base_wall, base_cpu = (statistics.median(t[i] for t in times["none"]) for i in range(2))
    for log in settings:
        wall, cpu, inside = (statistics.median(t[i] for t in times[log]) for i in range(3))
        print(f"  {log:>11}: {wall:7.2f} s wall ({wall / base_wall:.3f}x), {cpu:7.2f} s CPU ({cpu / base_cpu:.3f}x), "
              f"{inside:5.2f} s in telemetry ({inside / wall:.1%} of the run)")
    clock = 0 if args.clock == "wall" else 1
    for log in [*args.logs[1:], args.logs[0]]:  # the first of --logs last
        ratio = statistics.median(t[clock] for t in times[log]) / (base_wall, base_cpu)[clock]
        print(f"overhead {log} vs none ({args.clock} time): {ratio:.2f}x")


if __name__ == "__main__":
    main()
