"""Moving-window sum (MWS), the plateau paper's main task (docs/FINDINGS.md, P0).

Output j = (x_{j-k+1} + ... + x_j) mod p, the sum of the last `window` = k inputs (fewer at the
start: output 1 = x_1). The paper's setting: 16 inputs uniform in 1..16, separator 17, k = 2,
p = 17, vocabulary 0..17, 33 tokens. Optimal attention map: the query predicting output j (at the
separator's position + j - 1) attends to inputs j-k+1..j (row 0 -> input 1; row i -> inputs i and
i+1 for k = 2).

Presets: `mws`, the paper's configuration (a 1-layer, 1-head linear-attention GPT, 400 steps: a
plateau at ~12% output accuracy with repeated outputs, then a drop to ~100%), and `mws_tiny`, a
seconds-long run for tests (it does not leave the plateau).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from mechlrmc.config import ModelConfig, RunConfig, TrainConfig
from mechlrmc.tasks import register
from mechlrmc.tasks.tokens import SequenceConfig, SequenceTask
from mechlrmc.validation import require


@dataclass
class MWSConfig(SequenceConfig):
    task: ClassVar[str] = "mws"

    window: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        require(1 <= self.window <= self.length, "data.window", self.window,
                f"1 <= window <= data.length={self.length}")


def paper_model(**changes) -> ModelConfig:
    """The plateau paper's model: a pre-LN GPT with linear causal attention (docs/FINDINGS.md, P0)."""
    values = dict(d_model=256, n_layers=1, n_heads=1, d_mlp=1024, norm="pre", causal=True,
                  attention="linear", init="gpt", act_fn="gelu_tanh", readout_bias=False,
                  mask_embedding_zero=False, ln_eps=1e-5, init_range=0.02)
    return ModelConfig(**{**values, **changes})


def paper_train(**changes) -> TrainConfig:
    """Adam at 1e-4, batch 256, 400 steps, one thread; evaluated every 5 steps on 256 fresh-seeded
    sequences; checkpoints every 10 steps to 200, then every 25 (a plateau of a few dozen steps is
    resolved)."""
    values = dict(steps=400, batch_size=256, lr=1e-4, seed=0, log_every=5, eval_every=5, eval_batch_size=256,
                  checkpoint_every=25, checkpoint_every_early=10, checkpoint_early_until=200, threads=1)
    return TrainConfig(**{**values, **changes})


def _mws() -> RunConfig:
    return RunConfig(data=MWSConfig(), model=paper_model(), train=paper_train())


def _mws_tiny() -> RunConfig:
    return RunConfig(
        data=MWSConfig(length=6, max_value=6, modulus=7),
        model=paper_model(d_model=32, d_mlp=128),
        train=paper_train(steps=30, batch_size=32, lr=1e-3, eval_every=10, eval_batch_size=64,
                          checkpoint_every=10, checkpoint_early_until=0),
    )


class _MWS(SequenceTask):
    name = "mws"
    config = MWSConfig
    presets = {"mws": _mws, "mws_tiny": _mws_tiny}

    def outputs(self, cfg: MWSConfig, inputs: torch.Tensor) -> torch.Tensor:
        sums = torch.nn.functional.pad(inputs.cumsum(1), (1, 0))  # [batch, L+1], sums[:, j] = x_1 + ... + x_j
        j = torch.arange(1, cfg.length + 1)
        return (sums[:, j] - sums[:, (j - cfg.window).clamp_min(0)]) % cfg.modulus

    def map_keys(self, cfg: MWSConfig, j: int) -> list[int]:
        return list(range(max(0, j - cfg.window), j))


MWS = register(_MWS())
