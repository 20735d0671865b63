"""One standalone HTML report of a run: the list of analyses (`analyses.base.registry`) assembled.

`write_report(run, "report.html")` builds a `Context` (the run, its phases, key checkpoints,
batch, models and head taxonomy, each computed once), computes every registered analysis that
applies to the run with `tables(ctx)` and `figures(ctx, tables)`, and lays them out with
`analyses.report.page.assemble`: ONE file that opens offline. A section whose analysis fails shows the
error in place and the others are still written; `Report.errors` lists the failures and
`Report.tables` holds every section's tables by name (a notebook reads them without computing again).

With `workers=2` (the default where two cores are free) the attribution sweeps (`PARALLEL`) are
computed in a process of their own and the LLC (`THREADED`) in a thread of this one, its chains
spread over this process and a spawned one, while this process computes the rest. Expensive per-checkpoint measurements (the LLC) are cached in the run directory
(`analyses.base.store`), so a second report reuses them.

`quick=True` shrinks batches, step counts and samplers for tests and smoke checks.
"""

from __future__ import annotations

import html
import os
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import nullcontext
from multiprocessing import get_context
from pathlib import Path

from analyses.base.context import FULL, QUICK, Context
from analyses.base.registry import Analysis, applicable
from analyses.report.page import Drawn, Report, Result, Section, assemble, run_section
from mechlrmc.runs import Run

PARALLEL = ("attribution",)  # each computed in a process of its own when workers > 1


# computed in a thread of this process when workers > 1: the LLC's chains run in lanes of their own
# (this process and spawned ones, `analyses.llc.chains`), so its thread mostly waits on them
THREADED = ("llc",)


def section(analysis: Analysis) -> Section:
    """The report section of a registered analysis: its figures, in order, and the tables they show."""
    def build(ctx) -> Drawn:
        tables = analysis.compute(ctx)
        return Drawn(list(analysis.draw(ctx, tables).values()), tables)

    return Section(analysis.name, analysis.title, analysis.finding, analysis.caption, build)


def _worker(run_path: str, keys: list[str], quick: bool, device: str, threads: int, family, interventions
            ) -> dict[str, Result]:
    """Compute the sections `keys` in this (spawned) process."""
    import torch

    from analyses.base.registry import get

    if threads:
        torch.set_num_threads(threads)
    ctx = Context(Run(run_path), QUICK if quick else FULL, device, False, family=family, interventions=interventions,
                  options={"workers": 2})
    return {key: run_section(section(get(key)), ctx) for key in keys}


def default_workers() -> int:
    """2 where this process may use two cores, else 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return 2 if cores >= 2 else 1


def build_report(
    run: Run, quick: bool = False, device: str = "cpu", interventions: str | Path | None = None,
    progress: bool = True, family: str | Path | None = None, workers: int | None = None,
) -> Report:
    """Compute every applicable analysis and assemble the HTML (see module docstring). `family`:
    a folder with a `family_summary.csv` to place the run in (default: the shipped family of its
    recipe and machine type, if any)."""
    from analyses.family.summary import find_family

    family = Path(family) if family is not None else find_family(run)
    interventions = Path(interventions) if interventions else None
    workers = default_workers() if workers is None else workers
    ctx = Context(run, QUICK if quick else FULL, device, progress, family=family, interventions=interventions,
                  options={"workers": workers})  # the processes a section's own pool may use (the LLC's chains)
    sections = [section(a) for a in applicable(ctx)]
    remote = [s.key for s in sections if s.key in PARALLEL] if workers > 1 else []
    threaded = [s for s in sections if s.key in THREADED] if workers > 1 else []
    local = [s for s in sections if s.key not in remote and s not in threaded]
    import torch

    threads = torch.get_num_threads()
    if workers > 1:
        torch.set_num_threads(1)  # one core per lane: this process, the attribution's, the LLC's chains
    try:
        with ProcessPoolExecutor(len(remote), mp_context=get_context("spawn")) if remote else nullcontext() as pool, \
                ThreadPoolExecutor(len(threaded)) if threaded else nullcontext() as beside_pool:
            futures = [pool.submit(_worker, str(run.path), [key], quick, device, 1, family, interventions)
                       for key in remote]
            beside = {s.key: beside_pool.submit(run_section, s, ctx) for s in threaded}
            results = {s.key: run_section(s, ctx) for s in _progress(local, progress)}
            for future in futures:
                results.update(future.result())
            results.update({key: future.result() for key, future in beside.items()})
    finally:
        torch.set_num_threads(threads)
    intro = (f"Run directory <code>{html.escape(str(run.path))}</code>{' (quick mode)' if quick else ''}. "
             "Each section names the finding it reproduces (docs/FINDINGS.md).")
    return assemble(f"mechlrmc report: {run.path.name}", intro, sections, ctx, progress=False, results=results)


def _progress(sections: list[Section], progress: bool):
    from tqdm.auto import tqdm

    return tqdm(sections, desc="report", unit="section", disable=not progress)


def write_report(run: Run, path: str | Path, **kwargs) -> Report:
    """`build_report(run, **kwargs)` written to `path` (parents created)."""
    report = build_report(run, **kwargs)
    report.write(path)
    return report
