import torch

from mechlrmc.export import export_run
from mechlrmc.runs import Run
from mechlrmc.tasks.lrmc import eval_batch


def test_float16_export_keeps_outputs_and_can_be_cut(tiny_run, tmp_path):
    full = export_run(tiny_run, tmp_path / "half")
    assert full.steps == tiny_run.steps and full.config == tiny_run.config
    assert full.state_dict(40)["W_E"].dtype == torch.float16
    assert full.load_model(40).W_E.dtype == torch.float32
    assert full.metrics.equals(tiny_run.metrics)
    cut = export_run(tiny_run, tmp_path / "cut", until=20)
    assert cut.steps == [0, 10, 20] and cut.metrics.step.max() == 20 and cut.config.train.steps == 20
    assert not (cut.path / "resume.safetensors").exists()  # the resume state is from step 40
    tokens = eval_batch(tiny_run.config, size=256).tokens  # the batch the export checks its atol on
    with torch.no_grad():
        reloaded, original = Run(cut.path).load_model(20)(tokens), tiny_run.load_model(20)(tokens)
    torch.testing.assert_close(reloaded, original, atol=1e-3, rtol=0)  # export_run's default atol
    strict = export_run(tiny_run, tmp_path / "strict", atol=0.0)  # nothing fits: all stay float32
    assert {strict.state_dict(s)["W_E"].dtype for s in strict.steps} == {torch.float32}
