"""What the LLC estimator samples on: the data it accepts (a batch, a pair of tensors or a loader), its minibatches and losses, the sampler settings (`SGLDConfig`) and which weights are sampled (masks)."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from mechlrmc.measures import logits_of
from mechlrmc.tasks import get_task
from mechlrmc.tasks.lrmc import Batch

Data = Batch | tuple[torch.Tensor, torch.Tensor] | Iterable


Masks = dict[str, torch.Tensor | None]  # parameter name -> boolean mask of its sampled entries (None: all)


@dataclass(frozen=True)
class SGLDConfig:
    """SGLD hyperparameters of one LLC estimate."""

    num_chains: int = 3
    num_burnin: int = 15  # steps dropped from every chain before the draws
    num_draws: int = 30  # steps whose loss is averaged
    lr: float = 3e-4  # SGLD step size epsilon
    localization: float = 300.0  # gamma: pull toward w*
    batch_size: int = 64  # examples per SGLD step
    nbeta: float | None = 50.0  # inverse temperature; None: devinterp's default m / log m (m = batch_size)
    seed: int = 0
    paired: bool = False  # also record L(w*) on each minibatch and estimate from the paired difference

    def validate(self) -> SGLDConfig:
        checks = [("num_chains", self.num_chains >= 1, ">= 1"), ("num_burnin", self.num_burnin >= 0, ">= 0"),
                  ("num_draws", self.num_draws >= 1, ">= 1"), ("lr", self.lr > 0, "> 0"),
                  ("localization", self.localization >= 0, ">= 0"), ("batch_size", self.batch_size >= 2, ">= 2"),
                  ("nbeta", self.nbeta is None or self.nbeta > 0, "> 0 or None")]
        for name, ok, allowed in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: allowed {allowed}")
        return self

    @property
    def inverse_temperature(self) -> float:
        return self.nbeta if self.nbeta is not None else self.batch_size / math.log(self.batch_size)


DEFAULTS = SGLDConfig()


def is_batch(data) -> bool:
    """A task's batch (LRMC's `Batch`, a token task's batch...): indexable, with `tokens`."""
    return hasattr(data, "tokens") and hasattr(data, "__getitem__")


def mse_loss(model: torch.nn.Module, data) -> torch.Tensor:
    """The training objective of `model` on a task's batch (LRMC: MSE over all entries; any other
    task: its own `loss`), or the MSE on a tensor pair (inputs, targets)."""
    if is_batch(data):
        return get_task(data.task).loss(logits_of(model)(data.tokens), data)["loss"]
    inputs, targets = data
    return F.mse_loss(model(inputs).reshape(targets.shape), targets)


def is_indexable(data) -> bool:
    """A task's batch or a tensor pair (rows can be drawn), rather than an iterable of them."""
    return is_batch(data) or (isinstance(data, tuple) and len(data) == 2 and torch.is_tensor(data[0]))


def data_size(data) -> int:
    return len(data) if is_batch(data) else len(data[0])


def minibatches(data: Data, batch_size: int, generator: torch.Generator) -> Iterable:
    """Endless minibatches: random rows of a Batch / tensor pair, or the items of an iterable in a cycle."""
    if is_indexable(data):
        n = data_size(data)
        if n < batch_size:
            raise ValueError(f"batch_size={batch_size} is invalid for {n} examples: allowed <= {n}")
        if n == batch_size:  # all of the data at every step
            yield from itertools.repeat(data)
        while True:
            rows = torch.randperm(n, generator=generator)[:batch_size]
            yield data[rows] if is_batch(data) else (data[0][rows], data[1][rows])
    else:
        yield from itertools.cycle(data)


def full_loss(model: torch.nn.Module, data: Data, loss_fn: Callable, chunk: int = 1024) -> float:
    """L(w*) over all of the data (an iterable: one pass)."""
    with torch.no_grad():
        if is_indexable(data):
            n = data_size(data)
            parts = [(min(chunk, n - s), data[s:s + chunk] if is_batch(data) else
                      (data[0][s:s + chunk], data[1][s:s + chunk])) for s in range(0, n, chunk)]
        else:
            parts = [(data_size(item), item) for item in data]
        return sum(size * float(loss_fn(model, part)) for size, part in parts) / sum(size for size, _ in parts)


def sampled_parameters(model: torch.nn.Module,
                       masks: Masks | None = None) -> list[tuple[str, torch.nn.Parameter, torch.Tensor | None]]:
    """`(name, parameter, mask)` of the weights SGLD moves: every parameter, or those `masks` names
    (a mask None: the whole tensor; a boolean tensor of the parameter's shape: its True entries)."""
    params = dict(model.named_parameters())
    if masks is None:
        return [(name, p, None) for name, p in params.items()]
    unknown = sorted(set(masks) - set(params))
    if unknown or not masks:
        raise ValueError(f"masks={unknown or '{}'} is invalid: allowed a non-empty dict of the model's parameter names")
    return [(name, params[name], None if mask is None else mask.to(params[name].device).bool())
            for name, mask in masks.items()]


def sampled_dimension(model: torch.nn.Module, masks: Masks | None = None) -> int:
    """The number of weights SGLD moves (an upper bound on twice the LLC)."""
    return sum(p.numel() if m is None else int(m.sum()) for _, p, m in sampled_parameters(model, masks))
