"""The Recorder on a loop and a model mechlrmc did not write (docs/examples/mingpt_mws.py), sites on
any model, the framework callbacks, and bad input (bit for bit and real jobs: test_record_jobs.py)."""

from __future__ import annotations

import importlib.util
import math
import re
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from mechlrmc import Recorder
from mechlrmc.cli import main
from mechlrmc.factory import FactoryError
from mechlrmc.record import RecordError
from mechlrmc.runs import Run, RunLockedError
from mechlrmc.sites import SiteError
from mechlrmc.tasks.mws import MWSConfig

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "docs" / "examples" / "mingpt_mws.py"
SMALL = dict(steps=12, length=6, max_value=6, batch=32, eval_every=5)
SITES = {"final": "ln_f", "attention": ["blocks.0.attn.pattern"]}


def _example():
    spec = importlib.util.spec_from_file_location("mingpt_mws_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


ex = _example()


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> tuple[Run, torch.nn.Module, list[float]]:
    out = tmp_path_factory.mktemp("record") / "mingpt"
    model, losses = ex.train(out, **SMALL)
    return Run(out), model, losses


def test_a_recorded_run_is_a_run_directory_that_rebuilds_the_users_model(recorded):
    run, model, losses = recorded
    assert run.config.recorded and run.config.model is None
    assert run.steps[0] == 0 and run.steps[-1] == 12 and 10 in run.steps  # step 0, log-spaced, the last
    assert run.metrics.loss.iloc[1:].tolist() == losses
    evals = run.evals
    assert evals.step.tolist() == [0, 5, 10] and evals.eval_collapse.notna().all()
    assert evals.eval_attn_on_map.between(0, 1).all()
    rebuilt = run.load_model(12)
    tokens = torch.randint(0, 8, (3, 12))
    assert torch.equal(rebuilt(tokens), model.eval()(tokens))
    assert run.sites.attention == ("blocks.0.attn.pattern",) and run.sites.hidden == {"final": "ln_f", "0": "blocks.0"}
    assert run.sites.anatomy["z"] == ["blocks.0.attn.out"] and run.sites.anatomy["heads"] == 1  # `{L}` written out
    for step in run.steps:
        run.verify(step)


def test_info_reads_a_recorded_run_and_every_mws_lens_applies(recorded, capsys):
    from analyses.base.context import Context
    from analyses.base.registry import applicable

    run = recorded[0]
    assert main(["info", str(run.path)]) == 0
    # every entry a run that `mechlrmc train` makes on MWS gets (tests/test_sequences.py), through the anatomy
    # the example's sites name
    assert {a.name for a in applicable(Context(run))} == {
        "overview", "phases", "llc", "taxonomy", "views", "scrubber", "ablation", "sequence_patching", "probes", "swaps",
        "plateau_dynamics", "learning_times", "early_warning"}
    # its report through the command line: the Trainer's, Lightning's and the jobs' recorded runs below; every
    # section of a recorded run's report: the minGPT report test


def test_native_measures_read_collapse_at_the_named_site(recorded):
    from analyses.plateau.sequences import native_measures

    run, model, _ = recorded
    batch = run.config.task.eval_batch(run.config, 64)
    tables = native_measures(model.eval(), batch, run.sites)
    hidden = model.ln_f(model.blocks[0](model.tok(batch.tokens) + model.pos[: batch.tokens.shape[1]]))
    from mechlrmc.measures import mean_pairwise_cosine

    assert tables["collapse"].set_index("layer").cos_scored["final"] == pytest.approx(
        mean_pairwise_cosine(hidden.detach(), batch.scored), abs=1e-6)
    assert len(tables["attention_progress"]) == 1  # one layer, one head


def test_a_resumed_recording_continues_exactly(tmp_path):
    def loop(out, steps, resume=False, fail_at=None):
        torch.manual_seed(0)
        model = ex.build(length=6, max_value=6, d_model=16)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        rec = Recorder(out, model, optimizer=opt, task=MWSConfig(length=6, max_value=6, modulus=7), sites=SITES,
                       checkpoints=2, eval_every=4, resume=resume, factory_kwargs=dict(length=6, max_value=6, d_model=16),
                       model_factory=f"{EXAMPLE}:build")
        for step in range(rec.start_step + 1, steps + 1):
            seq = torch.randint(1, 7, (16, 13))  # the loop's data from torch's global RNG
            loss = torch.nn.functional.cross_entropy(model(seq[:, :-1]).transpose(1, 2), seq[:, 1:])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step == fail_at:
                rec.close(failed=True)
                return None
            rec.step(step, loss=loss.item())
        rec.close()
        return Run(out)

    whole = loop(tmp_path / "whole", 8)
    assert loop(tmp_path / "cut", 8, fail_at=5) is None
    assert Run(tmp_path / "cut").steps[-1] == 4
    resumed = loop(tmp_path / "cut", 8, resume=True)
    pd.testing.assert_frame_equal(resumed.metrics.drop(columns="wall_time"), whole.metrics.drop(columns="wall_time"))


def test_a_run_without_a_task_has_the_loops_losses_and_their_phases(tmp_path):
    from analyses.base.context import Context
    from analyses.base.registry import applicable

    model = torch.nn.Linear(4, 1)
    with Recorder(tmp_path / "loop", model, checkpoints=5, eval_every=1) as rec:
        for step in range(1, 31):
            loss = 2.0 if step < 15 else 0.1  # a plateau, then a drop
            rec.step(step, loss=loss)
    run = Run(tmp_path / "loop")
    assert run.config.data.task == "loop" and run.config.train.steps == 30
    ctx = Context(run)
    assert ctx.phases.dropped and ctx.phases.drop_step == 15
    assert {a.name for a in applicable(ctx)} == {"overview", "phases"}


def test_a_recorded_batch_gives_a_run_without_a_task_its_norms_and_hessian(tmp_path):
    """A least-squares loop: the Hessian of the MSE of a linear model y = w.x is 2 X^T X / n, known
    exactly; the top eigenvalue from the recorded batch must equal it."""
    from analyses.base.context import Context
    from analyses.base.registry import applicable, get

    torch.manual_seed(0)
    x = torch.randn(64, 3) * torch.tensor([3.0, 1.0, 0.5])
    y = x @ torch.tensor([1.0, -2.0, 0.5])
    model = torch.nn.Linear(3, 1, bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with Recorder(tmp_path / "lsq", model, checkpoints=5, eval_every=1, model_factory="torch.nn:Linear",
                  factory_kwargs={"in_features": 3, "out_features": 1, "bias": False}) as rec:
        rec.record_batch(x, y[:, None], loss="mse")
        for step in range(1, 21):
            loss = torch.nn.functional.mse_loss(model(x), y[:, None])
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.step(step, loss=loss.item())
    ctx = Context(Run(tmp_path / "lsq"))
    # a linear model with no anatomy: the lenses of the losses and of a recorded batch (the LLC on it)
    assert {a.name for a in applicable(ctx)} == {"overview", "phases", "llc", "early_warning"}
    from analyses.plateau.early_warning import HESSIAN_BATCH, warning_measures

    rows = warning_measures(ctx.model(20), ctx.batch).set_index("measure").value
    first = x[:HESSIAN_BATCH]  # the Hessian is taken on the batch's first HESSIAN_BATCH examples
    exact = float(torch.linalg.eigvalsh(2 * first.T @ first / len(first)).max())
    assert rows["top Hessian eigenvalue"] == pytest.approx(exact, rel=1e-4)
    assert rows["weight norm weight"] == pytest.approx(float(ctx.model(20).weight.norm()), rel=1e-6)
    assert get("early_warning").compute(ctx)["trajectories"].measure.str.startswith("grad norm").any()


def test_a_folder_of_recorded_runs_is_a_family_with_survival(tmp_path):
    from analyses.family.summary import family_summary
    from analyses.family.survival import k_of_n

    model = torch.nn.Linear(4, 1)
    for seed, drop in ((0, 12), (1, 18), (2, None)):  # the third has not dropped by its last step: censored
        with Recorder(tmp_path / "family" / f"seed={seed}", model, checkpoints=10, eval_every=1) as rec:
            for step in range(1, 31):
                rec.step(step, loss=0.1 if drop and step >= drop else 2.0 + 0.01 * ((step * 7 + seed) % 3))
    summary = family_summary(tmp_path / "family")
    assert summary.drop_step.tolist()[:2] == [12, 18] and math.isnan(summary.drop_step.iloc[2])
    assert k_of_n(summary) == "2 of 3 dropped, 1 censored"
    assert main(["report", str(tmp_path / "family"), "-o", str(tmp_path / "family.html"), "--quick"]) == 0
    page = (tmp_path / "family.html").read_text()
    assert "recorded runs" in page and "Kaplan-Meier" in page


@pytest.mark.parametrize("kwargs, words", [
    (dict(model_factory="nowhere.at_all:build"), ["model_factory='nowhere.at_all:build'", "does not import"]),
    (dict(model_factory=f"{EXAMPLE}:build", factory_kwargs=dict(length=6, max_value=6, d_model=16)),
     ["does not fit", "other shapes"]),
    (dict(sites={"final": "transformer.ln_f"}), ["site 'transformer.ln_f'", "ln_f"]),
    (dict(task="mws"), ["task='mws' does not fit", "[2, 32]", "vocabulary of 18"]),
])
def test_bad_recorder_input_is_one_line_and_writes_nothing(tmp_path, kwargs, words):
    torch.manual_seed(0)
    model = ex.build(length=6, max_value=6, d_model=32)
    with pytest.raises((FactoryError, SiteError, RecordError)) as info:
        Recorder(tmp_path / "bad", model, **kwargs)
    message = str(info.value)
    assert "\n" not in message and all(w in message for w in words), message
    assert not (tmp_path / "bad" / "config.yaml").exists()


def test_a_model_whose_output_is_not_the_tasks_logits_is_refused(tmp_path):
    model = torch.nn.Embedding(18, 5)  # [batch, pos, 5]: too few logits for MWS's 18 tokens
    with pytest.raises(RecordError, match=r"returns \[2, 32, 5\]; allowed logits \[batch, 32, >= 18\]"):
        Recorder(tmp_path / "bad", model, task="mws")
    assert not (tmp_path / "bad").exists()


def test_a_step_backwards_and_a_second_recorder_are_refused_and_nothing_is_lost(tmp_path):
    model = ex.build(length=6, max_value=6, d_model=16)
    task = MWSConfig(length=6, max_value=6, modulus=7)
    with Recorder(tmp_path / "r", model, task=task, sites=SITES, eval_every=2) as rec:
        rec.step(1, loss=1.0)
        rec.step(2, loss=0.9)
        before = (tmp_path / "r" / "metrics.csv").read_text()
        with pytest.raises(RecordError, match=r"step=2 goes backwards.*allowed an integer > 2"):
            rec.step(2, loss=0.8)
        with pytest.raises(RunLockedError):
            Recorder(tmp_path / "r", model, task=task, sites=SITES, resume=True)
        assert (tmp_path / "r" / "metrics.csv").read_text() == before
        rec.step(3, loss=0.7)
    assert Run(tmp_path / "r").metrics.step.tolist() == [0, 1, 2, 3]


def test_a_bad_factory_at_report_time_is_one_line_with_exit_code_2(recorded, tmp_path, capsys):
    import shutil

    import yaml

    copy = tmp_path / "moved"
    shutil.copytree(recorded[0].path, copy)
    raw = yaml.safe_load((copy / "config.yaml").read_text())
    raw["record"]["model_factory"] = "gone_module:build"
    (copy / "config.yaml").write_text(yaml.safe_dump(raw))
    assert main(["analyze", "learning_times", str(copy), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "gone_module:build" in err and "does not import" in err


def _tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=8, n_positions=16, n_embd=32, n_layer=1, n_head=2)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)


def test_the_transformers_trainer_callback_records_a_run(tmp_path):
    transformers = pytest.importorskip("transformers")
    from mechlrmc.integrations.hf import RecorderCallback

    task = MWSConfig(length=6, max_value=6, modulus=7)
    data = get_sequences(task, 64)
    model = _tiny_gpt2()
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "hf_out"), max_steps=6, per_device_train_batch_size=16,
                                          logging_steps=2, learning_rate=1e-3, report_to=[], save_strategy="no",
                                          use_cpu=True, disable_tqdm=True)
    callback = RecorderCallback(tmp_path / "hf", task=task, sites="auto", checkpoints=2)
    transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[callback]).train()
    run = Run(tmp_path / "hf")
    assert run.sites.hidden == {"0": "transformer.h.0", "final": "transformer.ln_f"}  # derived: no names given
    assert run.config.record.source == "transformers" and run.steps == [0, 2, 4, 6]
    assert run.metrics.loss.dropna().size == 3  # the steps the Trainer logged
    assert run.evals.eval_collapse.notna().all()
    rebuilt = run.load_model(6)
    tokens = torch.randint(0, 8, (2, 12))
    assert torch.allclose(rebuilt(tokens).logits, model.eval()(tokens).logits)
    assert main(["info", str(run.path)]) == 0
    # the attention lenses without an attention site: TransformerBridge on a copy of each checkpoint
    from analyses.base.context import Context
    from analyses.base.registry import applicable

    ctx = Context(run, progress=False)
    assert ctx.anatomy.bridged and {"taxonomy", "views", "scrubber", "ablation", "sequence_patching", "probes",
                                    "swaps"} <= {a.name for a in applicable(ctx)}
    shares = ctx.taxonomy
    assert len(shares[shares.step == 6]) == 2 and shares.share_on_map.between(0, 1).all()  # 1 layer x 2 heads
    assert main(["report", str(run.path), "-o", str(tmp_path / "hf.html"), "--quick", "--workers", "1"]) == 0
    assert 'id="taxonomy" data-status="ok"' in (tmp_path / "hf.html").read_text()


def get_sequences(task: MWSConfig, n: int) -> list[dict]:
    from mechlrmc.tasks import get_task

    sequences = get_task("mws").sample(task, n, torch.Generator().manual_seed(1)).sequences[:, :-1]
    return [{"input_ids": s, "labels": s} for s in sequences]


def test_the_lightning_callback_records_a_run(tmp_path):
    lightning = pytest.importorskip("lightning")
    from mechlrmc.integrations.lightning import RecorderCallback
    from mechlrmc.tasks import get_task

    factory = ROOT / "tests" / "lightning_mws.py"
    spec = importlib.util.spec_from_file_location("lightning_mws", factory)
    lit = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lit)
    task = MWSConfig(length=6, max_value=6, modulus=7)
    data = torch.utils.data.TensorDataset(get_task("mws").sample(task, 64, torch.Generator().manual_seed(1)).sequences)
    torch.manual_seed(0)
    callback = RecorderCallback(tmp_path / "pl", task=task, model_factory=f"{factory}:LitMWS",
                                sites={"final": "gpt.ln_f", "attention": ["gpt.blocks.0.attn.pattern"]},
                                checkpoints=2, eval_every=2)
    trainer = lightning.Trainer(max_steps=6, callbacks=[callback], logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    module = lit.LitMWS()
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=16))
    run = Run(tmp_path / "pl")
    assert run.config.record.source == "lightning" and run.steps == [0, 2, 4, 6]
    assert run.metrics.loss.notna().sum() == 6 and not math.isnan(run.evals.eval_attn_on_map.iloc[-1])
    tokens = torch.randint(0, 8, (2, 12))
    assert torch.equal(run.load_model(6)(tokens), module.eval()(tokens))
    assert main(["info", str(run.path)]) == 0
    assert main(["report", str(run.path), "-o", str(tmp_path / "pl.html"), "--quick", "--workers", "1"]) == 0


@pytest.mark.slow
def test_the_report_of_a_recorded_foreign_model_shows_plateau_drop_repetition_and_collapse(tmp_path):
    """The worked example's minGPT (linear attention, the plateau paper's MWS step) at 8 inputs, seed 0,
    batch 128 and step size 2e-4, 180 steps (on this project's machine: plateau from ~20, greedy
    outputs repeating at ~0.7 against the truth's 0.06, drop at ~135). Every entry its task allows
    applies through the anatomy its sites name; the solving head is over half on the optimal map at
    the end and not on the plateau; patching at the drop recovers the answer through that head's z at
    the output positions; a probe of the window sum at the last layer beats one of a single input."""
    from analyses.base.registry import ANALYSES
    from analyses.report.run_report import build_report

    from conftest import execute_notebook, notebook_errors

    torch.set_num_threads(1)
    # notebooks/06_your_own_loop trains and records this run (ex.train(out, steps=180, length=8, batch=128,
    # lr=2e-4, eval_every=10) in a fresh temporary folder): run it, then report on the run it recorded
    nb = execute_notebook(ROOT / "notebooks" / "06_your_own_loop.ipynb", {"TMPDIR": str(tmp_path)})
    assert notebook_errors(nb) == []
    (out,) = tmp_path.glob("*/mingpt8")
    report = build_report(Run(out), quick=True, workers=1, progress=False)
    assert report.errors == {}
    assert "the user's own" in report.html and "ln_f" in report.html and "Plateau dynamics" in report.html
    ctx = report.context
    sections = set(re.findall(r'<section id="([^"]+)" data-status="ok">', report.html))
    assert sections == {a.name for a in ANALYSES if a.needs is None and set(a.requires) <= ctx.task.supports}
    tables = report.tables  # what the sections showed, by section key and table name
    phases = tables["phases"]["phases"].iloc[0]
    assert phases.dropped and 60 < phases.drop_step < 180 and phases.plateau_start < phases.drop_step
    assert phases.plateau_max_rep > 3 * phases.rep_true  # repetition above the truth's on the plateau (P1)
    dynamics = tables["plateau_dynamics"]
    final = dynamics["collapse"][dynamics["collapse"].layer == "final"].set_index("step").cos_scored
    plateau = final[(final.index >= phases.plateau_start) & (final.index < phases.drop_step)]
    assert plateau.max() > 0.5 and final.iloc[-1] < 0.1  # collapse at the site ln_f on the plateau, gone after (P2)
    taxonomy = ctx.taxonomy
    head = taxonomy[taxonomy.step == ctx.final].sort_values("share_on_map").iloc[-1]
    assert head.share_on_map > 0.5 > taxonomy[taxonomy.step == ctx.key["plateau"]].share_on_map.max()
    patching = tables["sequence_patching"]["sequence_patching"]
    z = patching[(patching.step == ctx.key["drop"]) & (patching.site == "z") & (patching.method == "exact")
                 & (patching.layer == head.layer) & (patching["head"] == head["head"]) & (patching.pos >= 8)]
    assert z.recovery.sum() > 0.5  # the solving head's z at the output positions carries the answer
    probes = tables["probes"]["probes"]
    last = probes[(probes.step == ctx.final) & (probes.layer == probes.layer.max())].set_index("target").r2
    assert last["window"] > last["input"]


def test_the_scaling_command_fits_a_planted_law_on_a_family(tmp_path, capsys, no_png):
    """Recorded loops whose plateau lasts 4 x eval_every^1.5 steps (varied key train.eval_every): the
    command's exponent comes back near 1.5, with its interval, tables and figures written."""
    model = torch.nn.Linear(2, 1)
    for every in (1, 2, 3, 4):
        for seed in range(3):
            drop = round(40 * every ** 1.5 * (1 + 0.05 * (seed - 1)))
            with Recorder(tmp_path / "fam" / f"e={every},s={seed}", model, checkpoints=1000, eval_every=every,
                          steps=every * 200) as rec:
                for step in range(1, every * 200 + 1):
                    rec.step(step, loss=2.0 if step < drop else 0.1)
    assert main(["analyze", "scaling", str(tmp_path / "fam"), "--by", "train.eval_every", "-o", str(tmp_path / "s")]) == 0
    fits = pd.read_csv(tmp_path / "s" / "scaling.csv")
    assert fits.exponent.between(1.3, 1.7).all() and (fits.ci_low < fits.exponent).all()
    written = {p.name for p in (tmp_path / "s").iterdir()}
    assert {"survival.csv", "median_drop.csv", "power_law.csv", "survival.html"} <= written
    assert {"scaling.png", "scaling.html"} & written  # the PNG where kaleido finds a browser, else the HTML
