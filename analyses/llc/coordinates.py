"""SGLD's coordinates for a preconditioned LLC: the sampled weights as w* + T u.

`analyses.llc.estimator.sgld_traces` samples u with devinterp's SGLD when it is given a transform T:
a dense matrix (`analyses.llc.calibrate.whitening`, models of at most `FULL_LIMIT` weights) or a
`LowRankTransform` (per-tensor scales and the sharpest directions, `analyses.llc.calibrate.sharp_directions`:
larger models), which never forms a matrix over all weights. `flat_positions` names the weights'
places in the flattening of all parameters, so a component's rows and columns can be cut from a
whole-model Hessian (or its sharp directions).
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


class LowRankTransform:
    """The preconditioner of a model too large for a dense one: per-tensor scales and its k sharpest directions.

    With D the per-tensor curvature scales of the sampled weights (`root_scale` = D^-1/2, [d]) and V
    ([d, k], orthonormal) the sharpest directions of the Hessian in v = D^1/2 w, of curvature
    `values` ([k]), and `rest` the largest |curvature| of that Hessian off V:
        T u = D^-1/2 (V diag(s) V^T u + c (u - V V^T u)),
    s = values^-1/2 and c = rest^-1/2. So the sharp directions get curvature 1 each, as `whitening`
    gives every direction, and the rest, rescaled together, at most 1: a few directions far sharper
    than the bulk (inputs with a mean) no longer set the step for all. As in `whitening`, a
    direction below `floor` times the sharpest (a singular model's near-flat one) is scaled like the
    sharpest instead, and so is the rest when `rest` is below it. Applied in O(d k); with k = d and
    unit scales it is `whitening` of D^-1/2 H D^-1/2 up to a rotation of u (the same T T^T)."""

    def __init__(self, root_scale: torch.Tensor, basis: torch.Tensor, values: torch.Tensor, rest: float,
                 floor: float):
        self.root_scale, self.basis, self.values, self.rest, self.floor = root_scale, basis, values, float(rest), floor
        top = max(float(values.max()) if len(values) else 0.0, self.rest)
        top = top if top > 0 else 1.0  # no curvature at all: scaled as if it had curvature 1
        self.inner = (self.rest if self.rest >= floor * top else top) ** -0.5  # c, off the sharp directions
        self.sharp = torch.where(values >= floor * top, values, torch.full_like(values, top)).rsqrt()  # s

    @property
    def dim(self) -> int:
        """The number of sampled weights (T is square)."""
        return len(self.root_scale)

    def with_floor(self, floor: float) -> LowRankTransform:
        return LowRankTransform(self.root_scale, self.basis, self.values, self.rest, floor)

    def to(self, like: torch.Tensor) -> LowRankTransform:
        """On `like`'s device and in its dtype (SGLD's u)."""
        return LowRankTransform(self.root_scale.to(like), self.basis.to(like), self.values.to(like), self.rest,
                                self.floor)

    def apply(self, u: torch.Tensor) -> torch.Tensor:
        """T u ([d] -> [d]), differentiable in u."""
        along = self.basis.T @ u  # [k]
        return self.root_scale * (self.inner * u + self.basis @ ((self.sharp - self.inner) * along))

    def restrict(self, positions: torch.Tensor) -> LowRankTransform:
        """The preconditioner of the weights at `positions` alone (a component; the others fixed): their
        block of the Hessian is V_S diag(values) V_S^T (V_S: V's rows there) plus a part of norm at
        most `rest`, so its sharp directions are the eigenvectors of that low-rank part (a QR of
        V_S diag(values)^1/2 and a k x k eigenproblem) and `rest` still bounds the others."""
        root = self.basis[positions] * self.values.clamp_min(0).sqrt()  # [m, k]
        q, r = torch.linalg.qr(root)
        values, rotation = torch.linalg.eigh(r @ r.T)
        return LowRankTransform(self.root_scale[positions], q @ rotation, values, self.rest, self.floor)


class Reparametrized(torch.nn.Module):
    """`model` with its sampled weights at w* + T u and the rest at w*: `u` (zeros: w*) is the only
    parameter, SGLD's coordinates. `transform` T ([sampled weights, dim u]; None: the identity) is a
    fixed preconditioner: plain isotropic SGLD in u is preconditioned SGLD in w with covariance T T^T,
    whose stationary distribution is the same tempered posterior, localised by |u|^2 (the LLC, read
    as localization -> 0, does not depend on the coordinates). A `LowRankTransform` is applied
    without forming T."""

    def __init__(self, model: torch.nn.Module, masks: Masks | None = None,
                 transform: torch.Tensor | LowRankTransform | None = None):
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
        if transform is None:
            size = sum(self.sizes)
        else:
            size = transform.shape[1] if torch.is_tensor(transform) else transform.dim
        self.u = torch.nn.Parameter(torch.zeros(size, dtype=first.dtype, device=first.device))
        # no transform and every entry sampled: w* flat, so w = w* + u is one addition, not one per tensor
        whole = transform is None and self.sampled and all(where is None for _, _, where in self.sampled)
        self.star = torch.cat([p.flatten() for _, p, _ in self.sampled]) if whole else None

    def weights(self) -> dict[str, torch.Tensor]:
        """The sampled parameters at w* + T u (the others are the base model's own)."""
        if self.star is not None:
            parts = (self.star + self.u).split(self.sizes)
            return {name: part.view(base.shape) for (name, base, _), part in zip(self.sampled, parts)}
        if self.transform is None:
            delta = self.u
        else:
            delta = self.transform @ self.u if torch.is_tensor(self.transform) else self.transform.apply(self.u)
        out = {}
        for (name, base, where), part in zip(self.sampled, delta.split(self.sizes)):
            if where is not None:
                part = torch.zeros(base.numel(), dtype=part.dtype, device=part.device).index_add(0, where, part)
            out[name] = base + part.reshape(base.shape)
        return out

    def forward(self, *args, **kwargs):
        return self._call(self.base, self.weights(), args, kwargs)
