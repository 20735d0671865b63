"""Time of a run's report: its sections in one process against the default two, from an empty cache;
or (`--baseline REF`) this tree's first report against the one of another commit, in the same run.

The run directory is copied to a temporary folder first, so its cache (`RUN/cache/`) starts empty
and the original is not touched. Three reports of the copy are timed, wall clock, whole
`build_report` calls (loading, every section, the HTML):
- "sequential": `workers=1`, empty cache;
- "parallel": `workers=2` (the SGLD sampler and the patching sweeps in a second process), empty
  cache: a report's first run;
- "cached": `workers=2` again, reusing the cached LLC estimates: a second report.
It prints the section times of each and, last, the speed-up of the first-run parallel report over
the sequential one.

With `--baseline REF` it checks REF out into a temporary git worktree and times the first report
(parallel, empty cache) of each tree in a fresh process, alternating baseline and this tree
`--repeats` times; the last line is the baseline's median time over this tree's (above 1x: this
tree is faster).

    python benchmarks/report_time.py --run checkpoints/cpu --threads 1
    python benchmarks/report_time.py --run checkpoints/cpu --threads 1 --baseline HEAD~1 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# one first report in a fresh process of the tree on PYTHONPATH: {"seconds": wall, "sections": {...}}
FIRST_REPORT = """
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[2]))
try:
    from analyses.report.run_report import build_report
except ImportError:  # a tree from before the analysis layer's subpackages
    from analyses.report import build_report
from mechlrmc.runs import Run
start = time.perf_counter()
report = build_report(Run(sys.argv[1]), progress=False, workers=2)
if report.errors:
    raise SystemExit(f"the report failed: {report.errors}")
print(json.dumps({"seconds": time.perf_counter() - start, "sections": report.seconds}))
"""


def timed(run, workers: int) -> tuple[float, dict[str, float]]:
    from analyses.report.run_report import build_report

    start = time.perf_counter()
    report = build_report(run, progress=False, workers=workers)
    if report.errors:
        raise SystemExit(f"the report failed: {report.errors}")
    return time.perf_counter() - start, report.seconds


def fresh_copy(source: str, tmp: Path, name: str) -> Path:
    return Path(shutil.copytree(source, tmp / name, ignore=shutil.ignore_patterns("cache", "writer.lock")))


def first_report(tree: Path, run: Path, threads: int) -> dict:
    """One first report (empty cache) of `run` by the code in `tree`, in a fresh process."""
    shutil.rmtree(run / "cache", ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run([sys.executable, "-c", FIRST_REPORT, str(run), str(threads)], cwd=tree, env=env,
                         capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"the report of {tree} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def against_baseline(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        baseline = tmp / "baseline"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(baseline), args.baseline],
                       check=True, capture_output=True)
        try:
            run = fresh_copy(args.run, tmp, Path(args.run).name)
            times = {"baseline": [], "this tree": []}
            for _ in range(args.repeats):
                for name, tree in (("baseline", baseline), ("this tree", ROOT)):
                    result = first_report(tree, run, args.threads)
                    times[name].append(result["seconds"])
                    print(f"{name:>10}: {result['seconds']:.1f} s; " +
                          ", ".join(f"{k} {v:.1f}" for k, v in result["sections"].items()), flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(baseline)], check=False)
    before, after = statistics.median(times["baseline"]), statistics.median(times["this tree"])
    print(f"first report of {args.run}: baseline {args.baseline} {before:.1f} s, this tree {after:.1f} s "
          f"(medians of {args.repeats})")
    print(f"this tree vs baseline {args.baseline}: {before / after:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", default="checkpoints/cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--baseline", help="a git commit whose first report to time against this tree's")
    parser.add_argument("--repeats", type=int, default=1, help="reports of each tree (with --baseline)")
    args = parser.parse_args()
    if args.baseline:
        return against_baseline(args)
    import torch

    from analyses.base.store import clear
    from mechlrmc.runs import Run

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        run = Run(fresh_copy(args.run, Path(tmp), Path(args.run).name))
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
