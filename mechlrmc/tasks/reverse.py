"""Reverse, a task of the plateau paper (docs/FINDINGS.md, P0), in the MWS token format.

Output j = x_{L+1-j}: the inputs backwards. Optimal attention map: the query predicting output j
attends to input L+1-j. Preset `reverse`: the plateau paper's MWS model and training on this task.
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
class ReverseConfig(SequenceConfig):
    task: ClassVar[str] = "reverse"


def _reverse() -> RunConfig:
    return RunConfig(data=ReverseConfig(), model=paper_model(), train=paper_train())


class _Reverse(SequenceTask):
    name = "reverse"
    config = ReverseConfig
    presets = {"reverse": _reverse}

    def outputs(self, cfg: ReverseConfig, inputs: torch.Tensor) -> torch.Tensor:
        return inputs.flip(1)

    def map_keys(self, cfg: ReverseConfig, j: int) -> list[int]:
        return [cfg.length - j]


REVERSE = register(_Reverse())
