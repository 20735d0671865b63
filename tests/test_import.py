"""`mechlrmc import SRC DEST`: a `transformers.Trainer` output folder and a folder of Lightning
checkpoints, each trained here for a few steps, become run directories with exactly the files'
weights and the frameworks' logged losses at their steps; SRC is left byte for byte as it was."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from mechlrmc.cli import main
from mechlrmc.importer import import_run
from mechlrmc.runs import Run

VOCAB = 20


class TinyLM(nn.Module):
    """The plain module a LightningModule holds as `self.model`: embedding and read-out."""

    def __init__(self, vocab: int, d_model: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # [batch, pos] -> [batch, pos, vocab]
        return self.head(self.embed(tokens))


def tiny_lm(vocab: int = VOCAB, d_model: int = 8) -> TinyLM:
    """The model factory the Lightning import names (`--factory tests/test_import.py:tiny_lm`)."""
    return TinyLM(vocab, d_model)


FACTORY = f"{Path(__file__).resolve()}:tiny_lm"


def hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def tokens(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, 8), generator=torch.Generator().manual_seed(seed))


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("mechlrmc: error:") and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def trainer_out(tmp_path_factory) -> Path:
    """7 steps of a tiny GPT-2 under a real Trainer: checkpoint-2/4/6, evaluations at 2, 4, 6 and 7, and
    the final weights and state saved in the folder itself (step 7)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=VOCAB,
                                                                 n_positions=40, bos_token_id=0, eos_token_id=0))
    train = [{"input_ids": t, "labels": t} for t in tokens(64, 1)]
    evaluation = [{"input_ids": t, "labels": t} for t in tokens(8, 2)]
    out = tmp_path_factory.mktemp("hf") / "out"
    args = transformers.TrainingArguments(str(out), max_steps=7, per_device_train_batch_size=4, save_steps=2,
                                          logging_steps=1, eval_strategy="steps", eval_steps=2, report_to=[],
                                          use_cpu=True, disable_tqdm=True, seed=0)
    trainer = transformers.Trainer(model, args, train_dataset=train, eval_dataset=evaluation)
    trainer.train()
    trainer.save_model()
    trainer.save_state()
    return out


def test_a_trainer_folder_becomes_a_run_with_its_weights_and_losses(trainer_out, tmp_path, capsys):
    before = hashes(trainer_out)
    run = import_run(trainer_out, tmp_path / "run", progress=False)
    assert hashes(trainer_out) == before  # nothing in SRC was written
    assert run.steps == [2, 4, 6, 7]
    assert run.config.record.model_factory == "mechlrmc.integrations.hf:from_config"
    assert run.config.record.factory_kwargs["architecture"] == "GPT2LMHeadModel"
    for step in run.steps:
        folder = trainer_out / f"checkpoint-{step}" if step < 7 else trainer_out
        saved = load_file(folder / "model.safetensors")
        loaded = Run(run.path).load_model(step).state_dict()
        assert all(torch.equal(loaded[name], tensor) for name, tensor in saved.items())
        assert torch.equal(loaded["lm_head.weight"], saved["transformer.wte.weight"])  # tied, so left out of the file
    metrics = run.metrics.set_index("step")
    history = json.loads((trainer_out / "trainer_state.json").read_text())["log_history"]
    for column in ("loss", "eval_loss", "grad_norm"):
        logged = {row["step"]: row[column] for row in history if column in row}
        assert metrics[column].dropna().to_dict() == logged
    assert run.evals.step.tolist() == [2, 4, 6, 7]  # every eval_steps, and at the end

    assert main(["import", str(trainer_out), str(tmp_path / "run")]) == 2  # DEST exists
    assert "exists: allowed a new or empty directory" in one_error_line(capsys)


def test_a_task_evaluates_every_checkpoint_and_keeps_the_trainers_loss_apart(trainer_out, tmp_path):
    run = import_run(trainer_out, tmp_path / "mws", task="mws", sites={"final": "transformer.ln_f"}, progress=False)
    assert run.config.data.task == "mws" and run.sites.final == "transformer.ln_f"
    evals = run.evals.set_index("step")
    assert evals.index.tolist() == run.steps and evals.eval_loss.notna().all()
    history = json.loads((trainer_out / "trainer_state.json").read_text())["log_history"]
    assert evals.trainer_eval_loss.dropna().to_dict() == {r["step"]: r["eval_loss"] for r in history if "eval_loss" in r}
    assert run.config.record.model["layers"] == 2 and run.config.record.model["width"] == 32


def test_bad_sources_are_one_line(tmp_path, capsys):
    assert main(["import", str(tmp_path / "missing"), str(tmp_path / "run")]) == 2
    assert "is not a folder" in one_error_line(capsys)
    (tmp_path / "empty").mkdir()
    assert main(["import", str(tmp_path / "empty"), str(tmp_path / "run")]) == 2
    assert "no Lightning checkpoints" in one_error_line(capsys)
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def lightning_out(tmp_path_factory) -> tuple[Path, torch.Tensor]:
    """4 steps of a LightningModule holding `tiny_lm()` as `self.model`: checkpoints at 2 and 4,
    validation at 2 and 4, CSVLogger; the folder and the validation tokens."""
    lightning = pytest.importorskip("lightning")
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    class Lit(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = tiny_lm()

        def loss(self, batch):
            seq = batch[0]
            return nn.functional.cross_entropy(self.model(seq).transpose(1, 2), seq)

        def training_step(self, batch, batch_idx):
            loss = self.loss(batch)
            self.log("train_loss", loss)
            return loss

        def validation_step(self, batch, batch_idx):
            self.log("val_loss", self.loss(batch))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.5)

    torch.manual_seed(0)
    out, val = tmp_path_factory.mktemp("pl"), tokens(8, 2)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(tokens(64, 1)), batch_size=8)
    val_loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(val), batch_size=8)
    trainer = lightning.Trainer(max_steps=4, val_check_interval=2, log_every_n_steps=1, accelerator="cpu",
                                default_root_dir=out, logger=CSVLogger(out), enable_progress_bar=False,
                                enable_model_summary=False,
                                callbacks=[ModelCheckpoint(out / "ckpt", every_n_train_steps=2, save_top_k=-1)])
    trainer.fit(Lit(), loader, val_loader)
    return out, val


def test_lightning_checkpoints_become_a_run_with_their_weights_and_losses(lightning_out, tmp_path, capsys):
    out, val = lightning_out
    before = hashes(out)
    assert main(["import", str(out), str(tmp_path / "run"), "--factory", FACTORY, "--quiet"]) == 0
    assert "eval_loss at 2 steps" in capsys.readouterr().out
    assert hashes(out) == before
    run = Run(tmp_path / "run")
    assert run.steps == [2, 4] and run.config.record.source == "lightning"
    metrics = run.metrics.set_index("step")
    for step in run.steps:
        saved = torch.load(out / "ckpt" / f"epoch=0-step={step}.ckpt", weights_only=True)["state_dict"]
        model = run.load_model(step)
        assert {f"model.{k}": v for k, v in model.state_dict().items()}.keys() == saved.keys()
        assert all(torch.equal(model.state_dict()[k.removeprefix("model.")], v) for k, v in saved.items())
        with torch.no_grad():  # Lightning files a row under the steps before its update: step k + 1 here
            val_loss = nn.functional.cross_entropy(model(val).transpose(1, 2), val).item()
        assert metrics.loc[step, "eval_loss"] == pytest.approx(val_loss, rel=1e-6)
    assert metrics.loss.notna().sum() == 4 and metrics.loss.index[metrics.loss.notna()].tolist() == [1, 2, 3, 4]


def test_a_lightning_factory_that_does_not_fit_is_one_line(lightning_out, tmp_path, capsys):
    out, _ = lightning_out
    dest = tmp_path / "run"
    assert main(["import", str(out), str(dest), "--factory", FACTORY, "--factory-kwargs", '{"d_model": 4}']) == 2
    assert "does not fit the model TinyLM" in one_error_line(capsys)
    assert main(["import", str(out), str(dest)]) == 2
    assert "need --factory" in one_error_line(capsys)
    assert main(["import", str(out), str(dest), "--factory", FACTORY, "--prefix", "net"]) == 2
    assert "allowed one of ['model.']" in one_error_line(capsys)
    assert not dest.exists() and not list(tmp_path.iterdir())  # no temporary sibling left either


def test_lightning_checkpoints_without_a_log_are_a_run_without_losses(lightning_out, tmp_path, capsys):
    out, _ = lightning_out
    only = tmp_path / "ckpt"
    only.mkdir()
    for file in (out / "ckpt").iterdir():
        (only / file.name).write_bytes(file.read_bytes())
    assert main(["import", str(only), str(tmp_path / "run"), "--factory", FACTORY, "--quiet"]) == 0
    assert "no losses found" in capsys.readouterr().out
    assert Run(tmp_path / "run").steps == [2, 4] and Run(tmp_path / "run").metrics.empty
