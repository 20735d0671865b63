"""The LRMC task (docs/FINDINGS.md, S1): low-rank matrix completion as masked language modelling.

A matrix X = U V^T [m, n] is flattened row-major into m*n tokens. Value x gets token
1 + round(x / precision) + round(value_max / precision); MASK is token 0 (docs/FINDINGS.md, S1).
The model reads the whole matrix bidirectionally (a causal variant is allowed) and predicts one
real number per entry; the loss is the MSE over all entries, tracked also over the observed and
the masked ones (finding 1). Here: the data config, the codec, the online sampler, structured
masks, the three losses, the optimal attention map, the presets (`paper`, `cpu`, `tiny`) and the
task itself. Sampling runs on the CPU from a `torch.Generator`, so one seed gives one data stream
on any device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import ClassVar, Iterable

import torch

from mechlrmc.config import ModelConfig, RunConfig, TrainConfig
from mechlrmc.errors import OptionError
from mechlrmc.tasks import register
from mechlrmc.tasks.values import MASK_ID, decode_tokens, encode_values  # noqa: F401 (re-exported)
from mechlrmc.tasks.base import Task, TaskConfig
from mechlrmc.validation import check_types, require

DISTRIBUTIONS = ("uniform", "gaussian", "laplace")


@dataclass
class DataConfig(TaskConfig):
    """The LRMC task: X = U V^T with U [m, rank], V [n, rank], rounded to `precision`, each entry
    masked with probability `p_mask`. Values in [-value_max, value_max] get one token each."""

    task: ClassVar[str] = "lrmc"

    m: int = 7
    n: int = 7
    rank: int = 2
    p_mask: float = 0.3
    distribution: str = "uniform"
    value_max: float = 10.0
    precision: float = 0.01

    def __post_init__(self) -> None:
        check_types(self, "data")
        require(self.m >= 1, "data.m", self.m, "an integer >= 1")
        require(self.n >= 1, "data.n", self.n, "an integer >= 1")
        require(
            1 <= self.rank <= min(self.m, self.n),
            "data.rank", self.rank, f"1 <= rank <= min(m, n) = {min(self.m, self.n)}",
        )
        require(0.0 <= self.p_mask < 1.0, "data.p_mask", self.p_mask, "0 <= p_mask < 1")
        require(
            self.distribution in DISTRIBUTIONS,
            "data.distribution", self.distribution, f"one of {DISTRIBUTIONS}",
        )
        require(0 < self.precision < math.inf, "data.precision", self.precision, "a finite number > 0")
        require(0 < self.value_max < math.inf, "data.value_max", self.value_max, "a finite number > 0")
        steps = self.value_max / self.precision
        require(
            abs(steps - round(steps)) < 1e-6,
            "data.value_max", self.value_max, f"a whole multiple of precision={self.precision}",
        )

    @property
    def n_values(self) -> int:
        """Number of value tokens: one per grid point in [-value_max, value_max]."""
        return 2 * round(self.value_max / self.precision) + 1

    @property
    def vocab_size(self) -> int:
        """MASK (id 0) plus one token per value."""
        return self.n_values + 1

    @property
    def seq_len(self) -> int:
        return self.m * self.n

    def describe(self) -> str:
        return f"LRMC: {self.m} x {self.n} rank-{self.rank} matrices, {self.distribution} factors, p_mask {self.p_mask}"

    @property
    def seq_len_text(self) -> str:
        return f"data.m * data.n = {self.seq_len}"

    @property
    def plateau_mask_loss(self) -> float:
        """L_mask of the copy-and-zero predictor, E[X_ij^2] = rank * E[u^2]^2 (finding 1, docs/FINDINGS.md).

        Uniform[-1, 1] factors: rank / 9. Gaussian N(0, 1): rank. Laplace(0, 1): 4 * rank.
        """
        second_moment = {"uniform": 1.0 / 3.0, "gaussian": 1.0, "laplace": 2.0}[self.distribution]
        return self.rank * second_moment**2


@dataclass
class Batch:
    """One batch of masked matrices. Masks and targets travel beside the tokens, never inside."""

    tokens: torch.Tensor  # [batch, m*n] long, MASK = 0 at masked entries
    values: torch.Tensor  # [batch, m*n] float32, the rounded true X
    observed: torch.Tensor  # [batch, m*n] bool
    m: int
    n: int
    task: ClassVar[str] = "lrmc"  # the task it was sampled for
    description: ClassVar[str] = "random masks"  # what the examples of a batch are, for captions
    example_caption: ClassVar[str] = "masked entries grey, truth in brackets"

    @property
    def masked(self) -> torch.Tensor:
        return ~self.observed

    @property
    def targets(self) -> torch.Tensor:
        """[batch, m*n]: what the read-out is trained to give at every position, the rounded X."""
        return self.values

    @property
    def scored(self) -> torch.Tensor:
        """[m*n] bool: the positions the loss scores (all of them: the MSE is over every entry)."""
        return torch.ones(self.m * self.n, dtype=torch.bool, device=self.tokens.device)

    def position_names(self) -> list[str]:
        """`r{i}c{j}` for every position (row-major)."""
        rows, cols = row_col_index(self.m, self.n)
        return [f"r{i}c{j}" for i, j in zip(rows.tolist(), cols.tolist())]

    def example_names(self, example: int) -> list[str]:
        """Each position of one example named with its value, or MASK where it is masked."""
        values, observed = self.values[example].tolist(), self.observed[example].tolist()
        return [f"{p}:{v:+.2f}" if o else f"{p}:MASK" for p, v, o in zip(self.position_names(), values, observed)]

    def example_rows(self, example: int) -> list[list[tuple[str, bool]]]:
        """One example's matrix as table rows of (cell text, greyed): masked entries greyed, with
        the hidden truth in brackets."""
        values = self.matrices[example].tolist()
        observed = self.observed[example].view(self.m, self.n).tolist()
        return [[(f"{v:+.2f}", False) if o else (f"[{v:+.2f}]", True) for v, o in zip(row, obs)]
                for row, obs in zip(values, observed)]

    @property
    def matrices(self) -> torch.Tensor:
        """The true matrices [batch, m, n]."""
        return self.values.view(-1, self.m, self.n)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def to(self, device: torch.device | str) -> Batch:
        return replace(
            self,
            tokens=self.tokens.to(device),
            values=self.values.to(device),
            observed=self.observed.to(device),
        )

    def __getitem__(self, index: slice | torch.Tensor) -> Batch:
        return replace(
            self, tokens=self.tokens[index], values=self.values[index], observed=self.observed[index]
        )


def _factors(cfg: DataConfig, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    if cfg.distribution == "uniform":
        return torch.rand(shape, generator=generator) * 2 - 1
    if cfg.distribution == "gaussian":
        return torch.randn(shape, generator=generator)
    # Laplace(0, 1) by inverting its CDF.
    u = torch.rand(shape, generator=generator) - 0.5
    return -torch.sign(u) * torch.log1p(-2 * u.abs().clamp(max=0.5 - 1e-7))


def sample(cfg: DataConfig, batch_size: int, generator: torch.Generator) -> Batch:
    """A fresh batch of rank-`cfg.rank` matrices with each entry masked with prob `cfg.p_mask`."""
    u = _factors(cfg, (batch_size, cfg.m, cfg.rank), generator)
    v = _factors(cfg, (batch_size, cfg.n, cfg.rank), generator)
    x = (u @ v.transpose(1, 2)).reshape(batch_size, cfg.seq_len)  # [batch, m*n]
    ids = encode_values(x, cfg.precision, cfg.value_max)
    values = decode_tokens(ids, cfg.precision, cfg.value_max)
    observed = torch.rand(batch_size, cfg.seq_len, generator=generator) >= cfg.p_mask
    tokens = torch.where(observed, ids, MASK_ID)
    return Batch(tokens=tokens, values=values, observed=observed, m=cfg.m, n=cfg.n)


def with_observed(batch: Batch, observed: torch.Tensor, cfg: DataConfig) -> Batch:
    """The same matrices under another mask; `observed` is [m*n] (one mask for the whole batch)
    or [batch, m*n]."""
    observed = observed.to(batch.tokens.device).expand_as(batch.observed).clone()
    ids = encode_values(batch.values, cfg.precision, cfg.value_max).to(batch.tokens.device)
    return replace(batch, tokens=torch.where(observed, ids, MASK_ID), observed=observed)


def with_values(batch: Batch, values: torch.Tensor, cfg: DataConfig) -> Batch:
    """Other matrices (e.g. -X for patching) under the same mask."""
    ids = encode_values(values, cfg.precision, cfg.value_max).to(batch.tokens.device)
    values = decode_tokens(ids, cfg.precision, cfg.value_max)
    return replace(batch, tokens=torch.where(batch.observed, ids, MASK_ID), values=values)


def structured_mask(
    m: int,
    n: int,
    rows: Iterable[int] = (),
    cols: Iterable[int] = (),
    keep: Iterable[tuple[int, int]] = (),
) -> torch.Tensor:
    """An observed-mask [m*n] with the given rows and columns masked, except the `keep` entries.

    `structured_mask(7, 7, rows=[3, 6], keep=[(3, 0), (6, 4)])` is the mask of finding 4 (docs/FINDINGS.md):
    rows 3 and 6 masked except one observed entry each.
    """
    observed = torch.ones(m, n, dtype=torch.bool)
    for r in rows:
        if not 0 <= r < m:
            raise ValueError(f"row {r} is out of range: allowed 0 <= row < m={m}")
        observed[r] = False
    for c in cols:
        if not 0 <= c < n:
            raise ValueError(f"column {c} is out of range: allowed 0 <= column < n={n}")
        observed[:, c] = False
    for r, c in keep:
        if not (0 <= r < m and 0 <= c < n):
            raise ValueError(f"kept entry {(r, c)} is out of range: allowed [0, {m}) x [0, {n})")
        observed[r, c] = True
    return observed.reshape(m * n)


def row_col_index(m: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column of every position of the flattened m x n matrix, each [m*n]."""
    pos = torch.arange(m * n)
    return pos // n, pos % n


def split_losses(pred: torch.Tensor, values: torch.Tensor, observed: torch.Tensor) -> dict[str, torch.Tensor]:
    """MSE over all entries (`loss`, the training objective), observed entries (`loss_obs`) and
    masked entries (`loss_mask`). All inputs [batch, pos]; returns 0-d tensors (NaN when a split
    is empty)."""
    err = (pred.float() - values.float()) ** 2
    obs = observed.float()
    n_obs, n_mask = obs.sum(), (1 - obs).sum()
    return {
        "loss": err.mean(),
        "loss_obs": (err * obs).sum() / n_obs if n_obs > 0 else err.new_tensor(float("nan")),
        "loss_mask": (err * (1 - obs)).sum() / n_mask if n_mask > 0 else err.new_tensor(float("nan")),
    }


def masked_correlation(pred: torch.Tensor, values: torch.Tensor, observed: torch.Tensor) -> float:
    """Pearson correlation of predictions with the truth over masked entries (0 on the plateau)."""
    p, v = pred[~observed].double(), values[~observed].double()
    if p.numel() < 2 or p.std() == 0 or v.std() == 0:
        return 0.0
    return float(torch.corrcoef(torch.stack([p, v]))[0, 1])

def optimal_attention_map(observed: torch.Tensor, m: int, n: int) -> torch.Tensor:
    """[batch, query, key] bool: key is observed and shares the query's row or column
    (the query itself excluded)."""
    rows, cols = row_col_index(m, n)
    rows, cols = rows.to(observed.device), cols.to(observed.device)
    same_line = (rows[:, None] == rows[None, :]) | (cols[:, None] == cols[None, :])
    same_line &= ~torch.eye(m * n, dtype=torch.bool, device=observed.device)
    return same_line[None] & observed[:, None, :]


@torch.no_grad()
def evaluate(model: torch.nn.Module, batch: Batch, chunk: int = 4096) -> dict[str, float]:
    """L, L_obs, L_mask and masked correlation of `model` on `batch`."""
    device = next(model.parameters()).device
    pred = torch.cat([model(batch.tokens[i:i + chunk].to(device)).float().cpu()
                      for i in range(0, len(batch), chunk)])
    out = {k: float(v) for k, v in split_losses(pred, batch.values, batch.observed).items()}
    out["corr_mask"] = masked_correlation(pred, batch.values, batch.observed)
    return out


def eval_batch(cfg: RunConfig, size: int | None = None, seed: int | None = None) -> Batch:
    """The fixed evaluation batch of a run: the same matrices for every checkpoint."""
    return LRMC.eval_batch(cfg, size, seed)


def _paper() -> RunConfig:
    """Exactly the configuration of the paper (docs/FINDINGS.md, S1): a GPU job."""
    return RunConfig(
        data=DataConfig(m=7, n=7, rank=2, p_mask=0.3),
        model=ModelConfig(d_model=768, n_layers=4, n_heads=8, d_mlp=3072),
        train=TrainConfig(
            steps=50_000, batch_size=256, lr=1e-4, eval_every=500, checkpoint_every=2000,
            checkpoint_every_early=1000, checkpoint_early_until=1000,
            checkpoint_steps=(1000, 4000, 10_000, 14_000, 16_000, 20_000, 50_000),
        ),
    )


def _cpu() -> RunConfig:
    """Plateau-then-drop on a CPU in minutes: the paper's architecture, smaller in every dimension.

    One thread (deterministic on one machine type). The plateau length varies a lot between seeds:
    at 8,000 steps only 3 of 5 seeds had dropped, so the preset runs 14,000 steps, by which all
    five seeds of `sweeps/cpu_seeds.yaml` drop (README, "Many runs"). Seed 1 is the family's median.
    """
    return RunConfig(
        data=DataConfig(m=4, n=4, rank=1, p_mask=0.3),
        model=ModelConfig(d_model=64, n_layers=4, n_heads=8, d_mlp=256),
        train=TrainConfig(
            steps=14_000, batch_size=128, lr=2e-3, seed=1, log_every=50, eval_every=250,
            eval_batch_size=1024, checkpoint_every=500, checkpoint_every_early=250,
            checkpoint_early_until=1000, threads=1,
        ),
    )


def _tiny() -> RunConfig:
    """A seconds-long run for tests and smoke checks; it does not leave the plateau."""
    return RunConfig(
        data=DataConfig(m=3, n=3, rank=1, p_mask=0.3),
        model=ModelConfig(d_model=16, n_layers=2, n_heads=2, d_mlp=32),
        train=TrainConfig(
            steps=40, batch_size=16, lr=1e-3, log_every=5, eval_every=10, eval_batch_size=64,
            checkpoint_every=20, checkpoint_every_early=10, checkpoint_early_until=10,
            threads=1,
        ),
    )


TARGETS = ("value", "row", "col", "u", "v", "sigma")  # LRMC's probe targets


def matrix_targets(batch: Batch, targets: Iterable[str] = TARGETS[:5]) -> dict[str, torch.Tensor]:
    """LRMC's probe targets (`analyses.representations.probes`) at every position, `{name: [batch * m*n, k]}` (float64)."""
    b, m, n = len(batch), batch.m, batch.n
    x = batch.matrices.double()  # [b, m, n]
    x_in = (batch.values * batch.observed).double().view(b, m, n)
    rows, cols = row_col_index(m, n)
    out = {}
    for name in targets:
        if name not in TARGETS:
            raise OptionError(f"probe target {name!r} is unknown: allowed {TARGETS}")
        if name == "value":
            t = x.reshape(b, m * n, 1)
        elif name == "row":
            t = x_in[:, rows, :]  # [b, m*n, n]
        elif name == "col":
            t = x_in.transpose(1, 2)[:, cols, :]  # [b, m*n, m]
        else:
            u, s, vh = torch.linalg.svd(x)
            u, v = u[..., 0], vh[:, 0, :]  # [b, m], [b, n]
            flip = torch.where(u.gather(1, u.abs().argmax(1, keepdim=True)) < 0, -1.0, 1.0)  # [b, 1]
            vec = {"u": u * flip, "v": v * flip, "sigma": s[:, :1]}[name]  # [b, k]: X ~ sigma u v^T
            t = vec[:, None, :].expand(b, m * n, vec.shape[1])
        out[name] = t.reshape(b * m * n, -1)
    return out


class _LRMC(Task):
    name = "lrmc"
    config = DataConfig
    readout = "scalar"
    causal = (False, True)
    mask_token = True
    train_metrics = ("loss", "loss_obs", "loss_mask")
    eval_metrics = ("loss", "loss_obs", "loss_mask", "corr_mask")
    progress = {"L": "loss", "L_mask": "loss_mask"}
    summary_metrics = ("eval_loss", "eval_loss_mask", "eval_corr_mask")
    phase_metric = "loss_mask"
    copy_metric = "loss_obs"
    phase_label = "eval L_mask"
    final_metrics = ("loss", "loss_mask", "corr_mask")
    supports = frozenset({"matrix", "optimal_map", "position_scores", "probes"})
    probe_names = TARGETS
    probe_defaults = ("value", "row", "col", "u", "v")
    probe_focus = "masked"
    presets = {"paper": _paper, "cpu": _cpu, "tiny": _tiny}

    def sample(self, cfg: DataConfig, batch_size: int, generator: torch.Generator) -> Batch:
        return sample(cfg, batch_size, generator)

    def loss(self, output: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        return split_losses(output, batch.values, batch.observed)

    def evaluate(self, model: torch.nn.Module, batch: Batch, sites=None) -> dict[str, float]:
        return evaluate(model, batch)

    def optimal_attention_map(self, batch: Batch) -> torch.Tensor:
        return optimal_attention_map(batch.observed, batch.m, batch.n)

    def probe_targets(self, batch: Batch, names) -> dict[str, torch.Tensor]:
        """The entry, its masked-input row and column, the top singular vectors and value
        (`analyses.representations.probes.matrix_targets`) at every position."""
        return matrix_targets(batch, self.check_probe_targets(names))

    def probe_positions(self, batch: Batch) -> dict[str, torch.Tensor]:
        observed = batch.observed.reshape(-1).cpu()
        return {"all": torch.ones_like(observed), "masked": ~observed, "observed": observed}

    def plateau(self, cfg: DataConfig) -> dict[str, float]:
        """Copy the observed entries, predict 0 at masked ones (finding 1)."""
        return {"loss_obs": 0.0, "loss_mask": cfg.plateau_mask_loss, "loss": cfg.p_mask * cfg.plateau_mask_loss}

    @torch.no_grad()
    def position_scores(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """[m*n]: per matrix position, 1 - its masked MSE / the copy-and-zero MSE there (predicting 0):
        0 on the plateau, 1 when the masked entries there are completed exactly."""
        pred = model(batch.tokens).float()
        masked = batch.masked.float()
        count = masked.sum(0).clamp_min(1)
        error = ((pred - batch.values) ** 2 * masked).sum(0) / count
        baseline = (batch.values ** 2 * masked).sum(0) / count
        return 1 - error / baseline.clamp_min(1e-12)

    def phase_columns(self, evals, drop_index: int, band, window: int) -> dict[str, float]:
        """L on the plateau (median of the evaluations before the drop) and after it (the last
        `window`)."""
        return {"plateau_loss": float(evals.eval_loss.iloc[1:drop_index].median()),
                "post_drop_loss": float(evals.eval_loss.iloc[-window:].median())}

    def summary(self, row) -> str:
        return f"eval L={row.eval_loss:.4g} L_obs={row.eval_loss_obs:.4g} L_mask={row.eval_loss_mask:.4g}"


LRMC = register(_LRMC())
