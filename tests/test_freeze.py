import torch

from analyses.freeze import freeze_info, freeze_sweep, freeze_train
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


def test_freeze_from_a_checkpoint_and_sweep(tiny_run, tmp_path):
    out = freeze_train(tiny_run, "mlp.1", tmp_path / "mlp", init=10, reference=20, steps=5, progress=False)
    assert torch.equal(out.state_dict(0)["blocks.1.mlp.W_in"], tiny_run.state_dict(10)["blocks.1.mlp.W_in"])
    assert torch.equal(out.state_dict(5)["blocks.0.mlp.W_in"], tiny_run.state_dict(20)["blocks.0.mlp.W_in"])
    curves = freeze_sweep(tiny_run, tmp_path / "sweep", sets=["embed", "all"], steps=10, progress=False)
    assert set(curves.components) == {"embed", "all"}
    assert curves.groupby("components").step.max().eq(10).all()
