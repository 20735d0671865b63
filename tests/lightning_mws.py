"""A LightningModule around the worked example's minGPT (tests/test_record.py): the model factory
`tests/lightning_mws.py:LitMWS` of the recorded Lightning run."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import lightning
import torch

_spec = importlib.util.spec_from_file_location(
    "mingpt_mws_example", Path(__file__).resolve().parents[1] / "docs" / "examples" / "mingpt_mws.py")
example = sys.modules.get(_spec.name) or importlib.util.module_from_spec(_spec)
if _spec.name not in sys.modules:
    sys.modules[_spec.name] = example
    _spec.loader.exec_module(example)


def with_dropout(gpt: torch.nn.Module, p: float) -> torch.nn.Module:
    """The minGPT with dropout on its embeddings (a module without weights: the same state dict), so
    that its training forward draws from torch's global RNG."""
    gpt.drop = torch.nn.Dropout(p)
    gpt.tok.register_forward_hook(lambda module, inputs, output: gpt.drop(output))
    return gpt


class LitMWS(lightning.LightningModule):
    def __init__(self, length: int = 6, max_value: int = 6, d_model: int = 16, dropout: float = 0.0):
        super().__init__()
        self.gpt = example.build(length=length, max_value=max_value, d_model=d_model)
        if dropout:
            with_dropout(self.gpt, dropout)
        self.losses: list[float] = []

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.gpt(tokens)

    def training_step(self, batch, batch_idx):
        seq = batch[0]
        loss = torch.nn.functional.cross_entropy(self(seq[:, :-1]).transpose(1, 2), seq[:, 1:])
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)
