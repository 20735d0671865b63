"""Live telemetry (`train.log`): TensorBoard and W&B logs read back with their own readers hold the
run's metrics.csv and the mechanistic measures, resume logs no step twice, the measures agree with
the analysis layer, and progress in a log file is a line every few seconds."""

from __future__ import annotations

import io
import json
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer
from tensorboard.plugins.hparams import plugin_data_pb2
from wandb.proto import wandb_internal_pb2

from analyses.attention.heads import score_pattern
from analyses.plateau.dynamics import collapse
from mechlrmc import measures
from mechlrmc.cli import main
from mechlrmc.config import ConfigError, preset
from mechlrmc.progress import interactive
from mechlrmc.runs import Run
from mechlrmc.train import Trainer, train


def _events(path: Path) -> EventAccumulator:
    events = EventAccumulator(str(path), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    return events


def _column(tag: str) -> str:
    """The metrics.csv column of a `train/` or `eval/` tag."""
    section, name = tag.split("/", 1)
    return f"eval_{name}" if section == "eval" else name


def _wandb_records(path: Path) -> list:
    """The records of an offline run's `.wandb` file: W&B's transaction log (a 7-byte `:W&B` header,
    then LevelDB-log blocks of 32 KiB whose chunks, each behind a 7-byte crc/length/type header,
    join into protobuf `Record`s). wandb 0.31 ships no Python reader, so the test parses it."""
    data, block = path.read_bytes(), 32 * 1024
    assert data[:4] == b":W&B"
    records, pos, pending = [], 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += block - pos % block
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk
            records.append(wandb_internal_pb2.Record.FromString(pending))
            pending = b""
    return records


def _wandb_history(run: Path) -> tuple[list[dict], list]:
    """Every history row of every offline W&B segment of a run, in order, and the run records."""
    rows, runs = [], []
    for file in sorted(run.glob("wandb/offline-run-*/run-*.wandb")):
        for record in _wandb_records(file):
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
            elif record.WhichOneof("record_type") == "run":
                runs.append(record.run)
    return rows, runs


@pytest.fixture(scope="module")
def tensorboard_run(tmp_path_factory) -> Run:
    out = tmp_path_factory.mktemp("telemetry") / "tiny"
    assert main(["train", "--preset", "tiny", "--out", str(out), "--quiet", "--set", "train.log=tensorboard",
                 "--set", "train.log_images_every=20"]) == 0
    return Run(out)


def test_tensorboard_holds_the_metrics_and_the_measures(tensorboard_run):
    events = _events(tensorboard_run.path / "tensorboard")
    tags = set(events.Tags()["scalars"])
    cfg = tensorboard_run.config
    heads = [f"L{l}H{h}" for l in range(cfg.model.n_layers) for h in range(cfg.model.n_heads)]
    expected = {*(f"train/{m}" for m in cfg.task.train_metrics), *(f"eval/{m}" for m in cfg.task.eval_metrics),
                *(f"attention_progress/{h}" for h in heads), *(f"attention_entropy/{h}" for h in heads),
                *(f"heads/{s}/{h}" for s in measures.MATRIX_SCORES for h in heads),
                *(f"collapse/L{l}" for l in range(cfg.model.n_layers)),
                *(f"{kind}/{c}" for kind in ("weight_norm", "grad_norm")
                  for c in ("embed", "pos_embed", "unembed", "attn.0", "mlp.1", "ln.0"))}
    assert expected <= tags
    metrics = tensorboard_run.metrics.set_index("step")
    eval_steps = [0, 10, 20, 30, 40]
    for tag in sorted(t for t in tags if t.startswith(("train/", "eval/"))):
        logged = events.Scalars(tag)
        assert [e.step for e in logged] == (eval_steps if tag.startswith("eval/") else eval_steps[1:]), tag
        for e in logged:  # TensorBoard keeps float32
            assert e.value == np.float32(metrics.loc[e.step, _column(tag)]), (tag, e.step)
    assert [e.step for e in events.Scalars("grad_norm/embed")] == eval_steps[1:]  # no gradient before step 1
    assert all(0 <= e.value <= 1 for e in events.Scalars("attention_progress/L0H0"))
    images = events.Tags()["images"]
    assert sorted(images) == sorted(f"attention_pattern/{h}" for h in heads)
    image = events.Images("attention_pattern/L1H0")
    assert [e.step for e in image] == [0, 20, 40] and image[0].width == image[0].height >= 128
    start = plugin_data_pb2.HParamsPluginData.FromString(
        events.PluginTagToContent("hparams")["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["train.lr"].number_value == cfg.train.lr
    assert start.hparams["model.norm"].string_value == "post"


def test_telemetry_changes_no_result(tensorboard_run, tiny_run):
    plain, logged = tiny_run.metrics.drop(columns="wall_time"), tensorboard_run.metrics.drop(columns="wall_time")
    assert plain.equals(logged)
    for step in tiny_run.steps:
        a, b = tiny_run.state_dict(step), tensorboard_run.state_dict(step)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_wandb_offline_run_holds_the_same_history(tmp_path, monkeypatch, tiny_run):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    run = train(preset("tiny").override(["train.log=wandb"]), tmp_path / "tiny", progress=False)
    assert run.metrics.drop(columns="wall_time").equals(tiny_run.metrics.drop(columns="wall_time"))
    rows, runs = _wandb_history(run.path)
    assert len(runs) == 1 and runs[0].run_id == (run.path / "wandb" / "run-id").read_text()
    metrics = run.metrics.set_index("step")
    assert [r["_step"] for r in rows] == [0, 10, 20, 30, 40]
    for row in rows:
        assert row["eval/loss_mask"] == metrics.loc[row["_step"], "eval_loss_mask"]
        assert row["eval/corr_mask"] == metrics.loc[row["_step"], "eval_corr_mask"]
        assert 0 <= row["attention_progress/L0H1"] <= 1 and "heads/row/L1H1" in row
    assert rows[-1]["train/loss"] == metrics.loc[40, "loss"]
    assert rows[0]["attention_pattern/L0H0/_type"] == "image-file" and "attention_pattern/L0H0/_type" not in rows[1]


def test_a_resumed_run_logs_every_step_once(tmp_path, monkeypatch):
    """Killed after step 30's evaluation (last checkpoint 20), resumed: TensorBoard purges the
    replayed steps and W&B never received them."""
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = preset("tiny").override(["train.log=both"])
    trainer = Trainer(cfg, tmp_path / "run", progress=False)

    def fail(t):
        if t.step == 30:
            raise RuntimeError("killed")

    trainer.add_callback("on_step_end", fail)
    with pytest.raises(RuntimeError, match="killed"):
        trainer.train()
    time.sleep(1.1)  # the next W&B segment gets its own offline-run directory (named to the second)
    run = Trainer(cfg, tmp_path / "run", resume=True, progress=False).train()
    metrics = run.metrics.set_index("step")
    events = _events(run.path / "tensorboard")
    logged = events.Scalars("eval/loss")
    assert [e.step for e in logged] == [0, 10, 20, 30, 40]
    assert all(e.value == np.float32(metrics.loc[e.step, "eval_loss"]) for e in logged)
    rows, runs = _wandb_history(run.path)
    assert [r["_step"] for r in rows] == [0, 10, 20, 30, 40]
    assert all(r["eval/loss"] == metrics.loc[r["_step"], "eval_loss"] for r in rows)
    assert len({r.run_id for r in runs}) == 1 and len(runs) == 2


def test_a_token_task_logs_repetition_and_attention_progress(tmp_path):
    out = tmp_path / "mws"
    assert main(["train", "--preset", "mws", "--out", str(out), "--quiet", "--set", "train.log=tensorboard",
                 "--set", "data.length=6", "--set", "data.max_value=6", "--set", "data.modulus=7",
                 "--set", "model.d_model=32", "--set", "model.d_mlp=128", "--set", "train.steps=20",
                 "--set", "train.batch_size=32", "--set", "train.eval_every=10", "--set", "train.eval_batch_size=64",
                 "--set", "train.checkpoint_every=10", "--set", "train.checkpoint_early_until=0"]) == 0
    events, metrics = _events(out / "tensorboard"), Run(out).metrics.set_index("step")
    rep, progress = events.Scalars("eval/rep"), events.Scalars("attention_progress/L0H0")
    assert [e.step for e in rep] == [e.step for e in progress] == [0, 10, 20]
    assert all(e.value == np.float32(metrics.loc[e.step, "eval_rep"]) for e in rep)
    # one layer, one head: the head's share on the map is the task's own attn_on_map
    assert all(e.value == pytest.approx(metrics.loc[e.step, "eval_attn_on_map"], rel=1e-5) for e in progress)
    assert {"attention_entropy/L0H0", "collapse/L0", "grad_norm/attn.0"} <= set(events.Tags()["scalars"])
    assert not any(t.startswith("heads/") for t in events.Tags()["scalars"])  # LRMC's taxonomy only


def test_measures_agree_with_the_analysis_layer(tiny_run):
    model = tiny_run.load_model(40)
    batch = tiny_run.config.task.eval_batch(tiny_run.config)
    patterns, hidden = measures.attention_and_hidden(model, batch.tokens)
    m, n = batch.m, batch.n
    for layer, pattern in enumerate(patterns):
        ours = measures.matrix_head_scores(pattern, batch.observed, m, n)
        theirs = score_pattern(pattern, batch.observed, m, n)
        for score in measures.MATRIX_SCORES:
            assert ours[score].tolist() == pytest.approx(theirs[score].tolist(), abs=1e-6)
        assert measures.attention_entropy(pattern, causal=False).tolist() == pytest.approx(
            theirs["entropy"].tolist(), abs=1e-6)
    expected = collapse(model, batch).set_index("layer").cos_all  # layer l + 1 = output of block l
    every = torch.ones(m * n, dtype=torch.bool)
    for layer, h in enumerate(hidden):
        assert measures.mean_pairwise_cosine(h, every) == pytest.approx(expected[layer + 1], abs=1e-6)


def test_planted_patterns_give_the_extreme_scores():
    on_map = torch.tensor([[[False, True, True], [False, False, False], [True, False, False]]])  # [1, q, k]
    planted = on_map.float() / on_map.float().sum(-1, keepdim=True).clamp_min(1)
    planted[0, 1, 1] = 1.0  # a query with an empty map row attends to itself: left out of the share
    uniform = torch.full((1, 1, 3, 3), 1 / 3)
    pattern = torch.cat([planted[:, None], uniform], dim=1)  # heads: planted, uniform
    assert measures.attention_share(pattern, on_map).tolist() == pytest.approx([1.0, 0.5])
    entropy = measures.attention_entropy(pattern, causal=False).tolist()
    assert entropy == pytest.approx([np.log(2) / np.log(3) / 3, 1.0])  # rows: 2 keys, 1 key, 1 key
    causal = torch.tril(torch.ones(3, 3)) / torch.arange(1, 4)[:, None]  # uniform over the keys seen
    assert measures.attention_entropy(causal[None, None], causal=True).tolist() == pytest.approx([1.0])


@pytest.mark.parametrize("value, message", [
    ("train.log=tb", "train.log='tb' is invalid: allowed one of ('none', 'tensorboard', 'wandb', 'both')"),
    ("train.log_images_every=15", "train.log_images_every=15 is invalid: allowed 0 (every 10th evaluation) "
                                  "or a multiple of train.eval_every=10"),
])
def test_a_bad_log_setting_is_one_line_and_exit_2(tmp_path, capsys, value, message):
    assert main(["train", "--preset", "tiny", "--out", str(tmp_path / "run"), "--set", value]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"mechlrmc: error: {message}"]
    assert not (tmp_path / "run").exists()


def test_a_missing_package_names_the_extra_before_anything_is_written(tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    assert main(["train", "--preset", "tiny", "--out", str(tmp_path / "run"), "--set", "train.log=both"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs wandb" in err[0] and "pip install 'mechlrmc[telemetry]'" in err[0]
    assert not (tmp_path / "run").exists()


def test_resume_may_turn_telemetry_on(tmp_path):
    out = tmp_path / "run"
    train(preset("tiny").override(["train.steps=20"]), out, progress=False)
    assert main(["train", "--out", str(out), "--resume", "--steps", "40", "--quiet",
                 "--set", "train.log=tensorboard"]) == 0
    assert Run(out).config.train.log == "tensorboard"
    assert [e.step for e in _events(out / "tensorboard").Scalars("eval/loss")] == [30, 40]
    with pytest.raises(ConfigError, match="except train.steps, train.log, train.log_images_every"):
        Trainer(preset("tiny").override(["train.lr=0.1"]), out, resume=True, progress=False)


def test_progress_in_a_log_file_is_a_line_every_few_seconds(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MECHLRMC_PROGRESS_EVERY", "0.5")  # stderr is captured here: not a terminal
    start = time.monotonic()
    assert main(["train", "--preset", "tiny", "--steps", "300", "--out", str(tmp_path / "run")]) == 0
    elapsed = time.monotonic() - start
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert "\r" not in err and 2 <= len(lines) <= elapsed / 0.5 + 2, (elapsed, lines)
    assert lines[-1].startswith("run: 100%") and "300/300" in lines[-1]
    monkeypatch.setenv("MECHLRMC_PROGRESS_EVERY", "soon")
    assert main(["train", "--preset", "tiny", "--out", str(tmp_path / "bad")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "mechlrmc: error: MECHLRMC_PROGRESS_EVERY='soon' is invalid: allowed a number of seconds > 0"]
    assert not (tmp_path / "bad").exists()


def test_a_terminal_keeps_the_redrawn_bar():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert interactive(Terminal()) and not interactive(io.StringIO())


@pytest.mark.ray
@pytest.mark.slow
def test_a_sweep_is_one_tensorboard_logdir_and_one_wandb_group(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("MECHLRMC_PROGRESS_EVERY", "30")
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"preset": "tiny", "steps": 20, "seeds": 2, "set": {"train.log": "both"}}))
    out = tmp_path / "family"
    start = time.monotonic()
    assert main(["sweep", str(spec), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    status = [line for line in err.splitlines() if line.startswith("sweep ")]
    # in a log: two first lines, one when a trial starts, two when it ends, the last, and one per 30 s
    assert "\r" not in err and 2 <= len(status) <= 3 + 3 * 2 + (time.monotonic() - start) / 30, err
    assert status[-1].startswith("sweep 2/2 done")
    logs = EventMultiplexer().AddRunsFromDirectory(str(out))
    logs.Reload()
    assert sorted(logs.Runs()) == ["seed=0/tensorboard", "seed=1/tensorboard"]
    losses = {run: [e.value for e in logs.Scalars(run, "eval/loss")] for run in logs.Runs()}
    assert losses["seed=0/tensorboard"] != losses["seed=1/tensorboard"]
    for seed in (0, 1):
        rows, runs = _wandb_history(out / f"seed={seed}")
        assert [r["_step"] for r in rows] == [0, 10, 20]
        assert [r.run_group for r in runs] == ["family"] and runs[0].display_name == f"seed={seed}"
