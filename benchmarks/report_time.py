"""Time of a run's report: its sections in one process against the default two, from an empty cache.

The run directory is copied to a temporary folder first, so its cache (`RUN/cache/`) starts empty
and the original is not touched. Three reports of the copy are timed, wall clock, whole
`build_report` calls (loading, every section, the HTML):
- "sequential": `workers=1`, empty cache;
- "parallel": `workers=2` (the SGLD sampler and the patching sweeps in a second process), empty
  cache: a report's first run;
- "cached": `workers=2` again, reusing the cached LLC estimates: a second report.
It prints the section times of each and, last, the speed-up of the first-run parallel report over
the sequential one.

    python benchmarks/report_time.py --run checkpoints/cpu --threads 1
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from analyses.report import build_report
from analyses.store import clear
from mechlrmc.runs import Run


def timed(run: Run, workers: int) -> tuple[float, dict[str, float]]:
    start = time.perf_counter()
    report = build_report(run, progress=False, workers=workers)
    if report.errors:
        raise SystemExit(f"the report failed: {report.errors}")
    return time.perf_counter() - start, report.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", default="checkpoints/cpu")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        run = Run(shutil.copytree(args.run, Path(tmp) / Path(args.run).name,
                                  ignore=shutil.ignore_patterns("cache", "writer.lock")))
        clear(run)
        sequential, seq_sections = timed(run, 1)
        clear(run)
        parallel, par_sections = timed(run, 2)
        cached, cached_sections = timed(run, 2)
    for name, sections in (("sequential", seq_sections), ("parallel", par_sections), ("cached", cached_sections)):
        print(f"{name:>10}: " + ", ".join(f"{k} {v:.1f}" for k, v in sections.items()))
    print(f"report of {args.run}: sequential {sequential:.1f} s, parallel {parallel:.1f} s (first run), "
          f"cached {cached:.1f} s (second run)")
    print(f"parallel first run vs sequential: {sequential / parallel:.2f}x")


if __name__ == "__main__":
    main()
