"""Typed configuration: data, model and training, grouped in a `RunConfig`.

Every config is a dataclass that validates itself on construction and names the bad field and the
allowed range in its error. `RunConfig.to_yaml` / `RunConfig.from_yaml` round-trip exactly, and
`preset(name)` returns the named configurations (`paper`, `cpu`, `tiny`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from mechlrmc.errors import UsageError

DISTRIBUTIONS = ("uniform", "gaussian", "laplace")
NORMS = ("post", "pre")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("float32", "bfloat16")
ADAM_IMPLEMENTATIONS = ("foreach", "fused")


class ConfigError(UsageError, ValueError):
    """A configuration value is out of range, of the wrong type, or unknown."""


def _require(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{name}={value!r} is invalid: allowed {allowed}")


def _check_types(cfg: Any, prefix: str) -> None:
    """Reject values whose type does not match the dataclass annotation (bools are not ints)."""
    hints = get_type_hints(type(cfg))
    for f in fields(cfg):
        value, hint = getattr(cfg, f.name), hints[f.name]
        name = f"{prefix}.{f.name}"
        if hint is bool:
            ok = isinstance(value, bool)
        elif hint is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif hint is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if ok:
                object.__setattr__(cfg, f.name, float(value))
        elif hint is str:
            ok = isinstance(value, str)
        elif hint == tuple[int, ...]:
            if isinstance(value, list):
                value = tuple(value)
                object.__setattr__(cfg, f.name, value)
            ok = isinstance(value, tuple) and all(
                isinstance(v, int) and not isinstance(v, bool) for v in value
            )
        else:
            ok = True
        if not ok:
            raise ConfigError(f"{name}={value!r} has the wrong type: expected {_type_name(hint)}")


def _type_name(hint: Any) -> str:
    return "a list of integers" if hint == tuple[int, ...] else getattr(hint, "__name__", str(hint))


@dataclass
class DataConfig:
    """The LRMC task: X = U V^T with U [m, rank], V [n, rank], rounded to `precision`, each entry
    masked with probability `p_mask`. Values in [-value_max, value_max] get one token each."""

    m: int = 7
    n: int = 7
    rank: int = 2
    p_mask: float = 0.3
    distribution: str = "uniform"
    value_max: float = 10.0
    precision: float = 0.01

    def __post_init__(self) -> None:
        _check_types(self, "data")
        _require(self.m >= 1, "data.m", self.m, "an integer >= 1")
        _require(self.n >= 1, "data.n", self.n, "an integer >= 1")
        _require(
            1 <= self.rank <= min(self.m, self.n),
            "data.rank", self.rank, f"1 <= rank <= min(m, n) = {min(self.m, self.n)}",
        )
        _require(0.0 <= self.p_mask < 1.0, "data.p_mask", self.p_mask, "0 <= p_mask < 1")
        _require(
            self.distribution in DISTRIBUTIONS,
            "data.distribution", self.distribution, f"one of {DISTRIBUTIONS}",
        )
        _require(0 < self.precision < math.inf, "data.precision", self.precision, "a finite number > 0")
        _require(0 < self.value_max < math.inf, "data.value_max", self.value_max, "a finite number > 0")
        steps = self.value_max / self.precision
        _require(
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

    @property
    def plateau_mask_loss(self) -> float:
        """L_mask of the copy-and-zero predictor, E[X_ij^2] = rank * E[u^2]^2 (finding 1, docs/FINDINGS.md).

        Uniform[-1, 1] factors: rank / 9. Gaussian N(0, 1): rank. Laplace(0, 1): 4 * rank.
        """
        second_moment = {"uniform": 1.0 / 3.0, "gaussian": 1.0, "laplace": 2.0}[self.distribution]
        return self.rank * second_moment**2


@dataclass
class ModelConfig:
    """The bidirectional BERT encoder. `norm="post"` is the paper's post-LayerNorm BERT.

    `mask_embedding_zero` reproduces the reference: MASK is HF BERT's padding id, so its embedding
    row is zero and never trained. `n_ctx` is the size of the position table (0: the sequence
    length m*n); make it larger to evaluate on bigger matrices.
    """

    d_model: int = 768
    n_layers: int = 4
    n_heads: int = 8
    d_mlp: int = 3072
    norm: str = "post"
    mask_embedding_zero: bool = True
    n_ctx: int = 0
    init_range: float = 0.02
    ln_eps: float = 1e-12

    def __post_init__(self) -> None:
        _check_types(self, "model")
        for name in ("d_model", "n_layers", "n_heads", "d_mlp"):
            value = getattr(self, name)
            _require(value >= 1, f"model.{name}", value, "an integer >= 1")
        _require(
            self.d_model % self.n_heads == 0,
            "model.d_model", self.d_model, f"a multiple of model.n_heads={self.n_heads}",
        )
        _require(self.norm in NORMS, "model.norm", self.norm, f"one of {NORMS}")
        _require(self.n_ctx >= 0, "model.n_ctx", self.n_ctx, "an integer >= 0 (0 means m*n)")
        _require(0 < self.init_range < math.inf, "model.init_range", self.init_range, "a finite number > 0")
        _require(0 < self.ln_eps < 1, "model.ln_eps", self.ln_eps, "0 < ln_eps < 1")

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads


@dataclass
class TrainConfig:
    """Online training: a fresh batch every step, Adam at a constant learning rate, MSE on all
    entries. Checkpoints at every multiple of `checkpoint_every`, at every multiple of
    `checkpoint_every_early` up to `checkpoint_early_until` (denser early), at the listed
    `checkpoint_steps`, and at the last step. `attn_intervention_scale` = c != 1 biases every head
    toward the optimal LRMC attention map from step `attn_intervention_start` on
    (`mechlrmc.intervention`).

    Speed switches: `compile` runs the forward and backward through `torch.compile`, and `adam`
    picks PyTorch's Adam kernel: "foreach" (multi-tensor, bitwise the same as the per-tensor loop)
    or "fused" (one kernel, faster, float results differ in the last
    bits). `compile` and "fused" are for speed but change the float trajectory: a run with them does
    not reproduce a run without them bit for bit (the default does)."""

    steps: int = 50_000
    batch_size: int = 256
    lr: float = 1e-4
    seed: int = 0
    log_every: int = 50
    eval_every: int = 500
    eval_batch_size: int = 1024
    eval_seed: int = 12345
    checkpoint_every: int = 2000
    checkpoint_every_early: int = 500
    checkpoint_early_until: int = 2000
    checkpoint_steps: tuple[int, ...] = ()
    device: str = "auto"
    dtype: str = "float32"
    compile: bool = False
    adam: str = "foreach"
    threads: int = 0
    attn_intervention_scale: float = 1.0
    attn_intervention_start: int = 0

    def __post_init__(self) -> None:
        _check_types(self, "train")
        for name in ("steps", "batch_size", "log_every", "eval_every", "eval_batch_size",
                     "checkpoint_every", "checkpoint_every_early"):
            value = getattr(self, name)
            _require(value >= 1, f"train.{name}", value, "an integer >= 1")
        _require(
            self.lr > 0 and math.isfinite(self.lr), "train.lr", self.lr, "a finite number > 0"
        )
        for name in ("seed", "eval_seed"):
            value = getattr(self, name)
            _require(0 <= value < 2**62, f"train.{name}", value, "an integer in [0, 2**62)")
        _require(
            self.checkpoint_early_until >= 0,
            "train.checkpoint_early_until", self.checkpoint_early_until, "an integer >= 0",
        )
        bad = [s for s in self.checkpoint_steps if not 0 <= s <= self.steps]
        _require(not bad, "train.checkpoint_steps", bad, f"steps in [0, train.steps={self.steps}]")
        _require(self.device in DEVICES, "train.device", self.device, f"one of {DEVICES}")
        _require(self.dtype in DTYPES, "train.dtype", self.dtype, f"one of {DTYPES}")
        _require(self.adam in ADAM_IMPLEMENTATIONS, "train.adam", self.adam, f"one of {ADAM_IMPLEMENTATIONS}")
        _require(self.threads >= 0, "train.threads", self.threads, "an integer >= 0 (0: torch's default)")
        _require(
            0 < self.attn_intervention_scale < math.inf, "train.attn_intervention_scale",
            self.attn_intervention_scale, "a finite number > 0 (1: no intervention)",
        )
        _require(
            self.attn_intervention_start >= 0, "train.attn_intervention_start",
            self.attn_intervention_start, "an integer >= 0",
        )

    def is_checkpoint_step(self, step: int) -> bool:
        return (
            step == 0
            or step == self.steps
            or step % self.checkpoint_every == 0
            or (step <= self.checkpoint_early_until and step % self.checkpoint_every_early == 0)
            or step in self.checkpoint_steps
        )


@dataclass
class RunConfig:
    """Everything that defines a training run."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        for name, kind in (("data", DataConfig), ("model", ModelConfig), ("train", TrainConfig)):
            if not isinstance(getattr(self, name), kind):
                raise ConfigError(f"{name} must be a {kind.__name__}, got {getattr(self, name)!r}")
        _require(
            self.model.n_ctx == 0 or self.model.n_ctx >= self.data.seq_len,
            "model.n_ctx", self.model.n_ctx, f"0 or >= data.m * data.n = {self.data.seq_len}",
        )

    @property
    def n_ctx(self) -> int:
        return self.model.n_ctx or self.data.seq_len

    def to_dict(self) -> dict[str, dict[str, Any]]:
        out = dataclasses.asdict(self)
        out["train"]["checkpoint_steps"] = list(self.train.checkpoint_steps)
        return out

    def differences(self, other: RunConfig, ignore: tuple[str, ...] = ()) -> dict[str, tuple[Any, Any]]:
        """`{"section.key": (self's value, other's value)}` for every key that differs, but those in
        `ignore` (a run resumes under a config whose only differences are in `("train.steps",)`)."""
        mine, theirs = self.to_dict(), other.to_dict()
        return {f"{s}.{k}": (mine[s][k], theirs[s][k]) for s in mine for k in mine[s]
                if mine[s][k] != theirs[s][k] and f"{s}.{k}" not in ignore}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunConfig:
        if not isinstance(raw, dict):
            raise ConfigError(f"a run config of type {type(raw).__name__} is invalid: allowed a mapping with sections data, model, train")
        unknown = set(raw) - {"data", "model", "train"}
        if unknown:
            raise ConfigError(f"unknown config section(s) {sorted(unknown, key=str)}: allowed data, model, train")
        sections = {}
        for name, kind in (("data", DataConfig), ("model", ModelConfig), ("train", TrainConfig)):
            values = raw.get(name) or {}
            if not isinstance(values, dict):
                raise ConfigError(f"config section {name}={values!r} is invalid: allowed a mapping of keys to values")
            allowed = {f.name for f in fields(kind)}
            bad = sorted(set(values) - allowed, key=str)
            if bad:
                raise ConfigError(f"unknown key(s) {[f'{name}.{k}' for k in bad]}: allowed {sorted(allowed)}")
            sections[name] = kind(**values)
        return cls(**sections)

    def to_yaml(self, path: str | Path | None = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_yaml(cls, path: str | Path) -> RunConfig:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ConfigError(f"config file {str(path)!r} cannot be read ({e.strerror or e}): allowed a readable YAML file") from e
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML ({' '.join(str(e).split())}): "
                              f"allowed a mapping with sections data, model, train") from e
        return cls.from_dict(raw)

    def override(self, assignments: list[str] | dict[str, Any]) -> RunConfig:
        """A copy with dotted keys replaced: `["train.lr=3e-4", "model.n_heads=4"]`.

        Values are parsed as YAML scalars, so `1e-3`, `true` and `[1, 2]` mean what they say.
        """
        if isinstance(assignments, dict):
            pairs = list(assignments.items())
        else:
            pairs = []
            for item in assignments:
                if "=" not in item:
                    raise ConfigError(f"override {item!r} is invalid: allowed section.key=value, e.g. train.lr=1e-3")
                key, text = item.split("=", 1)
                try:
                    value = yaml.safe_load(text)
                except yaml.YAMLError:
                    raise ConfigError(f"{key.strip()}={text!r} is not a YAML value: allowed e.g. 3, 1e-3, true, [1, 2], cpu") from None
                pairs.append((key.strip(), value))
        raw = self.to_dict()
        for key, value in pairs:
            section, _, name = key.partition(".")
            if section not in raw or not name:
                raise ConfigError(f"override key {key!r} is invalid: allowed data.*, model.* or train.*")
            if name not in raw[section]:
                raise ConfigError(f"unknown key {key!r}: allowed {sorted(raw[section])}")
            if isinstance(value, str) and isinstance(raw[section][name], float):
                try:
                    value = float(value)  # YAML reads "1e-3" as a string
                except ValueError:
                    raise ConfigError(f"{key}={value!r} has the wrong type: expected float") from None
            raw[section][name] = value
        return RunConfig.from_dict(raw)


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


PRESETS = {"paper": _paper, "cpu": _cpu, "tiny": _tiny}


def preset(name: str) -> RunConfig:
    """A fresh copy of the named preset."""
    if name not in PRESETS:
        raise ConfigError(f"preset={name!r} is unknown: allowed {sorted(PRESETS)}")
    return PRESETS[name]()
