"""Every bad input is one line naming the bad value and what is allowed, exit code 2, no traceback;
a `train` rejected this way leaves no run directory. `--debug` / MECHLRMC_DEBUG=1 show the traceback."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import itertools
import shutil
import tempfile
from pathlib import Path
from typing import ClassVar

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mechlrmc.cli import main
from mechlrmc.config import preset
from mechlrmc.runs import CheckpointError, Run
from mechlrmc.tasks import get_task, register

POSITIVE_INTS = ["data.m", "data.n", "model.d_model", "model.n_layers", "model.n_heads", "model.d_mlp",
                 "train.steps", "train.batch_size", "train.log_every", "train.eval_every",
                 "train.eval_batch_size", "train.checkpoint_every", "train.checkpoint_every_early"]
NON_NEGATIVE_INTS = ["model.n_ctx", "train.threads", "train.checkpoint_early_until", "train.attn_intervention_start"]
POSITIVE_FLOATS = ["train.lr", "data.value_max", "data.precision", "model.init_range", "model.ln_eps",
                   "train.attn_intervention_scale"]
CHOICES = ["data.distribution", "model.norm", "model.attention", "model.act_fn", "model.init", "train.device",
           "train.dtype"]
BOOLS = ["train.compile", "model.mask_embedding_zero", "model.causal", "model.readout_bias"]
FIELDS = POSITIVE_INTS + NON_NEGATIVE_INTS + POSITIVE_FLOATS + CHOICES + BOOLS + ["data.rank", "data.p_mask", "train.seed"]
YAML_WORDS = {"y", "n", "yes", "no", "on", "off", "true", "false", "null", "nan", "inf", "infinity"}
words = st.from_regex(r"[a-z][a-z_]{0,9}", fullmatch=True).filter(lambda w: w not in YAML_WORDS)
counter = itertools.count()


def _invalid_value(field: str) -> st.SearchStrategy:
    """YAML text that is invalid for `field` (tiny preset: m = n = 3)."""
    wrong_type = words | st.just("[1, 2]") | st.just("{a: 1}") | st.just("")
    if field in POSITIVE_INTS:
        return st.integers(max_value=0).map(str) | wrong_type | st.floats(0.5, 9.5).map(repr)
    if field in NON_NEGATIVE_INTS:
        extra = st.integers(1, 8).map(str) if field == "model.n_ctx" else st.nothing()  # < m*n = 9
        return st.integers(max_value=-1).map(str) | wrong_type | extra
    if field in POSITIVE_FLOATS:
        return (st.floats(max_value=0.0, allow_nan=False).map(repr) | st.sampled_from([".nan", ".inf", "nan", "inf"])
                | words | st.just("[1, 2]") | st.just(""))
    if field in CHOICES:
        return words.filter(lambda w: w not in {"uniform", "gaussian", "laplace", "post", "pre", "auto", "cpu",
                                                "cuda", "float32", "bfloat16", "softmax", "linear", "gelu",
                                                "gelu_tanh", "bert", "gpt"}) | st.integers().map(str)
    if field in BOOLS:
        return st.integers().map(str) | words | st.just("[true]")
    if field == "data.rank":
        return st.integers(min_value=4).map(str) | st.integers(max_value=0).map(str) | wrong_type
    if field == "data.p_mask":
        return (st.floats(min_value=1.0, allow_nan=False, allow_infinity=False).map(repr)
                | st.floats(max_value=-1e-9, allow_nan=False, allow_infinity=False).map(repr) | words)
    if field == "train.seed":
        return st.integers(max_value=-1).map(str) | st.integers(min_value=2**62).map(str) | wrong_type
    raise AssertionError(field)


@st.composite
def bad_inputs(draw) -> tuple[list[str], dict | str | None, str]:
    """(extra argv, YAML config or None, text the error must contain)"""
    kind = draw(st.sampled_from(["set", "set", "set", "unknown_key", "no_equals", "yaml_value", "yaml_key",
                                 "yaml_malformed"]))
    field = draw(st.sampled_from(FIELDS))
    section, name = field.split(".")
    if kind == "set":
        return ["--set", f"{field}={draw(_invalid_value(field))}"], None, field
    if kind == "unknown_key":
        key = f"{draw(st.sampled_from(['data', 'model', 'train', 'optim']))}.{draw(words)}"
        if key in FIELDS or key.split(".")[1] in {"rank", "p_mask", "seed"}:
            key += "_x"
        return ["--set", f"{key}=1"], None, key
    if kind == "no_equals":
        return ["--set", field], None, field
    raw = preset("tiny").to_dict()
    if kind == "yaml_value":
        raw[section][name] = yaml.safe_load(draw(_invalid_value(field)))
        return [], raw, field
    if kind == "yaml_key":
        key = draw(words) + "_unknown"
        raw[section][key] = 1
        return [], raw, f"{section}.{key}"
    return [], draw(st.sampled_from(["data: [1, 2", "train: {steps: 5", "model:\n  - a\n - b", "\t: x"])), "YAML"


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=bad_inputs())
def test_invalid_configs_and_overrides_are_one_line_exit_2_and_create_nothing(case):
    argv, config, named = case
    root = Path(tempfile.mkdtemp(prefix="bad_input_"))
    try:
        out = root / f"run{next(counter)}"
        if config is not None:
            file = root / "config.yaml"
            file.write_text(config if isinstance(config, str) else yaml.safe_dump(config))
            argv = [*argv, "--config", str(file)]
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = main(["train", "--preset", "tiny", "--out", str(out), "--quiet", *argv])
        lines = err.getvalue().strip().splitlines()
        assert rc == 2, (argv, config, err.getvalue())
        assert len(lines) == 1 and lines[0].startswith("mechlrmc: error: "), err.getvalue()
        assert named in lines[0], (named, lines[0])
        assert "allowed" in lines[0] or "expected" in lines[0], lines[0]
        assert not out.exists()
    finally:
        shutil.rmtree(root)


@pytest.fixture
def run_copy(tiny_run, tmp_path):
    return Run(shutil.copytree(tiny_run.path, tmp_path / "copy"))


def _one_line(capsys, argv: list[str], *expected: str) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()  # a progress bar may come before the error
    errors = [line for line in lines if "error" in line or "Traceback" in line]
    assert errors == lines[-1:] and lines[-1].startswith("mechlrmc: error: "), captured.err
    for text in expected:
        assert text in lines[-1], (text, lines[-1])
    return lines[-1]


def test_paths_steps_and_checkpoints_that_are_not_there(run_copy, tmp_path, capsys):
    out = ["-o", str(tmp_path / "analysis")]
    _one_line(capsys, ["info", "/nonexistent"], "/nonexistent does not exist", "allowed a run directory")
    _one_line(capsys, ["analyze", "attention", str(tmp_path), *out], f"{tmp_path} is not a run directory")
    (tmp_path / "empty").mkdir()
    _one_line(capsys, ["report", str(tmp_path / "empty"), "-o", str(tmp_path / "r.html")], "neither a run nor a sweep")
    _one_line(capsys, ["report", "/nonexistent", "-o", str(tmp_path / "r.html")], "/nonexistent")
    assert not (tmp_path / "r.html").exists()
    path = str(run_copy.path)
    _one_line(capsys, ["analyze", "copy", path, "--steps", "500", *out], "step 500", "allowed 0..40")
    _one_line(capsys, ["analyze", "copy", path, "--steps", "ten", *out], "--steps ten", "allowed all")
    _one_line(capsys, ["analyze", "copy", path, "--batch-size", "0", *out], "--batch-size 0", "allowed")
    file = run_copy.checkpoint_path(20)
    data = bytearray(file.read_bytes())
    data[-5] ^= 0x01
    file.write_bytes(bytes(data))
    _one_line(capsys, ["analyze", "copy", path, "--steps", "20", *out], str(file), "SHA-256")
    file = run_copy.checkpoint_path(10)
    file.write_bytes(file.read_bytes()[:1000])
    _one_line(capsys, ["analyze", "copy", path, "--steps", "10", *out], str(file), "truncated")
    _one_line(capsys, ["export", path, "--out", str(tmp_path / "export")], str(file), "truncated")
    assert not (tmp_path / "export").exists()


def test_bad_freeze_train_options_create_nothing(run_copy, tmp_path, capsys):
    base = ["freeze-train", str(run_copy.path), "--out", str(tmp_path / "frozen"), "--steps", "5", "--quiet"]
    _one_line(capsys, [*base, "--components", "attn", "--init", "abc"], "--init abc", "allowed init")
    _one_line(capsys, [*base, "--components", "bogus"], "'bogus'", "allowed")
    _one_line(capsys, [*base, "--components", "attn", "--set", "train.lr=-1"], "train.lr=-1", "allowed")
    assert not (tmp_path / "frozen").exists()


def test_train_out_that_is_a_file_or_a_non_run_directory(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    _one_line(capsys, ["train", "--preset", "tiny", "--out", str(tmp_path / "file"), "--quiet"], "is a file")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("x")
    _one_line(capsys, ["train", "--preset", "tiny", "--out", str(tmp_path / "notes"), "--quiet"], "not empty and not a run")
    assert sorted(p.name for p in (tmp_path / "notes").iterdir()) == ["a.txt"]


def test_resume_of_a_directory_that_does_not_exist_starts_it(tmp_path):
    out = tmp_path / "new"
    assert main(["train", "--preset", "tiny", "--out", str(out), "--resume", "--quiet"]) == 0
    assert Run(out).steps == [0, 10, 20, 40]


def test_debug_shows_the_traceback(monkeypatch):
    with pytest.raises(CheckpointError, match="does not exist"):
        main(["--debug", "info", "/nonexistent"])
    with pytest.raises(CheckpointError, match="does not exist"):
        main(["info", "/nonexistent", "--debug"])
    monkeypatch.setenv("MECHLRMC_DEBUG", "1")
    with pytest.raises(CheckpointError, match="does not exist"):
        main(["info", "/nonexistent"])


class _BidirectionalOnly(type(get_task("lrmc"))):
    """A planted task that declares it needs bidirectional attention."""

    name = "bidirectional_only"
    causal = (False,)
    presets = {}


@dataclasses.dataclass
class _BidirectionalOnlyConfig(get_task("lrmc").config):
    task: ClassVar[str] = "bidirectional_only"


_BidirectionalOnly.config = _BidirectionalOnlyConfig
register(_BidirectionalOnly())


@pytest.mark.parametrize("argv, config, expected", [
    (["--set", "data.task=sorting"], None, ["data.task='sorting' is unknown", "allowed", "mws"]),
    (["--set", "data.window=2"], None, ["'data.window' for data.task='lrmc'", "allowed", "p_mask"]),
    ([], {"data": {"m": 3, "n": 3, "rank": 1, "window": 2}}, ["'data.window'", "data.task='lrmc'", "allowed"]),
    (["--preset", "mws_tiny", "--set", "data.window=7"], None, ["data.window=7", "1 <= window <= data.length=6"]),
    (["--preset", "mws", "--set", "data.modulus=10"], None, ["data.modulus=10", "> data.max_value=16"]),
    (["--set", "model.attention=quadratic"], None, ["model.attention='quadratic'", "allowed one of"]),
    (["--preset", "mws_tiny", "--set", "model.causal=false"], None, ["model.causal=False", "data.task='mws'",
                                                                      "allowed True"]),
    (["--preset", "mws_tiny", "--set", "model.mask_embedding_zero=true"], None, ["model.mask_embedding_zero",
                                                                                  "allowed False"]),
    ([], {"data": {"task": "bidirectional_only", "m": 3, "n": 3, "rank": 1}, "model": {"causal": True}},
     ["model.causal=True", "data.task='bidirectional_only'", "allowed False", "bidirectional"]),
])
def test_bad_task_inputs_are_one_line_exit_2_and_create_nothing(argv, config, expected, tmp_path, capsys):
    if config is not None:
        (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
        argv = [*argv, "--config", str(tmp_path / "config.yaml")]
    if "--preset" not in argv:
        argv = ["--preset", "tiny", *argv]
    _one_line(capsys, ["train", *argv, "--out", str(tmp_path / "run"), "--quiet"], *expected)
    assert not (tmp_path / "run").exists()
