"""The plateau paper's measures in their own definitions, on planted cases with known answers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from analyses.plateau.phases import detect_phases
from analyses.plateau.sequences import native_measures
from mechlrmc.measures import mean_pairwise_cosine
from mechlrmc.model import HookedEncoder
from mechlrmc.runs import Run
from mechlrmc.tasks import get_task, preset


@pytest.fixture
def mws():
    cfg = preset("mws_tiny")
    task = get_task("mws")
    batch = task.sample(cfg.data, 32, torch.Generator().manual_seed(0))
    return cfg, task, batch, HookedEncoder(cfg, seed=0).eval()


def test_cosine_of_parallel_states_is_one_and_of_orthogonal_ones_zero():
    direction = torch.randn(8)
    parallel = direction.expand(3, 5, 8) * torch.rand(3, 5, 1).add(0.5)
    assert mean_pairwise_cosine(parallel) == pytest.approx(1.0, abs=1e-6)
    orthogonal = torch.eye(6).expand(2, 6, 6)
    assert mean_pairwise_cosine(orthogonal) == pytest.approx(0.0, abs=1e-6)


def test_a_model_that_always_says_the_same_token_repeats_itself(mws):
    cfg, task, batch, model = mws
    with torch.no_grad():
        model.W_U.zero_()  # every logit equal: greedy decoding always picks token 0
    rep = native_measures(model, batch)["repetition"].iloc[0]
    truth = batch.outputs
    assert rep.rep == 1.0
    assert rep.rep_true == pytest.approx(float((truth[:, 1:] == truth[:, :-1]).float().mean()))
    assert rep.greedy_acc == pytest.approx(float((truth == 0).float().mean()))


def test_attention_planted_on_the_optimal_map_has_share_one(mws):
    cfg, task, batch, model = mws
    on_map = task.optimal_attention_map(batch).float()

    def planted(pattern, hook):  # also called on the shorter prompts of greedy generation
        q = pattern.shape[-1]
        return on_map[: len(pattern), None, :q, :q].expand_as(pattern).clone()

    with model.hooks(fwd_hooks=[("blocks.0.attn.hook_pattern", planted)]):
        progress = native_measures(model, batch)["attention_progress"]
    assert progress.share_on_map.tolist() == pytest.approx([1.0] * len(progress))
    unplanted = native_measures(model, batch)["attention_progress"]
    assert (unplanted.share_on_map < 0.9).all()


def test_partial_solution_counts_each_output_position(mws):
    cfg, task, batch, model = mws
    partial = native_measures(model, batch)["partial_solution"]
    assert partial.position.tolist() == list(range(1, cfg.data.length + 1))
    assert partial.greedy_acc.between(0, 1).all() and partial.forced_acc.between(0, 1).all()


def test_phases_of_a_token_run_find_a_planted_drop(tmp_path):
    run = Run.create(tmp_path / "run", preset("mws_tiny"))
    steps = np.arange(0, 400, 10)
    loss = np.where(steps < 150, 2.5, 0.02)
    loss[0] = 2.9
    rows = [{"step": int(s), "eval_loss": float(l), "eval_loss_out": float(l), "eval_acc_out": 0.1,
             "eval_greedy_acc": 0.12 if s < 150 else 1.0, "eval_rep": 0.4 if 0 < s < 150 else 0.06,
             "eval_rep_true": 0.06, "eval_attn_on_map": 0.2, "eval_collapse": 0.8} for s, l in zip(steps, loss)]
    run.append_metrics(rows)
    p = detect_phases(run).iloc[0]
    assert p.dropped and p.drop_step == 150
    assert p.plateau_start == 10 and p.plateau_end == 140
    assert p.plateau_greedy_acc == pytest.approx(0.12) and p.plateau_max_rep == pytest.approx(0.4)
    flat = Run.create(tmp_path / "flat", preset("mws_tiny"))
    flat.append_metrics([{**r, "eval_loss_out": 2.5} for r in rows])
    assert not detect_phases(flat).iloc[0].dropped


def test_the_plateau_papers_findings_on_planted_runs(tmp_path):
    from analyses.family.sequence_findings import intervention_findings, sequence_run_findings

    steps = np.arange(0, 400, 10)
    rows = [{"step": int(s), "eval_loss": 2.5 if s < 150 else 0.02, "eval_loss_out": 2.9 if s == 0 else 2.5 if s < 150 else 0.02,
             "eval_acc_out": 0.1, "eval_greedy_acc": 0.12 if s < 150 else 1.0, "eval_rep": 0.4 if 0 < s < 150 else 0.06,
             "eval_rep_true": 0.06, "eval_attn_on_map": min(1.0, s / 200), "eval_collapse": 0.8 if s < 150 else 0.01}
            for s in steps]
    run = Run.create(tmp_path / "run", preset("mws_tiny"))
    run.append_metrics(rows)
    found = {r["finding"]: r for r in sequence_run_findings(run)}
    assert all(found[k]["reproduced"] for k in ("P0", "P1", "P2", "P3")), found
    assert found["P3"]["step"] == 100  # half of the attention progress, 50 steps before the drop at 150
    late = Run.create(tmp_path / "late", preset("mws_tiny"))  # attention moves only after the drop
    late.append_metrics([{**r, "eval_attn_on_map": 0.0 if r["step"] < 200 else 1.0} for r in rows])
    assert not {r["finding"]: r for r in sequence_run_findings(late)}["P3"]["reproduced"]

    summary = pd.DataFrame({"seed": [0, 0, 1, 1], "train.attn_intervention_scale": [0.5, 2.5, 0.5, 2.5],
                            "drop_step": [np.nan, 120, 150, 180], "final_step": [300, 300, 300, 300]})
    p5 = intervention_findings(summary).set_index("seed").reproduced
    assert p5[0] and not p5[1]  # seed 0: c=2.5 dropped, c=0.5 never did; seed 1: c=2.5 dropped later


def test_the_report_of_a_token_run_shows_the_sections_that_apply(tmp_path):
    from analyses.report.run_report import build_report
    from mechlrmc.train import train

    run = train(preset("mws_tiny"), tmp_path / "mws", progress=False)
    report = build_report(run, quick=True, progress=False, workers=1)
    assert report.errors == {}
    import re
    sections = re.findall(r'<section id="([^"]+)" data-status="ok">', report.html)
    assert sections == ["overview", "phases", "llc", "taxonomy", "views", "scrubber", "ablation", "sequence_patching",
                        "probes", "swaps", "plateau_dynamics", "learning_times", "early_warning"]
    assert "<script src=" not in report.html


def test_attention_views_of_a_causal_token_model_name_its_tokens_and_hide_the_future(mws):
    from analyses.attention.views import attention_page

    cfg, task, batch, model = mws
    names = batch.position_names()
    assert names[:2] == ["x1", "x2"] and names[cfg.data.length] == "SEP" and len(names) == batch.tokens.shape[1]
    page = attention_page(model, batch[:8], examples=(1,), head_labels={(0, 0): "map 0.10"})
    assert '"maskUpperTri": true' in page.replace('"maskUpperTri":true', '"maskUpperTri": true')
    assert f"SEP:{cfg.data.separator}" in page and "L0H0 map 0.10" in page
    assert "<script src=" not in page  # offline: the bundle is inlined


def test_the_scrubber_of_a_causal_model_leaves_the_future_blank(mws):
    from analyses.attention.figures import plot_attention_scrubber
    from analyses.attention.heads import head_map_share
    from analyses.attention.scrubber import pattern_frame

    cfg, task, batch, model = mws
    patterns = pattern_frame(model, batch).assign(step=0)
    labels = head_map_share(model, batch).assign(step=0, queries="all")
    fig = plot_attention_scrubber(patterns, labels, names=batch.position_names(), causal=True)
    z = np.array(fig.data[0].z, dtype=float)
    assert np.isnan(z[np.triu_indices(len(z), 1)]).all() and not np.isnan(z[np.tril_indices(len(z))]).any()
    assert fig.layout.annotations[0].text.startswith("L0H0 map ")


def test_patching_a_token_both_runs_share_recovers_nothing_and_one_head_is_its_layer(mws):
    """The separator is the same token in clean and corrupted sequences: patching its embedding
    moves nothing. With one head, patching z and patching attn_out are the same patch."""
    from analyses.causal.sequence_patching import patching_agreement, sequence_patching

    cfg, task, batch, model = mws
    with torch.no_grad():
        model.W_U.copy_(torch.randn(model.W_U.shape, generator=torch.Generator().manual_seed(0)))  # a read-out that reads
    frame = sequence_patching(model, batch, sites=("resid_pre", "attn_out", "z"))
    assert abs(frame.ld_gap.iloc[0]) > 0.01
    exact = frame[frame.method == "exact"].set_index(["site", "layer", "pos"]).recovery
    assert exact["resid_pre", 0, cfg.data.length] == pytest.approx(0.0, abs=1e-6)
    assert exact["z"].to_numpy() == pytest.approx(exact["attn_out"].to_numpy(), abs=1e-5)
    assert exact["resid_pre"].abs().max() > 0.05  # the inputs do carry the answer
    agreement = patching_agreement(frame.assign(step=0)).set_index("site")
    assert set(agreement.index) == {"resid_pre", "attn_out", "z"} and agreement.pearson.notna().all()
