"""Prefix sum mod p, a task of the plateau paper (docs/FINDINGS.md, P0), in the MWS token format.

Output j = (x_1 + ... + x_j) mod p. Optimal attention map: the query predicting output j reads
input j and the previous output (for j >= 2 that is the query's own token, output j-1).
Preset `prefix_sum`: the plateau paper's MWS model and training on this task.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from mechlrmc.config import RunConfig
from mechlrmc.tasks import register
from mechlrmc.tasks.mws import paper_model, paper_train
from mechlrmc.tasks.tokens import SequenceConfig, SequenceTask


@dataclass
class PrefixSumConfig(SequenceConfig):
    task: ClassVar[str] = "prefix_sum"


def _prefix_sum() -> RunConfig:
    return RunConfig(data=PrefixSumConfig(), model=paper_model(), train=paper_train())


class _PrefixSum(SequenceTask):
    name = "prefix_sum"
    config = PrefixSumConfig
    presets = {"prefix_sum": _prefix_sum}

    def outputs(self, cfg: PrefixSumConfig, inputs: torch.Tensor) -> torch.Tensor:
        return inputs.cumsum(1) % cfg.modulus

    def map_keys(self, cfg: PrefixSumConfig, j: int) -> list[int]:
        return [j - 1] if j == 1 else [j - 1, cfg.length + j - 1]


PREFIX_SUM = register(_PrefixSum())
