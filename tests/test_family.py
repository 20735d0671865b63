"""Families of runs: planted drop steps are recovered, analyses map over runs, findings are
counted per run, and the family report shows them."""

import math

import numpy as np
import pandas as pd
import pytest

from analyses.family import (
    across_runs, drop_sharpness, family_findings, family_summary, findings_table, plot_drop_steps,
    plot_family_curves, varied_keys,
)
from analyses.family_report import build_family_report
from analyses.heads import head_taxonomy
from mechlrmc.config import preset
from mechlrmc.model import HookedEncoder
from mechlrmc.runs import METRIC_COLUMNS, Run

STEPS = 8000
EVERY = 250


def _planted_run(path, seed: int, drop: int | None, lr: float = 2e-3, width: float = 150.0) -> Run:
    """A run directory whose eval L_mask sits at r/9 and falls to 0.2 r/9 along a logistic curve
    centred on `drop` (no drop when None), with a checkpoint at the last step."""
    cfg = preset("cpu").override({"train.seed": seed, "train.lr": lr, "train.steps": STEPS})
    run = Run.create(path, cfg)
    r9 = cfg.data.plateau_mask_loss
    rows = []
    for step in range(0, STEPS + 1, EVERY):
        level = r9 if drop is None else r9 * (0.2 + 0.8 / (1 + math.exp((step - drop) / width)))
        level = 0.4 if step == 0 else level  # the untrained model
        rows.append({"step": step, "loss": level / 3, "loss_obs": 1e-4, "loss_mask": level, "eval_loss": level / 3,
                     "eval_loss_obs": 1e-4, "eval_loss_mask": level, "eval_corr_mask": 0.0, "wall_time": step / 100})
    run.append_metrics(rows)
    run.save_checkpoint(STEPS, HookedEncoder(cfg, seed=0).state_dict())
    return run


@pytest.fixture
def planted(tmp_path):
    drops = {(2e-3, 0): 3000, (2e-3, 1): 5000, (2e-3, 2): None, (4e-3, 0): 1500, (4e-3, 1): 6500}
    for (lr, seed), drop in drops.items():
        _planted_run(tmp_path / f"train.lr={lr},seed={seed}", seed, drop, lr)
    return tmp_path, drops


def test_family_summary_recovers_planted_drop_steps(planted):
    path, drops = planted
    summary = family_summary(path)
    assert list(summary.columns[:4]) == ["run", "train.lr", "seed", "status"]
    assert (summary.status == "finished").all()
    for row in summary.itertuples():
        planted_drop = drops[(row._2, row.seed)]
        if planted_drop is None:
            assert not row.dropped and math.isnan(row.drop_step) and math.isnan(row.drop_sharpness)
        else:
            assert row.dropped and abs(row.drop_step - planted_drop) <= EVERY
            # level = r9 (0.2 + 0.8 s), s = 1 / (1 + e^((t - drop) / width)): 90% of r9 is s = 7/8,
            # 50% is s = 3/8, so the fall takes width * (ln(8/3 - 1) - ln(8/7 - 1)) steps
            expected = 150.0 * (math.log(8 / 3 - 1) - math.log(8 / 7 - 1))
            assert row.drop_sharpness == pytest.approx(expected, rel=0.35)
        assert row.plateau_over_analytic == pytest.approx(1.0, abs=0.02)
        assert row.final_step == STEPS


def test_drop_sharpness_separates_sharp_from_slow_drops(tmp_path):
    sharp = _planted_run(tmp_path / "sharp", 0, 4000, width=100)
    slow = _planted_run(tmp_path / "slow", 0, 4000, width=800)
    r9 = sharp.config.data.plateau_mask_loss
    assert drop_sharpness(slow, r9) > 4 * drop_sharpness(sharp, r9)


def test_varied_keys_ignore_the_seed(planted):
    path, _ = planted
    from analyses.family import family_runs

    assert varied_keys(family_runs(path)) == ["train.lr"]


def test_family_figures_draw_every_run(planted):
    path, drops = planted
    summary = family_summary(path)
    curves = plot_family_curves(path, summary)
    raw = [t for t in curves.data if t.xaxis == "x"]
    aligned = [t for t in curves.data if t.xaxis == "x2"]
    assert len(raw) == len(drops) and len(aligned) == sum(d is not None for d in drops.values())
    for trace in aligned:  # aligned at its drop: the steepest fall after the plateau is at x ~ 0
        x, y = np.asarray(trace.x, dtype=float)[1:], np.log(np.asarray(trace.y, dtype=float))[1:]
        assert abs(x[1:][np.argmin(np.diff(y))]) <= 2 * EVERY
    drops_fig = plot_drop_steps(summary)
    shown = sorted(v for t in drops_fig.data if t.type == "box" for v in t.y)
    assert shown == pytest.approx(sorted(s for s in summary.drop_step.dropna()))


def test_across_runs_maps_an_analysis_over_every_run(tiny_run, tmp_path):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(tiny_run.path, other)
    frame = across_runs([tiny_run.path, other], head_taxonomy, steps=[0, 40], progress=False, queries="all")
    assert list(frame.columns[:3]) == ["run", "seed", "step"]
    n_heads = tiny_run.config.model.n_layers * tiny_run.config.model.n_heads
    assert len(frame) == 2 * 2 * n_heads
    a, b = (part.drop(columns="run").reset_index(drop=True) for _, part in frame.groupby("run"))
    pd.testing.assert_frame_equal(a, b)  # same weights, same batch: the same table


@pytest.fixture(scope="module")
def shipped_findings(reference_run):
    return family_findings([reference_run], batch_size=256, n_matrices=32, progress=False)


def test_findings_hold_on_the_shipped_run(shipped_findings):
    """The shipped run plateaus at r/9, copies on the plateau, drops, completes comparably to nuclear
    norm and grows row and column heads, a critical head and position dependence after the drop."""
    verdict = shipped_findings.set_index("finding").reproduced
    assert verdict.to_dict() == {k: True for k in ("1a", "1b", "2", "3", "4", "5", "8")}
    table = findings_table(shipped_findings)
    assert (table.reproduced == "1 of 1").all()


def test_findings_table_counts_within_each_setting():
    """Two settings of two seeds: the table counts k of N per setting and over the family."""
    verdicts = {(2e-3, 0): True, (2e-3, 1): True, (4e-3, 0): False, (4e-3, 1): True}
    findings = pd.DataFrame([{"run": f"train.lr={lr},seed={seed}", "train.lr": lr, "seed": seed, "finding": "1b",
                              "value": "x", "reproduced": ok, "step": math.nan, "title": "t", "criterion": "c"}
                             for (lr, seed), ok in verdicts.items()])
    row = findings_table(findings).iloc[0]
    assert row["reproduced (train.lr=0.002)"] == "2 of 2"
    assert row["reproduced (train.lr=0.004)"] == "1 of 2"
    assert row["reproduced"] == "3 of 4"
    assert row["train.lr=0.004,seed=0"].startswith("✗")


def test_findings_fail_where_the_run_never_dropped(tiny_run):
    """A 40-step run never leaves the plateau: the drop and every after-drop finding fail."""
    findings = family_findings([tiny_run.path], batch_size=64, n_matrices=8, progress=False).set_index("finding")
    assert not findings.reproduced[["1b", "4", "5", "8"]].any()
    assert findings.value["1b"].startswith("no drop by")


def test_family_report_states_k_of_n(planted, tiny_run, tmp_path):
    import shutil

    for seed in (0, 1):
        shutil.copytree(tiny_run.path, tmp_path / "fam" / f"seed={seed}")
    report = build_family_report(tmp_path / "fam", quick=True, progress=False)
    assert not report.errors, report.errors
    assert "Findings across seeds" in report.html and "0 of 2" in report.html and "2 of 2" in report.html
    for title in ("plateau at the copy-and-zero level", "position embeddings matter only after the drop"):
        assert title in report.html


def test_find_family_prefers_the_family_of_the_runs_machine_type(tiny_run, tmp_path):
    """Two shipped families of the tiny recipe: the one whose provenance names this machine type
    (CPU id and vector ISA) is the run's; without such a record the first one is."""
    import json

    from analyses.family import find_family

    for name in ("a_elsewhere", "b_here"):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "sweep.yaml").write_text("preset: tiny\nseeds: 2\n")
        (folder / "family_summary.csv").write_text("run,seed,drop_step,final_loss_mask\n")
    assert find_family(tiny_run, tmp_path) == tmp_path / "a_elsewhere"  # no machine recorded anywhere
    here = tiny_run.provenance
    elsewhere = {**here, "cpu_capability": "AVX512" if here["cpu_capability"] != "AVX512" else "AVX2"}
    (tmp_path / "a_elsewhere" / "provenance.json").write_text(json.dumps(elsewhere))
    (tmp_path / "b_here" / "provenance.json").write_text(json.dumps(here))
    assert find_family(tiny_run, tmp_path) == tmp_path / "b_here"
    (tmp_path / "c_other_recipe").mkdir()
    (tmp_path / "c_other_recipe" / "sweep.yaml").write_text("preset: cpu\nseeds: 2\n")
    (tmp_path / "c_other_recipe" / "family_summary.csv").write_text("run\n")
    (tmp_path / "c_other_recipe" / "provenance.json").write_text(json.dumps(here))
    assert find_family(tiny_run, tmp_path) == tmp_path / "b_here"
