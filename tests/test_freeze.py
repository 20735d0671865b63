import pytest
import torch

from analyses.weights.freeze import freeze_info, freeze_sweep, freeze_train
from mechlrmc.runs import Run


def test_freeze_train_changes_only_the_trained_component(tiny_run, tmp_path):
    out = freeze_train(tiny_run, "pos_embed", tmp_path / "pos", steps=10, progress=False)
    assert isinstance(out, Run) and out.steps[0] == 0 and out.steps[-1] == 10
    reference, init = tiny_run.state_dict(tiny_run.steps[-1]), tiny_run.state_dict(0)
    start, end = out.state_dict(0), out.state_dict(10)
    for name, value in end.items():
        if name == "W_pos":
            assert torch.equal(start[name], init[name])  # reset to its initial value
            assert not torch.equal(value, start[name])  # and trained
        else:
            assert torch.equal(value, reference[name]), name  # frozen: bitwise the reference
    assert freeze_info(out)["trainable"] == ["W_pos"]


@pytest.mark.ray
def test_freeze_from_a_checkpoint_and_sweep(tiny_run, tmp_path):
    out = freeze_train(tiny_run, "mlp.1", tmp_path / "mlp", init=10, reference=20, steps=5, progress=False)
    assert torch.equal(out.state_dict(0)["blocks.1.mlp.W_in"], tiny_run.state_dict(10)["blocks.1.mlp.W_in"])
    assert torch.equal(out.state_dict(5)["blocks.0.mlp.W_in"], tiny_run.state_dict(20)["blocks.0.mlp.W_in"])
    curves = freeze_sweep(tiny_run, tmp_path / "sweep", sets=["embed", "all"], steps=10, progress=False)
    assert set(curves.components) == {"embed", "all"}
    assert curves.groupby("components").step.max().eq(10).all()


def test_freeze_run_resumes_exactly(tiny_run, tmp_path):
    """A component-wise run stopped at its step-10 checkpoint and resumed to 20 equals an
    uninterrupted 20-step run: frozen parameters carry no Adam state and stay the reference."""
    import pandas as pd

    from analyses.weights.freeze import freeze_trainer

    source = str(tiny_run.path)
    whole = freeze_train(tiny_run, "attn", tmp_path / "whole", steps=20, progress=False)
    first = tiny_run.config.override(["train.steps=10"])
    freeze_trainer(first, tmp_path / "parts", False, source=source, components="attn").train()
    resumed = freeze_trainer(whole.config, tmp_path / "parts", True, source=source, components="attn").train()
    pd.testing.assert_frame_equal(whole.metrics.drop(columns="wall_time"), resumed.metrics.drop(columns="wall_time"))
    a, b = whole.state_dict(20), resumed.state_dict(20)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(freeze_info(resumed)["trainable"]) == sorted(freeze_info(whole)["trainable"])


def test_trainer_with_trainable_names_freezes_the_rest_and_refuses_unknown_names(tiny_run, tmp_path):
    """Component-wise training is an ordinary `Trainer`: handed a model and the names of its trainable
    parameters; an unknown or empty set is one error raised before anything is written."""
    import pytest

    from mechlrmc.errors import OptionError
    from mechlrmc.train import Trainer

    cfg = tiny_run.config.override(["train.steps=5"])
    for bad in (["W_pos", "nope"], []):
        with pytest.raises(OptionError, match="are not in the model: allowed"):
            Trainer(cfg, tmp_path / "bad", trainable=bad, progress=False)
        assert not (tmp_path / "bad").exists()
    model = tiny_run.load_model(tiny_run.steps[-1]).train()
    trainer = Trainer(cfg, tmp_path / "pos", model=model, trainable=["W_pos"], progress=False)
    assert trainer.model is model and [p for g in trainer.optimizer.param_groups for p in g["params"]] == [model.W_pos]
    out = trainer.train()
    before, after = tiny_run.state_dict(tiny_run.steps[-1]), out.state_dict(5)
    assert torch.equal(out.state_dict(0)["W_pos"], before["W_pos"]) and not torch.equal(after["W_pos"], before["W_pos"])
    assert all(torch.equal(after[k], before[k]) for k in after if k != "W_pos")
