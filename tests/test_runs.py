import shutil

import pytest
import torch

from mechlrmc.runs import CheckpointError, Run


@pytest.fixture
def run_copy(tiny_run, tmp_path):
    return Run(shutil.copytree(tiny_run.path, tmp_path / "copy"))


def test_run_reads_back_what_was_trained(tiny_run):
    assert tiny_run.steps == [0, 10, 20, 40]
    metrics = tiny_run.metrics
    assert list(metrics.columns[:4]) == ["step", "loss", "loss_obs", "loss_mask"]
    assert metrics.step.is_monotonic_increasing and metrics.step.iloc[-1] == 40
    assert tiny_run.evals.step.tolist() == [0, 10, 20, 30, 40]
    model = tiny_run.load_model(40)
    assert not model.training
    resume_weights = {k[6:]: v for k, v in tiny_run.load_resume_state()[0].items() if k.startswith("model.")}
    for name, p in model.state_dict().items():
        assert torch.equal(p, resume_weights[name])
    assert tiny_run.nearest_step(33) == 40 and tiny_run.nearest_step(15) == 10


def test_tampered_checkpoint_is_an_error(run_copy):
    file = run_copy.checkpoint_path(20)
    data = bytearray(file.read_bytes())
    data[-5] ^= 0x01
    file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        run_copy.load_model(20)
    run_copy.load_model(10)  # the others still load


def test_truncated_and_missing_checkpoints_are_errors(run_copy):
    file = run_copy.checkpoint_path(10)
    file.write_bytes(file.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated"):
        run_copy.load_model(10)
    run_copy.checkpoint_path(20).unlink()
    with pytest.raises(CheckpointError, match="missing"):
        run_copy.load_model(20)
    with pytest.raises(CheckpointError, match=r"no checkpoint at step 30: available \[0, 10, 20, 40\]"):
        run_copy.load_model(30)
    with pytest.raises(CheckpointError, match="no config.yaml"):
        Run(run_copy.path / "checkpoints")


def test_existing_run_is_not_overwritten(tiny_run):
    from mechlrmc.config import preset
    from mechlrmc.train import train

    with pytest.raises(FileExistsError, match="--resume"):
        train(preset("tiny"), tiny_run.path, progress=False)


def test_resume_with_a_different_config_is_refused(run_copy):
    from mechlrmc.config import preset
    from mechlrmc.train import train

    with pytest.raises(ValueError, match="train.lr"):  # a ConfigError
        train(preset("tiny").override(["train.lr=0.5"]), run_copy.path, resume=True, progress=False)


def test_shipped_run_is_the_cpu_preset_and_drops(reference_run):
    """The shipped run is a trial of the seed family: the cpu preset (device pinned to the CPU it
    was trained on), the family's median seed, trained to the preset's last step."""
    from mechlrmc.config import preset

    assert reference_run.config == preset("cpu").override(["train.device=cpu"])
    assert reference_run.steps[-1] == preset("cpu").train.steps
    evals = reference_run.evals.set_index("step")
    r9 = reference_run.config.data.plateau_mask_loss
    assert abs(evals.eval_loss_mask[2000] / r9 - 1) < 0.1 and evals.eval_loss_obs[2000] < 0.01 * r9
    assert evals.eval_loss_mask.iloc[-1] < 0.5 * r9
    size = sum(p.stat().st_size for p in reference_run.path.rglob("*") if p.is_file())
    assert size < 30 * 2**20
