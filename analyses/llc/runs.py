"""The report's LLC section (the registry's "llc" entry): calibrated once per run, cached, flagged.

`run_calibration` chooses the run's SGLD settings at its final checkpoint (`analyses.llc.calibrate`)
and keeps them in the run directory with its other cached measurements (`analyses.base.store`), so a
report samples only the checkpoints' chains, themselves cached; `llc_tables` / `llc_figures` are the
section (finding 1, docs/FINDINGS.md: does the drop show as a change in effective complexity?).
"""

from __future__ import annotations

import pandas as pd


def llc_across_drop(table: pd.DataFrame, drop_step: float | None) -> dict:
    """Does the drop show in one run's LLC? `table` is `llc_per_step` (`step, llc_mean, llc_std, ok`):
    the last checkpoint before the drop against the first at or after it. `rises` when the LLC goes
    up by more than twice the chains' summed standard deviations; `ok` when both checkpoints pass
    their diagnostics (a verdict on flagged estimates is not a finding)."""
    dropped = drop_step is not None and not pd.isna(drop_step)
    before, after = (table[table.step < drop_step], table[table.step >= drop_step]) if dropped else (table[:0],) * 2
    if before.empty or after.empty:
        return {"before": None, "after": None, "ratio": float("nan"), "rises": False, "ok": False}
    b, a = before.iloc[-1], after.iloc[0]
    noise = 2 * sum(0.0 if pd.isna(row.llc_std) else float(row.llc_std) for row in (b, a))
    return {"before": int(b.step), "after": int(a.step), "ratio": float(a.llc_mean / b.llc_mean),
            "rises": bool(a.llc_mean - b.llc_mean > noise), "ok": bool(b.ok and a.ok)}


def family_llc(tables: dict[str, pd.DataFrame], drops: dict[str, float]) -> pd.DataFrame:
    """One row per run (`llc_across_drop`), from each run's `llc_per_step` table and drop step; the
    verdict a README can quote is "rises in k of N runs whose estimates pass"."""
    return pd.DataFrame([{"run": name, "drop_step": drops.get(name), **llc_across_drop(table, drops.get(name))}
                         for name, table in tables.items()])
