"""What a task is: the protocol every module of `mechlrmc.tasks` implements.

A task owns
- its data config, a dataclass deriving from `TaskConfig` that validates its own fields
  (one-line `ConfigError`s) and says the sequence length and vocabulary it needs;
- what a batch is: a dataclass with `tokens [batch, pos]` (the model's input), its targets and
  which positions are scored, `to(device)`, `len` and indexing;
- `sample(cfg, batch_size, generator)` (on the CPU, so one seed is one data stream on any device)
  and `eval_batch(run_cfg)`, the fixed evaluation batch;
- `loss(output, batch)`: 0-d tensors named by `train_metrics`, `"loss"` the training objective;
- `evaluate(model, batch)`: floats named by `eval_metrics` (written to metrics.csv as `eval_NAME`);
- `optimal_attention_map(batch)`: `[batch, query, key]` bool, the cells a solving head attends to;
- `plateau(cfg)`: the analytic plateau level of its metrics, where one is known;
- `readout` ("scalar": one number per position; "vocab": logits over the vocabulary), the
  `model.causal` values it allows, and whether token 0 is a MASK token (`mask_token`);
- `presets`: named functions returning a `RunConfig`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, ClassVar

import mechlrmc
from mechlrmc.validation import ConfigError

if TYPE_CHECKING:
    import torch



class TaskConfig:
    """Base of every task's data config (a dataclass); `task` is the name it is registered under."""

    task: ClassVar[str]

    @property
    def seq_len(self) -> int:
        """Positions the model's position table needs."""
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def describe(self) -> str:
        """One line naming the task and its data settings (reports and summaries)."""
        import dataclasses

        return f"{self.task}: " + ", ".join(f"{f.name} {getattr(self, f.name)}" for f in dataclasses.fields(self))

    @property
    def seq_len_text(self) -> str:
        """The sequence length as a bad-input message states it (a task may say where it comes from)."""
        return str(self.seq_len)


class Task:
    name: ClassVar[str]
    config: ClassVar[type]
    readout: ClassVar[str] = "scalar"
    causal: ClassVar[tuple[bool, ...]] = (False, True)
    mask_token: ClassVar[bool] = False
    train_metrics: ClassVar[tuple[str, ...]] = ("loss",)
    eval_metrics: ClassVar[tuple[str, ...]] = ("loss",)
    progress: ClassVar[dict[str, str]] = {"L": "loss"}  # progress-bar label -> train metric
    summary_metrics: ClassVar[tuple[str, ...]] = ("eval_loss",)  # a sweep's summary.csv columns
    presets: ClassVar[dict[str, Callable[[], mechlrmc.config.RunConfig]]] = {}
    # What an analysis may ask of a task (the analysis layer never compares a task's name or class):
    phase_metric: ClassVar[str] = "loss"  # the eval metric whose drop defines the plateau and the drop
    copy_metric: ClassVar[str | None] = None  # near 0 from the plateau's start (copying), where the task has one
    phase_label: ClassVar[str] = "eval loss"  # how figures name the phase metric
    final_metrics: ClassVar[tuple[str, ...]] = ("loss",)  # eval metrics a family summary reports at a run's end
    generates: ClassVar[bool] = False  # outputs are generated greedily from a prompt (token tasks)
    has_data: ClassVar[bool] = True  # False: a recorded loop's own data, which mechlrmc cannot sample (`loop`)
    # what the task supports, named as analyses require it (`analyses.base.registry.Analysis.requires`):
    # "matrix" (m x n matrices with observed entries: row/column structure), "generation", "optimal_map",
    # "position_scores" (`position_scores` is defined)
    supports: ClassVar[frozenset[str]] = frozenset()

    @property
    def metric_columns(self) -> tuple[str, ...]:
        """The columns of a run's metrics.csv."""
        return ("step", *self.train_metrics, *(f"eval_{m}" for m in self.eval_metrics), "wall_time")

    def evaluations(self, metrics: Any) -> Any:
        """The rows of a run's metrics table that are evaluations (`eval_loss` not NaN), index reset."""
        return metrics[metrics.eval_loss.notna()].reset_index(drop=True)

    def check(self, run_cfg: mechlrmc.config.RunConfig) -> None:
        """Reject a model the task cannot use (one line naming the field and what is allowed)."""
        causal = run_cfg.model.causal
        if causal not in self.causal:
            need = "causal" if self.causal == (True,) else "bidirectional"
            raise ConfigError(f"model.causal={causal!r} is invalid for data.task={self.name!r}: allowed "
                              f"{' or '.join(map(str, self.causal))} (the task needs {need} attention)")
        if run_cfg.model.mask_embedding_zero and not self.mask_token:
            raise ConfigError(f"model.mask_embedding_zero=True is invalid for data.task={self.name!r}: "
                              f"allowed False (the task has no MASK token)")

    def sample(self, cfg: Any, batch_size: int, generator: torch.Generator) -> Any:
        raise NotImplementedError

    def eval_batch(self, run_cfg: mechlrmc.config.RunConfig, size: int | None = None, seed: int | None = None) -> Any:
        """The fixed evaluation batch of a run: the same data for every checkpoint."""
        import torch

        generator = torch.Generator().manual_seed(run_cfg.train.eval_seed if seed is None else seed)
        return self.sample(run_cfg.data, size or run_cfg.train.eval_batch_size, generator)

    def loss(self, output: torch.Tensor, batch: Any) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def evaluate(self, model: torch.nn.Module, batch: Any, sites: Any = None) -> dict[str, float]:
        """Floats named by `eval_metrics`; `sites` (`mechlrmc.sites.Sites`) says where to read the
        internals of a model that is not mechlrmc's own (default: its own sites)."""
        raise NotImplementedError

    def optimal_attention_map(self, batch: Any) -> torch.Tensor:
        raise NotImplementedError

    def plateau(self, cfg: Any) -> dict[str, float]:
        """Analytic plateau values of (some of) the metrics; empty where none is known."""
        return {}

    def phase_columns(self, evals: Any, drop_index: int, band: Any, window: int) -> dict[str, float]:
        """Task-specific columns of a run's phase table (`analyses.plateau.phases.detect_phases`):
        `evals` the evaluations by step, `drop_index` the row of the drop (len(evals) without one),
        `band` the rows before the drop whose smoothed phase metric sits on the plateau."""
        return {}

    def position_scores(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        """[outputs]: one score per output position that rises from the plateau (about 0 or chance)
        to 1 as the position is learned (`analyses.plateau.learning_times`); a task that defines it
        lists "position_scores" in `supports`."""
        raise NotImplementedError

    def position_names(self, batch: Any) -> list[str]:
        """A name for every position of the model's input (attention views label their axes with it)."""
        return [str(i) for i in range(batch.tokens.shape[1])]

    # ----- what the lenses ask of a task (`analyses`: one implementation of each lens for every task) -----
    probe_names: ClassVar[tuple[str, ...]] = ()  # the probe targets it declares ("probes" in `supports`)
    probe_defaults: ClassVar[tuple[str, ...]] = ()  # those probed by default
    probe_focus: ClassVar[str] = "all"  # the positions the report's probe figures read

    def lens_losses(self, output: torch.Tensor, batch: Any) -> dict[str, float]:
        """The losses ablation, swaps and freeze/retrain report for a model's `output` on `batch`
        (default: every loss of `loss`, the first the objective)."""
        return {k: float(v) for k, v in self.loss(output, batch).items()}

    def reference_maps(self, batch: Any) -> dict[str, torch.Tensor]:
        """{name: [batch, query, key] bool}: the cells the head taxonomy measures each head's share of
        attention on (a token task: its optimal map, the previous token, itself, the first token)."""
        import torch

        q = batch.tokens.shape[1]
        eye = torch.eye(q, dtype=torch.bool)
        maps = {"previous": eye.roll(-1, 1).tril(-1), "self": eye,
                "first": torch.zeros(q, q, dtype=torch.bool).index_fill_(1, torch.tensor([0]), True)}
        out = {name: m.expand(len(batch), q, q) for name, m in maps.items()}
        return {"optimal": self.optimal_attention_map(batch), **out} if "optimal_map" in self.supports else out

    def reference_rows(self, batch: Any) -> torch.Tensor:
        """[query] bool: the queries the head taxonomy averages over (default: every position)."""
        import torch

        return torch.ones(batch.tokens.shape[1], dtype=torch.bool)

    def patch_pair(self, batch: Any, shift: int = 1) -> Any:
        """The corrupted batch activation patching runs against: by default each example replaced by the
        one `shift` places on in the batch (other inputs from the same distribution, no new draw)."""
        import torch

        return batch[torch.arange(len(batch)).roll(-shift)]

    def patch_metric(self, clean: Any, corrupted: Any) -> Any:
        """`metric(output [..., batch, pos, ...]) -> [...]`: how far an output is toward the clean answer
        (patching's recovery is (metric(patched) - metric(corrupted)) / (metric(clean) - metric(corrupted)))."""
        raise NotImplementedError

    def probe_targets(self, batch: Any, names: Any) -> dict[str, torch.Tensor]:
        """{name: [batch * pos, k]} float64: each declared target at every position of the input."""
        raise NotImplementedError

    def probe_positions(self, batch: Any) -> dict[str, torch.Tensor]:
        """{group: [batch * pos] bool}: the positions probes are scored at, by group."""
        raise NotImplementedError

    def check_probe_targets(self, names: Any) -> list[str]:
        from mechlrmc.errors import OptionError

        names = list(names)
        bad = [n for n in names if n not in self.probe_names]
        if bad or not names:
            raise OptionError(f"probe target {bad[0] if bad else ''!r} is not declared by task {self.name!r}: allowed "
                              f"{list(self.probe_names)}")
        return names

    def summary(self, row: Any) -> str:
        """One line for the end of `mechlrmc train`, from a row of `Run.evals`."""
        return "eval " + " ".join(f"{m}={row[f'eval_{m}']:.4g}" for m in self.eval_metrics)
