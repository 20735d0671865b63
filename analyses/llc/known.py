"""Known learning coefficients: the answers an LLC estimator is checked against.

A regular model's is half its dimension. Singular models have smaller ones, known in closed form
for a few families: reduced-rank regression (Aoyagi & Watanabe 2005) and deep linear networks
(Aoyagi 2024). `tests/test_llc.py` checks the default estimator on a reduced-rank regression;
`benchmarks/llc_known.py` on deep linear networks of 10^5 weights.

Those coefficients are n -> infinity limits. What an SGLD estimator converges to at a finite n is
the localized tempered posterior's expected nbeta (L(w) - L(w*)), which for a deep linear network
`dln_posterior_llc` computes exactly (block Gibbs: each layer given the others is Gaussian). It
separates the estimator's error from the data's: on a 300-200-200-5 network of rank 3 the exact
value at n = 1,000 is 0.83-0.84 of Aoyagi's coefficient at every localization from 0.01 to 10^-5 of
the sharpest curvature, and 0.93 at n = 10,000 (`benchmarks/dln_exact.py`, benchmarks/RESULTS.md).
"""

from __future__ import annotations

import math

import torch


def rrr_learning_coefficient(M: int, N: int, H: int, r: int) -> float:
    """The learning coefficient of reduced-rank regression (Aoyagi & Watanabe 2005, "Stochastic
    complexities of reduced rank regression in Bayesian estimation", Neural Networks 18, Main Theorem):
    the model x -> B A x with A of shape [H, M] and B [N, H] (M inputs, N outputs, H hidden units)
    and a true map of rank r <= H:
    - if N + r <= M + H, M + r <= N + H and H + r <= M + N:
      lambda = (2 (H + r)(M + N) - (M - N)^2 - (H + r)^2) / 8, plus 1/8 if M + N + H + r is odd;
    - else if M + H < N + r: lambda = (H M - H r + N r) / 2;
    - else if N + H < M + r: lambda = (H N - H r + M r) / 2;
    - else (M + N < H + r): lambda = M N / 2.
    At H = r it is r (M + N - r) / 2, half the dimension of the rank-r matrices (the regular case)."""
    if not (0 <= r <= H and min(M, N, H) >= 1):
        raise ValueError(f"(M, N, H, r)={(M, N, H, r)} is invalid: allowed M, N, H >= 1 and 0 <= r <= H")
    if N + r <= M + H and M + r <= N + H and H + r <= M + N:
        value = 2 * (H + r) * (M + N) - (M - N) ** 2 - (H + r) ** 2
        return (value + ((M + N + H + r) % 2)) / 8
    if M + H < N + r:
        return (H * M - H * r + N * r) / 2
    if N + H < M + r:
        return (H * N - H * r + M * r) / 2
    return M * N / 2


def dln_learning_coefficient(widths: list[int], r: int) -> float:
    """The learning coefficient of a deep linear network (Aoyagi 2024, "Consideration on the learning
    efficiency of multiple-layered neural networks with linear units", Neural Networks, main
    theorem): x -> W_L ... W_1 x with layer widths H_1 (input) ... H_{L+1} (output), no biases, and a
    true map of rank r <= min H_j. With M_j = H_j - r, S is the set of the l + 1 >= 2 smallest M_j
    for which max_S M < min_{not S} M, sum_S M >= l max_S M and sum_S M < l min_{not S} M (there is
    exactly one); with M' = ceil(sum_S M / l) and a = sum_S M - (M' - 1) l,
        lambda = (-r^2 + r (H_1 + H_{L+1})) / 2 + a (l - a) / (4 l) - l (l - 1) / 4 (sum_S M / l)^2
                 + 1/2 sum_{i < j in S} M_i M_j.
    With one hidden layer it is `rrr_learning_coefficient`; with a width equal to r it is
    r (H_1 + H_{L+1} - r) / 2, half the dimension of the rank-r maps; with one layer, H_1 H_2 / 2."""
    if len(widths) < 2 or min(widths) < 1 or not 0 <= r <= min(widths):
        raise ValueError(f"(widths, r)={(list(widths), r)} is invalid: allowed >= 2 widths >= 1 and "
                         "0 <= r <= min(widths)")
    M = sorted(h - r for h in widths)
    for size in range(2, len(M) + 1):
        chosen, total, l = M[:size], sum(M[:size]), size - 1
        beyond = M[size] if size < len(M) else math.inf
        if max(chosen) < beyond and total >= l * max(chosen) and total < l * beyond:
            a = total - (-(-total // l) - 1) * l  # -(-x // l): ceil(x / l) in integers
            pairs = (total ** 2 - sum(m * m for m in chosen)) / 2  # sum_{i < j} M_i M_j
            return ((-r * r + r * (widths[0] + widths[-1])) / 2 + a * (l - a) / (4 * l)
                    - l * (l - 1) / 4 * (total / l) ** 2 + pairs / 2)
    raise AssertionError(f"no subset S for widths={widths}, r={r}")  # excluded by the theorem


def dln_posterior_llc(layers: list[torch.Tensor], data: tuple[torch.Tensor, torch.Tensor], localization: float,
                      nbeta: float | None = None, sweeps: int = 400, burnin: int = 100, seed: int = 0) -> dict:
    """The exact finite-n value an LLC estimator targets on a deep linear network x -> W_L ... W_1 x
    (`layers`: the weights W_1 ... W_L at w*, [out, in] each, no biases; `data`: inputs [n, in] and
    targets [n, out]; loss L = the mean squared error over all entries): nbeta times the mean of
    L(w) - L(w*) under the localized tempered posterior exp(-nbeta L(w) - localization / 2 |w - w*|^2),
    with nbeta = n / log n by default and `localization` in the weights' own units (devinterp's).

    Sampled by block Gibbs, with no step size and no bias: given the other layers, the prediction is
    linear in W_l, A W_l z with A = W_L ... W_l+1 and z = W_l-1 ... W_1 x, so W_l is Gaussian with
    precision 2c (A^T A kron Z^T Z) + localization (c = nbeta / (n out)), drawn in the eigenbases
    of A^T A and Z^T Z. A chain starts at w* and runs `sweeps` sweeps over the layers; the first
    `burnin` are dropped. Returns `llc` (the mean), `se` (batch means over 10 blocks) and `trace`
    (nbeta (L - L(w*)) after every sweep). float64 throughout."""
    if not 0 <= burnin < sweeps or localization <= 0 or not layers:
        raise ValueError(f"(sweeps, burnin, localization)={(sweeps, burnin, localization)} is invalid: "
                         "allowed 0 <= burnin < sweeps, localization > 0 and at least one layer")
    x, y = (t.detach().double() for t in data)
    star = [w.detach().double() for w in layers]
    n, outputs = y.shape
    nbeta = n / math.log(n) if nbeta is None else float(nbeta)
    c = nbeta / (n * outputs)

    def loss(weights):
        h = x
        for w in weights:
            h = h @ w.T
        return float(((h - y) ** 2).mean())

    generator = torch.Generator().manual_seed(seed)
    start, weights, trace = loss(star), [w.clone() for w in star], []
    for _ in range(sweeps):
        Z = x  # layer l's input, [n, h_l-1], carried through the sweep as the layers below are redrawn
        for l in range(len(weights)):
            A = torch.eye(outputs, dtype=torch.float64)
            for w in reversed(weights[l + 1:]):
                A = A @ w  # [out, h_l]
            a, P = torch.linalg.eigh(A.T @ A)
            b, Q = torch.linalg.eigh(Z.T @ Z)
            precision = 2 * c * a.clamp_min(0)[:, None] * b.clamp_min(0)[None, :] + localization
            mean = P.T @ (2 * c * A.T @ y.T @ Z + localization * star[l]) @ Q / precision
            noise = torch.randn(mean.shape, generator=generator, dtype=torch.float64)
            weights[l] = P @ (mean + noise / precision.sqrt()) @ Q.T
            Z = Z @ weights[l].T
        trace.append(nbeta * (float(((Z - y) ** 2).mean()) - start))  # Z: the prediction after the last layer
    kept = torch.tensor(trace[burnin:], dtype=torch.float64)
    blocks = torch.stack([part.mean() for part in kept.tensor_split(min(10, len(kept)))])
    se = float(blocks.std() / math.sqrt(len(blocks))) if len(blocks) > 1 else math.inf
    return {"llc": float(kept.mean()), "se": se, "trace": trace}
