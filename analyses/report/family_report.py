"""One offline HTML report of a family of runs (`mechlrmc report SWEEP_DIR`): the summary, the
overlaid and drop-aligned loss curves, the drop-step distribution, and every finding with a numeric
criterion stated per seed and counted as "reproduced in k of N" (`analyses.family.summary`).

It is laid out by `analyses.report.page.assemble`, as the single-run report is, and its phase figures come from the same
`detect_phases`, so a family reads like one run's report with a column per seed.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import pandas as pd

from analyses.family.figures import plot_drop_steps, plot_family_curves, plot_survival
from analyses.family.findings import CRITERIA, family_findings, findings_table
from analyses.family.summary import family_runs, family_summary, varied_keys
from analyses.family.survival import drop_survival, k_of_n, logrank, median_drop
from analyses.report.overview import model_rows
from analyses.report.page import Part, Report, Section, assemble
from mechlrmc.runs import Run

SUMMARY_COLUMNS = ("status", "plateau_loss_mask", "plateau_over_analytic", "plateau_loss_out", "plateau_greedy_acc",
                   "plateau_max_rep", "plateau_end", "drop_step", "drop_sharpness", "final_step", "final_loss",
                   "final_loss_mask", "final_corr_mask", "final_greedy_acc", "wall_time")


@dataclass
class FamilyContext:
    path: Path | None
    runs: list[Run]
    batch_size: int
    n_matrices: int
    progress: bool = True

    @cached_property
    def summary(self) -> pd.DataFrame:
        return family_summary(self.runs)

    quick: bool = False

    @cached_property
    def findings(self) -> pd.DataFrame:
        """`family_findings`, with the sweep directory's `interventions/` and `freeze/` runs where present."""
        extra = {name: self.path / name for name in ("interventions", "freeze")
                 if self.path is not None and (self.path / name).is_dir()}
        return family_findings(self.runs, self.batch_size, self.n_matrices, progress=self.progress, **extra)

    @cached_property
    def early_warning(self) -> dict[str, pd.DataFrame]:
        from analyses.plateau.early_warning import family_early_warning

        return family_early_warning(self.runs, hessian=not self.quick, progress=self.progress)


def _overview(ctx: FamilyContext) -> list[Part]:
    keys = varied_keys(ctx.runs)
    cfg = ctx.runs[0].config
    spec = ctx.path / "sweep.yaml" if ctx.path is not None else None
    facts = [
        ("runs", f"{len(ctx.runs)}: " + ", ".join(r.path.name for r in ctx.runs)),
        ("varied", ", ".join(keys) + (", seed" if keys else "seed")),
        ("task", cfg.data.describe() + "".join(f"; analytic plateau of {name} = {value:.4g}" for name, value in
                                              cfg.task.plateau(cfg.data).items() if name == cfg.task.phase_metric)),
        *[row for row in model_rows(cfg) if row[0] == "model"],
    ]
    parts: list[Part] = [pd.DataFrame(facts, columns=["", "value"])]
    if spec is not None and spec.is_file():
        parts.append(f"<pre>{html.escape(spec.read_text())}</pre>")
    cols = ["run", *keys, "seed", *[c for c in SUMMARY_COLUMNS if c in ctx.summary]]
    parts.append(ctx.summary[cols])
    return parts


def _curves(ctx: FamilyContext) -> list[Part]:
    return [plot_family_curves(ctx.runs, ctx.summary)]


def _drops(ctx: FamilyContext) -> list[Part]:
    """Drop steps per setting as survival data: a run that has not dropped by its last step is
    censored there (`analyses.family.survival`), so the median time to the drop and its interval
    come from the Kaplan-Meier curve, not from the runs that happened to drop."""
    s = ctx.summary
    keys = varied_keys(ctx.runs)
    stats = (s.groupby(keys or (lambda _: "all"), dropna=False)
             .agg(runs=("run", "size"), dropped=("drop_step", "count"), drop_median=("drop_step", "median"),
                  drop_min=("drop_step", "min"), drop_max=("drop_step", "max"),
                  sharpness_median=("drop_sharpness", "median"),
                  **{f"{c}_median": (c, "median") for c in ("final_loss_mask", "final_greedy_acc") if c in s}))
    parts: list[Part] = [plot_drop_steps(s), stats]
    if "final_step" not in s or s.final_step.isna().all():
        return parts
    by = keys or None
    parts += [f"<p>Time to the drop as survival: {html.escape(k_of_n(s))}. Censored runs count as censored: "
              "the Kaplan-Meier fraction still on the plateau against the step, with its 95 % band, and the "
              "median time to the drop with its interval.</p>",
              plot_survival(drop_survival(s, by)), median_drop(s, by)]
    if keys and s.groupby(keys).ngroups > 1:
        parts.append(logrank(s, keys))
    return parts


def _findings(ctx: FamilyContext) -> list[Part]:
    table = findings_table(ctx.findings)
    runs = f"Runs: {html.escape(k_of_n(ctx.summary))} (a run that did not drop by its last step is censored there). "
    return [f"<p>{runs}Each cell: ✓ or ✗ and the measured value. The criteria are those of "
            "<code>analyses.family.findings.CRITERIA</code>; the plateau checkpoint is mid-plateau, the end is the last "
            "checkpoint.</p>", table]


def _early_warning(ctx: FamilyContext) -> list[Part]:
    from analyses.plateau.figures import drop_aligned_figure

    tables = ctx.early_warning
    return ["<p>Per measure: in how many runs it has covered 10 % (50 %) of its change from the plateau's level "
            "to the end before the drop, and the lead in steps and in plateau lengths (lead / (drop step - plateau start): "
            "0.5 is halfway through the plateau; median, min, max; positive: before the drop)."
            + (" Quick mode: no Hessian." if ctx.quick else "") + "</p>",
            tables["early_warning"], drop_aligned_figure(tables)]


RECORDED_SECTIONS = ("family", "curves", "drops")
SECTIONS: list[Section] = [
    Section("family", "Family", "run families", "The runs, what varies between them, and one summary row per run "
            "(detect_phases figures, drop sharpness: steps from 90% to 50% of the plateau L_mask).", _overview),
    Section("curves", "Loss curves", "finding 1", "Every run's phase loss (eval L_mask; a token task's output cross-entropy) on the step axis and aligned at its own "
            "drop.", _curves),
    Section("drops", "Drop steps", "finding 1", "When each run left the plateau, per setting: the drop steps, and the "
            "time to the drop as survival (Kaplan-Meier, censored runs counted as censored).", _drops),
    Section("findings", "Findings across seeds", "findings 1-11; P0-P5",
            "Each finding with a numeric criterion, measured on every run: reproduced in k of N.", _findings),
    Section("early_warning", "Early warnings of the drop", "P3",
            "Which measure moves first: every trajectory measure's lead over each run's drop, and the measures "
            "aligned at the drop.", _early_warning),
]


def build_family_report(source, quick: bool = False, progress: bool = True) -> Report:
    """The family report of a sweep directory or a list of runs (`quick`: smaller batches)."""
    path = Path(source) if isinstance(source, (str, Path)) else None
    runs = family_runs(source)
    ctx = FamilyContext(path, runs, batch_size=128 if quick else 512, n_matrices=16 if quick else 64,
                        progress=progress, quick=quick)
    name = path.name if path is not None else f"{len(runs)} runs"
    from analyses.family.sequence_findings import SEQUENCE_CRITERIA

    sections = SECTIONS
    if runs[0].config.recorded:  # a user's model: the sections that read only the runs' metrics
        sections = [s for s in SECTIONS if s.key in RECORDED_SECTIONS]
    shown = CRITERIA if "matrix" in runs[0].config.task.supports else SEQUENCE_CRITERIA
    criteria = "".join(f"<li><b>{k}</b> {html.escape(t)}: {html.escape(c)}</li>" for k, (t, c) in shown.items())
    intro = (f"Family of {len(runs)} runs{f' in <code>{html.escape(str(path))}</code>' if path else ''}. "
             f"Abrupt learning is stochastic: every claim below is counted over these runs.{' (quick mode)' if quick else ''}"
             f"</p><p>Criteria:</p><ul>{criteria}</ul><p>")
    if runs[0].config.recorded:
        intro = (f"Family of {len(runs)} recorded runs{f' in <code>{html.escape(str(path))}</code>' if path else ''}: "
                 "the users' own models, so the sections that read only the runs' metrics (the findings and early "
                 "warnings read mechlrmc's own model).</p><p>")
    return assemble(f"mechlrmc family report: {name}", intro, sections, ctx, progress)


def write_family_report(source, path: str | Path, **kwargs) -> Report:
    """`build_family_report(source, **kwargs)` written to `path` (parents created)."""
    report = build_family_report(source, **kwargs)
    report.write(path)
    return report
