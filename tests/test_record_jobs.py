"""The Recorder in real training jobs: bit for bit with dropout and the global RNG (and a planted
broken recorder that this catches), two processes (DDP, FSDP2, the Trainer and Lightning under
torchrun), the frameworks' steps and losses (best model at end, evaluation on start, gradient
accumulation, gradient norms), honest columns and free-form scalars, resume, what a recorded run
says about itself, and one-line errors."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from mechlrmc import Recorder
from mechlrmc.cli import main
from mechlrmc.factory import FactoryError
from mechlrmc.record import RecordError
from mechlrmc.runs import Run
from mechlrmc.sites import SiteError
from mechlrmc.tasks import get_task
from mechlrmc.tasks.mws import MWSConfig

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "docs" / "examples" / "mingpt_mws.py"
LIGHTNING = ROOT / "tests" / "lightning_mws.py"
TASK = MWSConfig(length=6, max_value=6, modulus=7)
KW = dict(length=6, max_value=6, d_model=16)
SITES = {"final": "ln_f", "attention": ["blocks.0.attn.pattern"]}


def _load(path: Path, name: str):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


ex = _load(EXAMPLE, "mingpt_mws_example")
lit = _load(LIGHTNING, "lightning_mws")


# ----- bit for bit, with dropout and the global RNG -----
def strict_loop(out: Path | None, steps: int = 8, log: str = "none") -> tuple[list[float], dict, list[bool]]:
    """A loop whose numbers a careless recorder would change: dropout in the forward and batches
    from torch's global RNG. Returns its losses, final weights and, after every recorded step,
    whether the model is in train mode with every parameter requiring a gradient."""
    torch.manual_seed(0)
    model = lit.with_dropout(ex.build(**KW), 0.2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    rec = Recorder(out, model, task=TASK, sites=SITES, optimizer=opt, checkpoints=2, eval_every=2, log=log,
                   model_factory=f"{EXAMPLE}:build", factory_kwargs=KW) if out else None
    losses, flags = [], []
    for step in range(1, steps + 1):
        seq = torch.randint(1, 7, (16, 13))
        loss = torch.nn.functional.cross_entropy(model(seq[:, :-1]).transpose(1, 2), seq[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if rec is not None:
            rec.step(step, loss=losses[-1])
            flags.append(model.training and all(p.requires_grad for p in model.parameters()))
    if rec is not None:
        rec.close()
    return losses, {k: v.clone() for k, v in model.state_dict().items()}, flags


def assert_bit_for_bit(tmp_path: Path, log: str = "none") -> None:
    plain_losses, plain_weights, _ = strict_loop(None)
    losses, weights, flags = strict_loop(tmp_path / f"strict_{log}", log=log)
    assert all(flags), flags  # train mode and requires_grad after every recorded step
    assert losses == plain_losses
    assert all(torch.equal(weights[k], plain_weights[k]) for k in plain_weights)


@pytest.mark.parametrize("log", ["none", "tensorboard"])
def test_the_recorder_leaves_a_loop_with_dropout_and_global_rng_bit_for_bit(tmp_path, log):
    if log != "none":
        pytest.importorskip("tensorboard")
    assert_bit_for_bit(tmp_path, log)
    if log == "tensorboard":
        assert any((tmp_path / "strict_tensorboard" / "tensorboard").iterdir())  # the telemetry did run


def _draws_from_the_global_rng(self):
    torch.rand(1)  # a recorder that forgot fork_rng
    return contextlib.nullcontext()


@contextlib.contextmanager
def _leaves_eval_mode(self):
    self.model.eval()  # a recorder that forgot to put the train flag back
    with torch.no_grad():
        yield


@pytest.mark.parametrize("broken", [_draws_from_the_global_rng, _leaves_eval_mode])
def test_a_broken_recorder_fails_the_bit_for_bit_check(tmp_path, monkeypatch, broken):
    monkeypatch.setattr(Recorder, "_quiet", broken)
    with pytest.raises(AssertionError):
        assert_bit_for_bit(tmp_path)


def _hf_data(n: int = 64) -> list[dict]:
    sequences = get_task("mws").sample(TASK, n, torch.Generator().manual_seed(1)).sequences[:, :-1]
    return [{"input_ids": s, "labels": s} for s in sequences]


def _gpt2(dropout: float = 0.0):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=8, n_positions=16, n_embd=32, n_layer=1, n_head=2,
                                     resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)


def _hf_train(out: Path | None, tmp_path: Path, callbacks=(), steps: int = 6, **args):
    transformers = pytest.importorskip("transformers")
    model = _gpt2(args.pop("dropout", 0.0))
    settings = dict(output_dir=str(tmp_path / "hf_out"), max_steps=steps, per_device_train_batch_size=8, logging_steps=1,
                    learning_rate=1e-3, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    settings.update(args)
    trainer = transformers.Trainer(model=model, args=transformers.TrainingArguments(**settings),
                                   train_dataset=_hf_data(), eval_dataset=_hf_data(16), callbacks=list(callbacks))
    trainer.train()
    return trainer, model


def test_the_trainer_callback_leaves_the_trainer_bit_for_bit(tmp_path):
    transformers = pytest.importorskip("transformers")
    from mechlrmc.integrations.hf import RecorderCallback

    flags = []

    class Flags(transformers.TrainerCallback):  # runs after the recorder's flush at each step's start
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            flags.append(model.training and all(p.requires_grad for p in model.parameters()))

    plain, plain_model = _hf_train(None, tmp_path, dropout=0.2)
    recorded, model = _hf_train(None, tmp_path, dropout=0.2, callbacks=[
        RecorderCallback(tmp_path / "hf", task=TASK, sites={"final": "transformer.ln_f"}, eval_every=1), Flags()])
    losses = [[h["loss"] for h in t.state.log_history if "loss" in h] for t in (plain, recorded)]
    assert losses[0] == losses[1] and len(losses[0]) == 6
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), plain_model.state_dict().values()))
    assert all(flags) and len(flags) == 6


def test_the_lightning_callback_leaves_the_fit_bit_for_bit(tmp_path):
    lightning = pytest.importorskip("lightning")
    from mechlrmc.integrations.lightning import RecorderCallback

    flags = []

    class Flags(lightning.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            flags.append(pl_module.training and all(p.requires_grad for p in pl_module.parameters()))

    def fit(callbacks):
        data = torch.utils.data.TensorDataset(get_task("mws").sample(TASK, 64, torch.Generator().manual_seed(1)).sequences)
        torch.manual_seed(0)
        module = lit.LitMWS(dropout=0.2)
        trainer = lightning.Trainer(max_steps=6, callbacks=callbacks, logger=False, enable_checkpointing=False,
                                    enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
        trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=16))
        return module

    plain = fit([])
    recorded = fit([RecorderCallback(tmp_path / "pl", task=TASK, model_factory=f"{LIGHTNING}:LitMWS",
                                     sites={"final": "gpt.ln_f"}, eval_every=1), Flags()])
    assert recorded.losses == plain.losses and len(plain.losses) == 6
    assert all(torch.equal(a, b) for a, b in zip(recorded.state_dict().values(), plain.state_dict().values()))
    assert all(flags) and len(flags) == 6


# ----- two processes -----
@pytest.mark.slow
def test_two_processes_write_one_run_each_with_rank_0s_weights(tmp_path):
    """A plain DDP loop, an FSDP2 loop, the Trainer and a Lightning DDP fit under `torchrun
    --standalone --nproc_per_node 2` (tests/distributed_job.py): one run directory each, written by
    rank 0, whose every checkpoint equals rank 0's weights at that step, under the module's own names."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(ROOT / "tests" / "distributed_job.py"), str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for job in ("ddp", "fsdp", "hf", "pl"):
        verdict = json.loads((tmp_path / f"{job}.json").read_text())
        assert verdict["steps"] == [0, 2, 4, 6] and all(verdict["same"].values()), (job, verdict)
        run = Run(tmp_path / job)
        assert not any(k.startswith(("module.", "_orig_mod.")) for k in run.state_dict(6))
        assert run.evals.eval_loss.notna().all() and len(run.metrics) == 7, job
    assert Run(tmp_path / "ddp").config.record.loop["processes"] == 2
    for job in ("ddp", "hf"):
        assert main(["report", str(tmp_path / job), "-o", str(tmp_path / f"{job}.html"), "--quick", "--workers", "1"]) == 0


# ----- the frameworks' steps and losses -----
def test_the_trainer_callback_records_the_last_step_not_the_best_model(tmp_path):
    from mechlrmc.integrations.hf import RecorderCallback

    callback = RecorderCallback(tmp_path / "hf", checkpoints=100)  # no task: the loop's own losses
    trainer, model = _hf_train(None, tmp_path, callbacks=[callback], steps=6, eval_strategy="steps", eval_steps=2,
                               save_strategy="steps", save_steps=2, load_best_model_at_end=True,
                               metric_for_best_model="eval_loss", greater_is_better=True, eval_on_start=True)
    from safetensors.torch import load_file

    best, last = trainer.state.best_model_checkpoint, tmp_path / "hf_out" / "checkpoint-6"
    assert not best.endswith("checkpoint-6")  # the highest evaluation loss is not the last step's
    run = Run(tmp_path / "hf")
    saved = load_file(last / "model.safetensors")
    assert all(torch.equal(run.state_dict(6)[k], v) for k, v in saved.items())  # the last step, not the best
    metrics = run.metrics.set_index("step")
    history = {h["step"]: h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h}
    assert 0 in history and metrics.eval_loss[0] == pytest.approx(history[0])  # eval_on_start: step 0's row
    assert math.isnan(metrics.eval_loss[1]) and metrics.eval_loss[2] == pytest.approx(history[2])
    losses = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
    assert metrics.loss[1:].tolist() == pytest.approx([losses[s] for s in range(1, 7)])  # training loss in `loss`
    assert {"grad_norm", "learning_rate", "epoch"} <= set(run.metric_columns)  # the Trainer's own scalars
    assert run.evals.step.tolist() == [0, 2, 4, 6]  # the phases read the evaluations only


def test_the_trainer_callback_keeps_gradient_norms_and_the_accumulated_loss(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mechlrmc.integrations.hf import RecorderCallback

    callback = RecorderCallback(tmp_path / "hf", task=TASK, sites={"final": "transformer.ln_f"}, eval_every=2,
                                log="tensorboard")
    trainer, _ = _hf_train(None, tmp_path, callbacks=[callback], steps=4, gradient_accumulation_steps=2,
                           per_device_train_batch_size=4)
    events = EventAccumulator(str(tmp_path / "hf" / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    grads = [t for t in events.Tags()["scalars"] if t.startswith("grad_norm/")]
    assert grads and all(e.value > 0 for t in grads for e in events.Scalars(t))  # kept before the Trainer cleared them
    run = Run(tmp_path / "hf")
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert run.metrics.loss.iloc[1:].tolist() == pytest.approx(losses)
    assert run.config.record.loop["gradient_accumulation_steps"] == 2 and run.config.record.loop["batch_size"] == 8


def test_the_lightning_callback_records_the_mean_loss_of_accumulated_batches(tmp_path):
    lightning = pytest.importorskip("lightning")
    from mechlrmc.integrations.lightning import RecorderCallback

    data = torch.utils.data.TensorDataset(get_task("mws").sample(TASK, 64, torch.Generator().manual_seed(1)).sequences)
    torch.manual_seed(0)
    module = lit.LitMWS()
    callback = RecorderCallback(tmp_path / "pl", task=TASK, model_factory=f"{LIGHTNING}:LitMWS", sites={"final": "gpt.ln_f"},
                                eval_every=2)
    trainer = lightning.Trainer(max_steps=3, accumulate_grad_batches=2, callbacks=[callback], logger=False,
                                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                                accelerator="cpu")
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=8))
    expected = [np.mean(module.losses[i:i + 2]) for i in range(0, 6, 2)]  # each step: its two micro-batches
    assert Run(tmp_path / "pl").metrics.loss.iloc[1:].tolist() == pytest.approx(expected, rel=1e-6)


# ----- honest columns and free-form scalars -----
def test_free_form_scalars_are_columns_and_the_tasks_columns_are_never_overwritten(tmp_path):
    model = ex.build(**KW)
    with Recorder(tmp_path / "r", model, task=TASK, sites=SITES, eval_every=2) as rec:
        rec.step(1, loss=1.0)
        rec.step(2, loss=0.9, lr=torch.tensor(1e-3), my_norm=np.float32(2.5))
        with pytest.raises(RecordError, match=r"metric 'eval_loss' is a column the recorder writes itself \(the task "
                                              r"evaluates it\): allowed another name \(for example 'loop_eval_loss'\)"):
            rec.step(3, loss=0.8, eval_loss=0.1)
        rec.step(np.int64(3), loss=0.8, loop_eval_loss=0.1)  # a numpy step is an integer
    metrics = Run(tmp_path / "r").metrics
    assert list(metrics.columns[-3:]) == ["lr", "my_norm", "loop_eval_loss"]
    assert math.isnan(metrics.lr[1]) and metrics.lr[2] == pytest.approx(1e-3)  # earlier rows empty there
    assert metrics.my_norm[2] == 2.5 and metrics.loop_eval_loss[3] == 0.1 and metrics.eval_loss[2] != 0.1


def test_a_loop_without_a_task_keeps_training_and_evaluation_losses_apart(tmp_path):
    model = torch.nn.Linear(2, 1)
    with Recorder(tmp_path / "r", model, checkpoints=10, eval_every=5) as rec:
        for step in range(1, 21):
            rec.step(step, loss=3.0 - 0.1 * step, **({"eval_loss": 2.0 if step < 15 else 0.2} if step % 5 == 0 else {}))
    run = Run(tmp_path / "r")
    assert run.metrics.loss.iloc[1:].tolist() == pytest.approx([3.0 - 0.1 * s for s in range(1, 21)])
    assert run.evals.step.tolist() == [5, 10, 15, 20] and run.evals.eval_loss.tolist() == [2.0, 2.0, 0.2, 0.2]


# ----- resume -----
def test_resume_restores_the_scheduler_and_the_scaler_exactly(tmp_path):
    def loop(out, steps, resume=False, fail_at=None):
        torch.manual_seed(0)
        model = ex.build(**KW)
        opt = torch.optim.Adam(model.parameters(), lr=torch.tensor(1e-2))  # a tensor learning rate
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        scaler = torch.amp.GradScaler("cpu", init_scale=256.0, growth_interval=2)
        rec = Recorder(out, model, optimizer=opt, scheduler=sched, scaler=scaler, task=TASK, sites=SITES, checkpoints=2,
                       eval_every=4, resume=resume)
        for step in range(rec.start_step + 1, steps + 1):
            seq = torch.randint(1, 7, (16, 13))
            loss = torch.nn.functional.cross_entropy(model(seq[:, :-1]).transpose(1, 2), seq[:, 1:])
            opt.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            if step == fail_at:
                rec.close(failed=True)
                return None
            rec.step(step, loss=loss.item(), lr=sched.get_last_lr()[0], scale=scaler.get_scale())
        rec.close()
        return Run(out)

    whole = loop(tmp_path / "whole", 8)
    assert loop(tmp_path / "cut", 8, fail_at=5) is None
    resumed = loop(tmp_path / "cut", 8, resume=True)
    pd.testing.assert_frame_equal(resumed.metrics.drop(columns="wall_time"), whole.metrics.drop(columns="wall_time"))
    assert whole.metrics.lr.iloc[-1] == pytest.approx(1e-2 / 16) and whole.metrics.scale.nunique() > 1
    assert resumed.config.record.loop["lr"] == pytest.approx(1e-2) and resumed.config.record.loop["optimizer"] == "Adam"


def test_a_trainer_resumed_from_its_own_checkpoint_continues_the_run_from_its_step(tmp_path):
    from safetensors.torch import load_file

    from mechlrmc.integrations.hf import RecorderCallback

    def callback():
        return RecorderCallback(tmp_path / "hf", task=TASK, sites={"final": "transformer.ln_f"}, checkpoints=2,
                                eval_every=2)

    _hf_train(None, tmp_path, callbacks=[callback()], steps=4, save_strategy="steps", save_steps=2)
    saved_2 = load_file(tmp_path / "hf_out" / "checkpoint-2" / "model.safetensors")
    transformers = pytest.importorskip("transformers")
    model = _gpt2()
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "hf_out"), max_steps=6, per_device_train_batch_size=8,
                                          logging_steps=1, learning_rate=1e-3, report_to=[], save_strategy="no",
                                          use_cpu=True, disable_tqdm=True)
    transformers.Trainer(model=model, args=args, train_dataset=_hf_data(), callbacks=[callback()]).train(
        resume_from_checkpoint=str(tmp_path / "hf_out" / "checkpoint-2"))  # from step 2, though the run reached 4
    run = Run(tmp_path / "hf")
    assert run.metrics.step.tolist() == list(range(7)) and run.steps == [0, 2, 4, 6]
    assert all(torch.equal(run.state_dict(2)[k], v) for k, v in saved_2.items())
    assert all(torch.equal(run.state_dict(6)[k], v) for k, v in model.state_dict().items())  # the Trainer's weights


# ----- what a recorded run says about itself -----
def test_a_recorded_run_says_what_the_loop_told_and_nothing_invented(tmp_path, capsys):
    from mechlrmc.integrations.hf import RecorderCallback

    _hf_train(None, tmp_path, steps=2, callbacks=[RecorderCallback(tmp_path / "hf", task=TASK)])
    run = Run(tmp_path / "hf")
    raw = (tmp_path / "hf" / "config.yaml").read_text()
    assert "\n  batch_size: 256" not in raw and "\n  lr: 0.0001" not in raw  # no invented defaults
    loop = run.config.record.loop
    assert loop["learning_rate"] == 1e-3 and loop["per_device_train_batch_size"] == 8 and loop["optimizer"] == "AdamW"
    assert run.config.record.loop_line().startswith("AdamW, lr 0.001, betas [0.9, 0.999], weight_decay 0.0, batch_size 8")
    assert "foreach" not in run.config.record.loop_line()  # the report's line leaves the kernel switches to config.yaml
    assert main(["info", str(run.path)]) == 0
    assert "model: GPT2LMHeadModel: 1 layers, 2 heads, width 32, " in capsys.readouterr().out


def test_a_compiled_model_is_recorded_under_its_own_names(tmp_path):
    model = ex.build(**KW)
    compiled = torch.compile(model)  # never called here: compiling needs a compiler, recording does not
    with Recorder(tmp_path / "c", compiled, task=TASK, sites=SITES, model_factory=f"{EXAMPLE}:build",
                  factory_kwargs=KW) as rec:
        rec.step(1, loss=1.0)
    run = Run(tmp_path / "c")
    assert set(run.state_dict(1)) == set(model.state_dict())
    assert run.config.record.model["class"] == "GPT" and run.config.record.model["layers"] == 1


# ----- one-line errors -----
BUILT_ON: list[str] = []


def _spy_build(**kwargs):
    model = ex.build(**kwargs)
    BUILT_ON.append(next(model.parameters()).device.type)
    return model


def test_the_factory_is_checked_on_the_meta_device(tmp_path):
    BUILT_ON.clear()
    Recorder(tmp_path / "m", _spy_build(**KW), task=TASK, sites=SITES, model_factory=_spy_build, factory_kwargs=KW).close()
    assert BUILT_ON == ["cpu", "meta"]  # the user's model, then the factory's check without memory for weights


def _raises_type_error(**kwargs):
    return torch.nn.Linear("four", 1)


def _with_an_uncalled_module():
    model = ex.build(**KW)
    model.spare = torch.nn.Identity()  # as Hugging Face 5.x eager attention never calls `attn_dropout`
    return model


@pytest.mark.parametrize("model, kwargs, words", [
    (lambda: torch.nn.Linear(2, 1), dict(model_factory="mechlrmc.integrations.hf:from_config",
                                         factory_kwargs={"config": {}, "architecture": "Linear"}),
     ["architecture='Linear' is not a transformers model class"]),
    (lambda: torch.nn.Linear(2, 1), dict(model_factory=_raises_type_error),
     ["failed with factory_kwargs={}", "TypeError inside the factory"]),
    (lambda: torch.nn.Linear(2, 1), dict(model_factory="torch.nn:Linear",
                                         factory_kwargs={"in_features": 2, "out_features": 1, "colour": 3}),
     ["does not take factory_kwargs"]),
    (_with_an_uncalled_module, dict(task=TASK, sites={"final": "ln_f", "attention": ["spare"]}),
     ["site 'spare' of GPT is never called in its forward"]),
])
def test_bad_input_in_real_jobs_is_one_line_and_writes_nothing(tmp_path, model, kwargs, words):
    with pytest.raises((FactoryError, RecordError, SiteError)) as info:
        Recorder(tmp_path / "bad", model(), **kwargs)
    message = str(info.value)
    assert "\n" not in message and all(w in message for w in words), message
    assert not (tmp_path / "bad" / "config.yaml").exists()


def test_a_model_without_parameters_and_a_numpy_step_are_recorded(tmp_path):
    with Recorder(tmp_path / "p", torch.nn.ReLU(), checkpoints=1) as rec:
        rec.step(np.int32(1), loss=np.float64(0.5))
    assert Run(tmp_path / "p").metrics.loss.tolist()[1] == 0.5
