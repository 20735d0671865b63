"""`mechlrmc import`: the reference implementation's files (docs/FINDINGS.md, S2) become a run.

The files are written here exactly as the reference writes them: a `BertModel` (no token-type
weights, 512 position rows) under `_backbone.` plus `read_out`, trained with Adam, saved with
`torch.save({"epoch", "model", "optim", "train_loss", "eval_loss", "vocab_size"})` when the
epoch's step is done, under names like `3x3_p03_r1_l2_h2_grok5.tar` (step 6)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mechlrmc.cli import main
from mechlrmc.config import preset
from mechlrmc.runs import Run
from mechlrmc.tasks.lrmc import sample, split_losses
from mechlrmc.train import DATA_SEED_OFFSET

transformers = pytest.importorskip("transformers")
CFG = preset("tiny")


class NoTokenType(nn.Module):
    """The reference's BERT has no token-type weights: every token adds zeros."""

    def __init__(self, d_model: int):
        super().__init__()
        self.d_model = d_model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*ids.shape, self.d_model)


class Reference(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        m = cfg.model
        self._backbone = transformers.BertModel(transformers.BertConfig(  # 512 positions by default
            vocab_size=cfg.data.vocab_size, hidden_size=m.d_model, num_hidden_layers=m.n_layers,
            num_attention_heads=m.n_heads, intermediate_size=m.d_mlp, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, layer_norm_eps=m.ln_eps, attn_implementation="eager"))
        self._backbone.embeddings.token_type_embeddings = NoTokenType(m.d_model)
        self.read_out = nn.Linear(m.d_model, 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # [batch, pos]
        return self.read_out(self._backbone(input_ids=tokens).last_hidden_state).squeeze(-1)


def _step(model, optimizer, batch) -> float:
    loss = split_losses(model(batch.tokens), batch.values, batch.observed)["loss"]
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


@pytest.fixture(scope="module")
def reference_files(tmp_path_factory):
    """Files after steps 3 and 6, and the reference model and optimizer at step 6."""
    folder = tmp_path_factory.mktemp("reference")
    torch.manual_seed(0)
    model = Reference(CFG)
    optimizer = torch.optim.Adam(model.parameters(), lr=CFG.train.lr)
    generator = torch.Generator().manual_seed(7)
    files, models = [], {}
    for epoch in range(6):
        loss = _step(model, optimizer, sample(CFG.data, 32, generator))
        if (epoch + 1) % 3 == 0:
            path = folder / f"3x3_p03_r1_l2_h2_grok{epoch}.tar"
            torch.save({"epoch": epoch, "model": model.state_dict(), "optim": optimizer.state_dict(),
                        "train_loss": loss, "eval_loss": 2 * loss, "vocab_size": CFG.data.vocab_size}, path)
            files.append(path)
            models[epoch + 1] = copy.deepcopy(model).eval()
    assert not any("token_type" in k for k in model.state_dict())
    assert model.state_dict()["_backbone.embeddings.position_embeddings.weight"].shape[0] == 512
    return files, models, model, optimizer


def test_import_gives_the_reference_outputs_and_losses(reference_files, tmp_path, capsys):
    files, models, _, _ = reference_files
    out = tmp_path / "imported"
    assert main(["import", *map(str, files), "--out", str(out), "--preset", "tiny"]) == 0
    run = Run(out)
    assert run.steps == [3, 6] and run.config.model.n_ctx == 512
    tokens = sample(CFG.data, 64, torch.Generator().manual_seed(1)).tokens
    for step in run.steps:
        with torch.no_grad():
            expected = models[step](tokens)
            torch.testing.assert_close(run.load_model(step)(tokens), expected, atol=1e-5, rtol=0)
        assert expected.abs().mean() > 0.01
    saved = [torch.load(f, weights_only=True) for f in files]
    assert run.metrics.loss.tolist() == [s["train_loss"] for s in saved]
    assert run.metrics.eval_loss.tolist() == [s["eval_loss"] for s in saved]
    assert "continues from the last one" in capsys.readouterr().out


def test_resume_continues_with_the_reference_adam_state(reference_files, tmp_path):
    files, _, model, optimizer = reference_files
    out = tmp_path / "imported"
    assert main(["import", *map(str, files), "--out", str(out), "--preset", "tiny"]) == 0
    assert main(["train", "--resume", "--out", str(out), "--steps", "9", "--quiet"]) == 0
    # the reference continued on the same three batches (those of the run's data stream)
    generator = torch.Generator().manual_seed(CFG.train.seed + DATA_SEED_OFFSET)
    batches = [sample(CFG.data, CFG.train.batch_size, generator) for _ in range(3)]
    continued, fresh = copy.deepcopy(model), copy.deepcopy(model)
    adam = torch.optim.Adam(continued.parameters(), lr=CFG.train.lr)
    adam.load_state_dict(optimizer.state_dict())
    fresh_adam = torch.optim.Adam(fresh.parameters(), lr=CFG.train.lr)  # what a lost Adam state gives
    for batch in batches:
        _step(continued, adam, batch)
        _step(fresh, fresh_adam, batch)
    tokens = sample(CFG.data, 64, torch.Generator().manual_seed(1)).tokens
    with torch.no_grad():
        ours = Run(out).load_model(9)(tokens)
        with_state = (ours - continued.eval()(tokens)).abs().max().item()
        without_state = (ours - fresh.eval()(tokens)).abs().max().item()
    print(f"max |output diff| with the imported Adam state {with_state:.2e}, with a fresh one {without_state:.2e}")
    assert with_state < 1e-5 < without_state / 10, (with_state, without_state)


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling this would create the marker file
        return open, (str(self.marker), "w")


def test_a_file_that_runs_code_is_refused_and_its_code_never_runs(reference_files, tmp_path, capsys):
    marker = tmp_path / "payload_ran"
    evil = tmp_path / "7x7_p03_r2_l4_h8_grok3999.tar"
    torch.save({"epoch": 3999, "model": {"x": Payload(marker)}, "optim": {}}, evil)
    assert not marker.exists()
    out = tmp_path / "imported"
    assert main(["import", str(reference_files[0][0]), str(evil), "--out", str(out), "--preset", "tiny"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "arbitrary code" in err and str(evil) in err
    assert not marker.exists() and not out.exists()


def test_files_that_do_not_fit_the_config_are_one_line(reference_files, tmp_path, capsys):
    files = reference_files[0]
    out = tmp_path / "imported"
    assert main(["import", str(files[0]), "--out", str(out), "--preset", "tiny", "--set", "model.d_model=32"]) == 2
    assert "model.d_model is 32 in the config, 16 in the file" in capsys.readouterr().err
    assert main(["import", str(files[0]), "--out", str(out), "--preset", "tiny", "--set", "data.value_max=5"]) == 2
    err = capsys.readouterr().err
    assert "vocabulary" in err and "is 1002 in the config, 2002 in the file" in err
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(files[0].read_bytes()[:2000])
    assert main(["import", str(truncated), "--out", str(out), "--preset", "tiny"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(truncated) in err
    assert not out.exists()
