"""SGLD's coordinates for a fully preconditioned LLC: the sampled weights as w* + T u.

`analyses.llc.estimator.sgld_traces` samples u with devinterp's SGLD when it is given a matrix T (`transform`,
from `analyses.llc.calibrate.whitening`); `flat_positions` names the weights' places in the
flattening of all parameters, so a component's rows and columns can be cut from a whole-model
Hessian.
"""

from __future__ import annotations

import torch

from analyses.llc.data import Masks, sampled_parameters


def flat_positions(model: torch.nn.Module, masks: Masks | None = None) -> torch.Tensor:
    """Where the sampled weights (`sampled_parameters` order, masked entries in row-major order) sit
    in the flattening of all of `model`'s parameters: a restriction of the whole model's coordinates
    (the rows and columns of its Hessian that a component keeps)."""
    offsets, start = {}, 0
    for name, p in model.named_parameters():
        offsets[name], start = start, start + p.numel()
    parts = [offsets[name] + (torch.arange(p.numel()) if m is None else m.flatten().nonzero()[:, 0].cpu())
             for name, p, m in sampled_parameters(model, masks)]
    return torch.cat(parts)


class Reparametrized(torch.nn.Module):
    """`model` with its sampled weights at w* + T u and the rest at w*: `u` (zeros: w*) is the only
    parameter, SGLD's coordinates. `transform` T ([sampled weights, dim u]; None: the identity) is a
    fixed preconditioner: plain isotropic SGLD in u is preconditioned SGLD in w with covariance T T^T,
    whose stationary distribution is the same tempered posterior, localised by |u|^2 (the LLC, read
    as localization -> 0, does not depend on the coordinates)."""

    def __init__(self, model: torch.nn.Module, masks: Masks | None = None, transform: torch.Tensor | None = None):
        super().__init__()
        from torch.func import functional_call

        self.base, self._call = model, functional_call
        for p in model.parameters():
            p.requires_grad_(False)
        # (name, w*, flat indices of the sampled entries or None for all of them)
        self.sampled = [(name, p.detach(), None if m is None else m.flatten().nonzero()[:, 0])
                        for name, p, m in sampled_parameters(model, masks)]
        self.sizes = [p.numel() if where is None else len(where) for _, p, where in self.sampled]
        first = next(model.parameters())
        self.transform = None if transform is None else transform.to(first)
        size = sum(self.sizes) if transform is None else transform.shape[1]
        self.u = torch.nn.Parameter(torch.zeros(size, dtype=first.dtype, device=first.device))

    def weights(self) -> dict[str, torch.Tensor]:
        """The sampled parameters at w* + T u (the others are the base model's own)."""
        delta = self.u if self.transform is None else self.transform @ self.u
        out = {}
        for (name, base, where), part in zip(self.sampled, delta.split(self.sizes)):
            if where is not None:
                part = torch.zeros(base.numel(), dtype=part.dtype, device=part.device).index_add(0, where, part)
            out[name] = base + part.reshape(base.shape)
        return out

    def forward(self, *args, **kwargs):
        return self._call(self.base, self.weights(), args, kwargs)
