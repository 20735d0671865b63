"""Families of runs: planted drop steps are recovered, analyses map over runs, findings are
counted per run, and the family report shows them."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analyses.attention.heads import head_taxonomy
from analyses.family.figures import plot_drop_steps, plot_family_curves
from analyses.family.findings import family_findings, findings_table
from analyses.family.summary import (across_runs, drop_sharpness, family_summary, find_family, place_in_family,
    varied_keys)
from analyses.report.family_report import build_family_report
from mechlrmc.config import preset
from mechlrmc.model import HookedEncoder
from mechlrmc.runs import Run

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
    from analyses.family.summary import family_runs

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
    assert verdict.to_dict() == {**{k: True for k in ("1a", "1b", "2", "3", "4", "5", "8", "6", "7a", "9")},
                                 "7b": False}  # the row and u probes decode nothing at any layer
    table = findings_table(shipped_findings).set_index("finding")
    assert (table.reproduced.drop("7b") == "1 of 1").all() and table.reproduced["7b"] == "0 of 1"


def test_component_training_finding_reads_planted_component_runs(tiny_run, tmp_path):
    """Finding 10 from component-wise runs: attention alone reaches half the plateau at a planted
    step; without an attention run there is nothing to count."""
    import shutil

    from analyses.family.findings import component_training_finding

    assert component_training_finding(tiny_run, tmp_path / "none") is None
    for components, below_from in (("attn", 20), ("mlp", None)):
        folder = tmp_path / "freeze" / components
        shutil.copytree(tiny_run.path, folder)
        metrics = pd.read_csv(folder / "metrics.csv")
        plateau = tiny_run.config.data.plateau_mask_loss
        low = metrics.step >= below_from if below_from is not None else metrics.step < 0
        metrics.loc[metrics.eval_loss_mask.notna(), "eval_loss_mask"] = plateau
        metrics.loc[low & metrics.eval_loss_mask.notna(), "eval_loss_mask"] = 0.3 * plateau
        metrics.to_csv(folder / "metrics.csv", index=False)
    row = component_training_finding(tiny_run, tmp_path / "freeze")
    assert row["reproduced"] and "attn alone: half the plateau at 20" in row["value"]
    assert "mlp alone: not below half the plateau" in row["value"]


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
    assert not findings.reproduced[["1b", "4", "5", "8", "6", "7a", "9"]].any()
    assert findings.value["1b"].startswith("no drop by")


def test_family_report_states_k_of_n(planted, tiny_run, tmp_path):
    import shutil

    for seed in (0, 1):
        shutil.copytree(tiny_run.path, tmp_path / "fam" / f"seed={seed}")
    report = build_family_report(tmp_path / "fam", quick=True, progress=False)
    assert not report.errors, report.errors
    assert "Findings across seeds" in report.html and "0 of 2" in report.html and "2 of 2" in report.html
    assert "Early warnings of the drop" in report.html
    for title in ("plateau at the copy-and-zero level", "position embeddings matter only after the drop"):
        assert title in report.html


def test_find_family_prefers_the_family_of_the_runs_machine_type(tiny_run, tmp_path):
    """Two shipped families of the tiny recipe: the one whose provenance names this machine type
    (CPU id and vector ISA) is the run's; without such a record the first one is."""
    import json

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


SHIPPED = Path(__file__).resolve().parents[1] / "analyses" / "families"


def _demo_run(path, provenance: dict | None, steps: int = 8000) -> Run:
    """A run of the cpu preset's recipe that trained fewer steps than the shipped families."""
    run = Run.create(path, preset("cpu").override({"train.steps": steps}))
    if provenance is not None:
        run.save_provenance(provenance)
    return run


def test_find_family_picks_the_family_of_the_runs_isa_over_the_cpu_model(tmp_path):
    """An AVX2 run on another CPU model (family 25 model 1; the AVX2 family was measured on model 17)
    with the same software belongs to the AVX2 family, not to the AVX-512 one that sorts first."""
    avx2 = json.loads((SHIPPED / "cpu_family_avx2" / "provenance.json").read_text())
    avx512 = json.loads((SHIPPED / "cpu_family" / "provenance.json").read_text())
    assert avx512["cpu_capability"] == "AVX512" and "reconstructed" in avx512
    demo = _demo_run(tmp_path / "demo", {**avx2, "cpu_id": "AuthenticAMD family 25 model 1 stepping 1"})
    assert find_family(demo) == SHIPPED / "cpu_family_avx2"  # the shipped families, by default

    root = tmp_path / "families"
    shutil.copytree(SHIPPED / "cpu_family", root / "a_avx512")
    shutil.copytree(SHIPPED / "cpu_family_avx2", root / "b_avx2")
    assert find_family(demo, root) == root / "b_avx2"
    other = _demo_run(tmp_path / "avx512", {**avx2, "cpu_capability": "AVX512", "cpu_id": "?"})
    assert find_family(other, root) == root / "a_avx512"  # same ISA beats another ISA
    assert find_family(_demo_run(tmp_path / "unrecorded", None), root) == root / "a_avx512"  # by name
    (root / "b_avx2" / "provenance.json").unlink()  # unknown ranks above another ISA
    assert find_family(demo, root) == root / "b_avx2"
    assert find_family(_demo_run(tmp_path / "tiny", None), tmp_path / "nowhere") is None


FAMILY = pd.DataFrame({"run": [f"seed={s}" for s in range(6)], "seed": range(6),
                       "drop_step": [3000, 4000, 7000, 11000, math.nan, math.nan],
                       "final_step": [14000, 14000, 14000, 14000, 14000, 4500],
                       "final_loss_mask": [0.01, 0.015, 0.03, 0.05, 0.1, 0.2]})


def test_place_in_family_compares_drops_only_as_far_as_both_ran(tmp_path):
    """A planted family of six (drops at 3k, 4k, 7k, 11k; one never by 14k; one never by 4.5k) and
    8k-step runs that drop at 5k or never: counted earlier / later / undecided as far as both ran."""
    family = tmp_path / "family"
    family.mkdir()
    FAMILY.to_csv(family / "family_summary.csv", index=False)
    run = _planted_run(tmp_path / "run", seed=1, drop=5000)
    row = place_in_family(run, family).iloc[0]
    assert row.dropped and abs(row.drop_step - 5000) <= EVERY
    assert (row.dropped_earlier, row.dropped_same_step, row.dropped_later, row.drop_undecided) == (2, 0, 3, 1)
    assert row.ended_lower == 2 and row.ended_higher == 4  # final L_mask ~ 0.2 r/9 = 0.022
    assert (row.n_seeds, row.n_dropped, row.seed) == (6, 4, 1)
    assert row.run_final_step == STEPS and row.family_final_step == 14000
    assert row.family_median_drop_step == 5500 and row.family_median_final_loss_mask == pytest.approx(0.04)
    assert row.family == str(family) and row.match == "unknown" and "not recorded on both" in row.match_sentence
    assert "trained to step 8000, the family to 14000" in row.drop_text and "2 of the family's 6" in row.drop_text

    never = place_in_family(_planted_run(tmp_path / "never", seed=3, drop=None), family).iloc[0]
    assert not never.dropped and math.isnan(never.drop_step)
    assert (never.dropped_earlier, never.dropped_later, never.drop_undecided) == (3, 0, 3)
    assert "has not dropped" in never.drop_text


def test_shipped_families_install_with_the_package(tmp_path):
    """`pip install .` (no -e) ships the families: from outside the checkout, the installed copy of
    `find_family` returns a family folder inside the installation."""
    repo = Path(__file__).resolve().parents[1]
    source = tmp_path / "source"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("mechlrmc", "analyses"):
        shutil.copytree(repo / name, source / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(repo / name, source / name)
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check", "--no-input"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "wheel"), "."],
                   cwd=source, check=True, capture_output=True)
    wheel, = (tmp_path / "wheel").glob("mechlrmc-*.whl")
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True, capture_output=True)
    run = _demo_run(tmp_path / "demo", None)
    script = ("import analyses, sys; from analyses.family.summary import find_family; from mechlrmc.runs import Run; "
              f"print(analyses.__file__); print(find_family(Run({str(run.path)!r})))")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    done = subprocess.run([sys.executable, "-c", script], cwd=outside, env=env, check=True, capture_output=True,
                          text=True)
    where, family = done.stdout.strip().splitlines()
    assert Path(where).is_relative_to(site)
    assert Path(family).is_relative_to(site / "analyses" / "families") and (Path(family) / "family_summary.csv").is_file()
