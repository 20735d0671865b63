"""Every run records what it was made with; `info` prints it; a resume elsewhere warns."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from mechlrmc import provenance
from mechlrmc.cli import main
from mechlrmc.config import preset
from mechlrmc.runs import Run
from mechlrmc.train import Trainer


def test_a_run_records_versions_device_threads_and_determinism(tiny_run, capsys):
    saved = tiny_run.provenance
    assert saved["torch"] == torch.__version__ and saved["transformer_lens"] not in ("", "not installed")
    assert saved["mechlrmc"] not in ("", "not installed") and saved["device"].startswith("cpu: ")
    assert saved["threads"] == tiny_run.config.train.threads == 1
    assert saved["deterministic"] == torch.are_deterministic_algorithms_enabled()
    assert saved["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert saved["cpu_id"] == provenance.cpu_id() and saved["cpu_id"]
    assert main(["info", str(tiny_run.path)]) == 0
    out = capsys.readouterr().out
    assert f"  torch: {torch.__version__}" in out and f"  device: {saved['device']}" in out


def test_resume_on_another_machine_type_warns(tiny_run, tmp_path, capsys):
    run = Run(shutil.copytree(tiny_run.path, tmp_path / "copy"))
    assert main(["train", "--out", str(run.path), "--resume", "--steps", "45", "--quiet"]) == 0
    assert "warning" not in capsys.readouterr().err  # same machine, same software: silent
    saved = json.loads((run.path / "provenance.json").read_text())
    saved["device"], saved["torch"] = "cpu: Another CPU", "1.0"
    saved["cpu_capability"] = "AVX512" if saved["cpu_capability"] != "AVX512" else "AVX2"
    (run.path / "provenance.json").write_text(json.dumps(saved))
    assert main(["train", "--out", str(run.path), "--resume", "--steps", "50", "--quiet"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mechlrmc: warning: ")
    assert "device cpu: Another CPU -> " in err[0] and "torch 1.0 -> " in err[0] and "bitwise" in err[0]
    assert f"cpu_capability {saved['cpu_capability']} -> {torch.backends.cpu.get_cpu_capability()}" in err[0]
    assert json.loads((run.path / "provenance.json").read_text())["device"] == "cpu: Another CPU"  # kept


def test_runs_made_before_provenance_load_print_and_resume(reference_run, tmp_path, capsys):
    assert reference_run.provenance is None  # the shipped run predates provenance
    assert main(["info", str(reference_run.path)]) == 0
    assert "provenance: not recorded" in capsys.readouterr().out
    copy = shutil.copytree(reference_run.path, tmp_path / "cpu")
    steps = reference_run.config.train.steps + 5
    assert main(["train", "--out", str(copy), "--resume", "--steps", str(steps), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "no provenance.json to compare with" in err and len(err.strip().splitlines()) == 1
    assert Run(copy).steps[-1] == steps


def test_differences_name_the_changed_fields():
    a = provenance.collect()
    assert provenance.differences(a, dict(a)) == {}
    assert provenance.differences(a, {**a, "threads": a["threads"] + 1, "platform": "x"}) == {
        "threads": (a["threads"], a["threads"] + 1)}


# the two shipped families' machines (analyses/families/*/provenance.json) and a third AVX2 CPU model
AVX2_FAMILY = {"torch": "2.13.0+cpu", "transformer_lens": "4.3.0", "python": "3.11.7", "device": "cpu: AMD EPYC",
               "cpu_id": "AuthenticAMD family 25 model 17 stepping 1", "cpu_capability": "AVX2"}
AVX512_FAMILY = {"reconstructed": "from benchmarks/RESULTS.md", "torch": "2.13.0+cpu", "device": "cpu: AMD EPYC",
                 "cpu_capability": "AVX512"}
AVX2_OTHER_MODEL = {**AVX2_FAMILY, "cpu_id": "AuthenticAMD family 25 model 1 stepping 1"}


def test_machine_match_ranks_isa_then_software_then_cpu_id():
    match = provenance.machine_match
    assert match(AVX2_FAMILY, dict(AVX2_FAMILY)) == "identical"
    assert match(AVX2_FAMILY, AVX2_OTHER_MODEL) == "same ISA and software"
    assert match(AVX2_FAMILY, {k: v for k, v in AVX2_FAMILY.items() if k != "cpu_id"}) == "same ISA and software"
    assert match(AVX2_FAMILY, {**AVX2_OTHER_MODEL, "torch": "2.12.0+cpu"}) == "same ISA"
    assert match(AVX512_FAMILY, {**AVX2_FAMILY, "cpu_capability": "AVX512"}) == "same ISA"  # python unrecorded
    assert match(AVX512_FAMILY, AVX2_OTHER_MODEL) == "different ISA"
    assert match(AVX2_FAMILY, {**AVX2_FAMILY, "cpu_capability": "AVX512"}) == "different ISA"
    assert match(None, AVX2_FAMILY) == match(AVX2_FAMILY, None) == "unknown"
    assert match({k: v for k, v in AVX2_FAMILY.items() if k != "cpu_capability"}, AVX2_FAMILY) == "unknown"
    for a, b in ((AVX2_FAMILY, AVX2_OTHER_MODEL), (AVX512_FAMILY, AVX2_FAMILY), (None, AVX2_FAMILY)):
        assert match(a, b) == match(b, a) and match(a, b) in provenance.MATCH_LEVELS


def test_match_sentence_says_whether_a_seeds_numbers_carry_over():
    sentence = provenance.match_sentence
    assert "each seed's numbers apply as they are" in sentence(AVX2_FAMILY, AVX2_FAMILY)
    same_isa = sentence(AVX2_FAMILY, AVX2_OTHER_MODEL)
    assert "model 17" in same_isa and "model 1 stepping" in same_isa and "expected to give the same numbers" in same_isa
    assert "but torch differs or is not recorded" in sentence(AVX2_FAMILY, {**AVX2_FAMILY, "torch": "2.12.0+cpu"})
    assert "another vector ISA" in sentence(AVX512_FAMILY, AVX2_FAMILY)
    assert "an unrecorded machine" in sentence(AVX2_FAMILY, None) and "unknown" in sentence(AVX2_FAMILY, None)
    for a, b in ((AVX2_FAMILY, AVX2_FAMILY), (AVX512_FAMILY, AVX2_FAMILY), (None, None)):
        assert sentence(a, b).count(". ") == 0 and sentence(a, b).endswith(".")  # one sentence


def test_train_threads_hold_for_the_run_and_the_caller_gets_its_own_back(tmp_path):
    cfg = preset("tiny").override({"train.steps": 2, "train.threads": 2})
    caller = torch.get_num_threads()
    assert caller != 2  # conftest runs the tests on one thread
    seen = []
    trainer = Trainer(cfg, tmp_path / "ok", progress=False)
    trainer.add_callback("on_step_end", lambda t: seen.append(torch.get_num_threads()))
    trainer.train()
    assert seen == [2, 2] and Run(tmp_path / "ok").provenance["threads"] == 2
    assert torch.get_num_threads() == caller

    def fail(trainer):
        raise RuntimeError("planted")

    trainer = Trainer(cfg, tmp_path / "failed", progress=False)
    trainer.add_callback("on_step_end", fail)
    with pytest.raises(RuntimeError, match="planted"):
        trainer.train()
    assert torch.get_num_threads() == caller  # a failed run gives them back too
