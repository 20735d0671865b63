"""The plateau paper's findings as per-seed criteria, counted "k of N" by the family findings table
(docs/FINDINGS.md, P1-P5). They are read from each run's own evaluations (the task logs greedy
accuracy, repetition, attention on the optimal map and collapse at every evaluation), so a family
of token-task runs is scored without loading a checkpoint.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from analyses.plateau.phases import detect_phases
from mechlrmc.runs import Run

PLATEAU_ACC = 0.3  # P0: the plateau's greedy output accuracy at most this ...


SOLVED_ACC = 0.95  # ... and the final one at least this


REPETITION_GAIN = 3.0  # P1: the plateau's greedy outputs repeat >= 3x as often as the truth ...


REPETITION_GONE = 1.5  # ... and the final ones <= 1.5x


COLLAPSE_PLATEAU = 0.5  # P2: mean cosine of the output positions' final hidden states >= 0.5 on the plateau ...


COLLAPSE_GONE = 0.2  # ... and <= 0.2 at the end


PROGRESS_SHARE = 0.5  # P3: attention on the optimal map covers half its total change before the drop



SEQUENCE_CRITERIA = {
    "P0": ("plateau then drop", f"plateau greedy accuracy <= {PLATEAU_ACC:g}, a drop is detected, final greedy "
                                f"accuracy >= {SOLVED_ACC:g}"),
    "P1": ("repetition bias on the plateau", f"plateau repetition of greedy outputs >= {REPETITION_GAIN:g} x the "
                                             f"truth's, final <= {REPETITION_GONE:g} x"),
    "P2": ("representation collapse on the plateau", f"median collapse on the plateau >= {COLLAPSE_PLATEAU:g}, "
                                                     f"final <= {COLLAPSE_GONE:g}"),
    "P3": ("attention progress precedes the drop", f"attention on the optimal map covers {PROGRESS_SHARE:.0%} of "
                                                   "its total change before the drop step (value: the lead in steps)"),
    "P4": ("a partial solution: output 1 is learned first", "output 1 is learned before the median of the other "
                                                           "outputs (analyses.learning_times: greedy accuracy of each "
                                                           "output across the checkpoints; its logistic onset where "
                                                           "the checkpoints resolve it, else its whole bracket of two "
                                                           "checkpoints before that median)"),
    "P5": ("the intervention moves the drop", "per seed: the run with c > 1 drops earlier than the run with "
                                              "c < 1 (a run that never dropped counts as dropping after its end)"),
}


def _covered_at(steps: np.ndarray, values: np.ndarray, share: float) -> float:
    """First step at which `values` has covered `share` of its change from the first to the last value."""
    start, end = values[0], values[-1]
    if end == start:
        return math.nan
    covered = (values - start) / (end - start)
    hit = np.flatnonzero(covered >= share)
    return float(steps[hit[0]]) if len(hit) else math.nan


def sequence_run_findings(run: Run, learning: bool = True) -> list[dict]:
    """P0-P4 for one token-task run: rows of `finding`, `value`, `reproduced`, `step`. P0-P3 read the
    run's evaluations; P4 (with `learning`) loads every checkpoint (`analyses.learning_times`)."""
    p = detect_phases(run).iloc[0]
    evals = run.evals.sort_values("step")
    end = p.drop_step if p.dropped else p.final_step
    plateau = evals[(evals.step >= p.plateau_start) & (evals.step < end)] if not math.isnan(p.plateau_start) else evals.iloc[1:]
    last = evals.iloc[-1]
    out = []

    def add(finding, value, reproduced, step=math.nan):
        out.append({"finding": finding, "value": value, "reproduced": bool(reproduced), "step": step})

    add("P0", f"plateau acc {p.plateau_greedy_acc:.2f}; " + (f"drop at {p.drop_step:.0f}" if p.dropped else "no drop")
        + f"; final acc {last.eval_greedy_acc:.2f}",
        p.plateau_greedy_acc <= PLATEAU_ACC and p.dropped and last.eval_greedy_acc >= SOLVED_ACC)
    rep = float(plateau.eval_rep.max()) if len(plateau) else math.nan
    truth = float(evals.eval_rep_true.median())
    add("P1", f"plateau {rep:.2f}, end {last.eval_rep:.2f}, truth {truth:.2f}",
        rep >= REPETITION_GAIN * truth and last.eval_rep <= REPETITION_GONE * truth)
    collapse = float(plateau.eval_collapse.median()) if len(plateau) else math.nan
    add("P2", f"plateau {collapse:.2f}, end {last.eval_collapse:.2f}",
        collapse >= COLLAPSE_PLATEAU and last.eval_collapse <= COLLAPSE_GONE)
    at = _covered_at(evals.step.to_numpy(float), evals.eval_attn_on_map.to_numpy(float), PROGRESS_SHARE)
    lead = p.drop_step - at if p.dropped and not math.isnan(at) else math.nan
    add("P3", f"half the attention progress at step {at:.0f}, {lead:+.0f} steps before the drop" if not math.isnan(lead)
        else "no drop or no progress", not math.isnan(lead) and lead > 0, at)
    if learning and len(run.steps) >= 4:
        from analyses.plateau.learning_times import LEARNING_BATCH, learning_order, learning_times

        order = learning_order(learning_times(run, batch_size=LEARNING_BATCH, progress=False))
        add("P4", learning_order_value(order), order["first_precedes_median"], order["first_learned_at"])
    return out


def learning_order_value(order: dict) -> str:
    """P4's value from a run's `learning_order`: output 1's onset, or its bracket where the
    checkpoints do not resolve an onset, against the others' median."""
    if order["first_fit"] == "ok":
        first = f"output 1 onset {order['first_onset']:.0f}"
    elif order["first_fit"] == "between checkpoints":
        first = f"output 1 between steps {order['first_bracket_low']:.0f} and {order['first_bracket_high']:.0f}"
    else:
        first = f"output 1 {order['first_fit']}"
    between = f", {order['between_checkpoints']} between checkpoints" if order["between_checkpoints"] else ""
    return (f"{first}, others' median {order['others_median']:.0f} "
            f"({order['fitted']} of {order['positions']} with an onset{between})")


INTERVENTION_KEY = "train.attn_intervention_scale"


def intervention_findings(summary: pd.DataFrame, finding: str = "P5") -> pd.DataFrame:
    """P5 (finding 11 on LRMC) per seed, from a family summary whose runs vary
    `train.attn_intervention_scale`: the largest scale above 1 against the smallest below 1 (a run
    that never dropped: its last step)."""
    if INTERVENTION_KEY not in summary:
        return pd.DataFrame()
    rows = []
    drop = summary.drop_step.fillna(summary.final_step + 1)
    for seed, part in summary.assign(effective_drop=drop).groupby("seed"):
        up, down = part[part[INTERVENTION_KEY] > 1], part[part[INTERVENTION_KEY] < 1]
        if not len(up) or not len(down):
            continue
        hi, lo = up.loc[up[INTERVENTION_KEY].idxmax()], down.loc[down[INTERVENTION_KEY].idxmin()]
        text = (f"c={hi[INTERVENTION_KEY]:g}: {'drop at %.0f' % hi.drop_step if not pd.isna(hi.drop_step) else 'no drop by %d' % hi.final_step}; "
                f"c={lo[INTERVENTION_KEY]:g}: {'drop at %.0f' % lo.drop_step if not pd.isna(lo.drop_step) else 'no drop by %d' % lo.final_step}")
        rows.append({"run": f"seed={seed}", "seed": seed, "finding": finding, "value": text,
                     "reproduced": bool(hi.effective_drop < lo.effective_drop), "step": math.nan})
    return pd.DataFrame(rows)
