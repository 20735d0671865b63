"""The plateau paper's sequence tasks in its token format (docs/FINDINGS.md, P0), shared by
`mws`, `prefix_sum` and `reverse`: each task says only how outputs follow from inputs and where a
solving head looks.

A sequence is `length` inputs uniform in 1..max_value, the separator token `modulus`, then
`length` outputs in 0..modulus-1: vocabulary 0..modulus (modulus + 1 ids), 2 * length + 1 tokens.
The model reads tokens 0..2L-1 causally and predicts tokens 1..2L (next-token prediction).

Metrics: `loss` (the training objective, next-token cross-entropy over every position, inputs
included, as the paper trains), `loss_out` and `acc_out` (cross-entropy and accuracy on the output
positions, teacher-forced). At evaluation also `greedy_acc` (outputs generated greedily from the
L + 1 token prompt), `rep` (fraction of consecutive equal generated outputs) beside `rep_true` (the
same for the true outputs), `attn_on_map` (share of |attention| on the optimal cells over the
query rows from the separator on, averaged over batch, layers and heads) and `collapse` (mean
pairwise cosine of the final hidden states between output positions).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import ClassVar

import torch
import torch.nn.functional as F

from mechlrmc import measures
from mechlrmc.sites import Sites
from mechlrmc.tasks.base import Task, TaskConfig
from mechlrmc.validation import check_types, require


@dataclass
class SequenceConfig(TaskConfig):
    """`length` inputs uniform in 1..`max_value`, a separator (token `modulus`), `length` outputs."""

    task: ClassVar[str] = "sequence"

    length: int = 16
    max_value: int = 16
    modulus: int = 17

    def __post_init__(self) -> None:
        check_types(self, "data")
        require(self.length >= 1, "data.length", self.length, "an integer >= 1")
        require(self.max_value >= 1, "data.max_value", self.max_value, "an integer >= 1")
        require(self.modulus > self.max_value, "data.modulus", self.modulus,
                f"an integer > data.max_value={self.max_value} (the largest input)")

    @property
    def seq_len(self) -> int:
        return 2 * self.length + 1

    @property
    def vocab_size(self) -> int:
        return self.modulus + 1

    @property
    def separator(self) -> int:
        return self.modulus


@dataclass
class SequenceBatch:
    """Whole sequences [batch, 2L+1]; the model reads `tokens` [batch, 2L] and predicts `targets`."""

    sequences: torch.Tensor  # [batch, 2L+1] long
    cfg: SequenceConfig  # the data config it was sampled from
    description: ClassVar[str] = "sequences"  # what the examples of a batch are, for captions
    example_caption: ClassVar[str] = "inputs x, outputs y"

    @property
    def task(self) -> str:
        """The name of the task it was sampled for."""
        return self.cfg.task

    @property
    def length(self) -> int:
        return self.cfg.length

    @property
    def tokens(self) -> torch.Tensor:
        return self.sequences[:, :-1]

    @property
    def targets(self) -> torch.Tensor:
        return self.sequences[:, 1:]

    @property
    def scored(self) -> torch.Tensor:
        """[2L] bool: the positions whose target is an output (the separator's position on)."""
        return torch.arange(2 * self.length, device=self.sequences.device) >= self.length

    @property
    def inputs(self) -> torch.Tensor:
        return self.sequences[:, :self.length]

    @property
    def outputs(self) -> torch.Tensor:
        return self.sequences[:, self.length + 1:]

    @property
    def prompt(self) -> torch.Tensor:
        """The inputs and the separator [batch, L+1]."""
        return self.sequences[:, :self.length + 1]

    def __len__(self) -> int:
        return self.sequences.shape[0]

    def position_names(self) -> list[str]:
        """Names of the model's input positions: `x1..xL`, `SEP`, `y1..y(L-1)`."""
        n = self.length
        return [f"x{i}" for i in range(1, n + 1)] + ["SEP"] + [f"y{j}" for j in range(1, n)]

    def example_names(self, example: int) -> list[str]:
        """Each position of one example named with its token: `x1:7`."""
        return [f"{name}:{t}" for name, t in zip(self.position_names(), self.tokens[example].tolist())]

    def example_rows(self, example: int) -> list[list[tuple[str, bool]]]:
        """One example as table rows of (cell text, greyed): its inputs, then its outputs."""
        return [[(name, True)] + [(str(v), False) for v in values.tolist()]
                for name, values in (("x", self.inputs[example]), ("y", self.outputs[example]))]

    def to(self, device: torch.device | str) -> SequenceBatch:
        return replace(self, sequences=self.sequences.to(device))

    def __getitem__(self, index: slice | torch.Tensor) -> SequenceBatch:
        return replace(self, sequences=self.sequences[index])


class SequenceTask(Task):
    """A task of the token format above; a subclass gives `outputs` and `map_keys`."""

    readout = "vocab"
    causal = (True,)
    mask_token = False
    train_metrics = ("loss", "loss_out", "acc_out")
    eval_metrics = ("loss", "loss_out", "acc_out", "greedy_acc", "rep", "rep_true", "attn_on_map", "collapse")
    progress = {"L": "loss", "acc": "acc_out"}
    summary_metrics = ("eval_loss", "eval_acc_out", "eval_greedy_acc", "eval_rep", "eval_rep_true")
    phase_metric = "loss_out"
    phase_label = "eval cross-entropy on the outputs"
    final_metrics = ("loss", "loss_out", "greedy_acc", "rep")
    generates = True
    supports = frozenset({"generation", "optimal_map", "position_scores", "probes"})
    probe_names = ("output", "window", "input")
    probe_defaults = ("output", "window", "input")
    probe_focus = "outputs"

    def outputs(self, cfg: SequenceConfig, inputs: torch.Tensor) -> torch.Tensor:
        """The true outputs [batch, L] (long, in 0..modulus-1) of inputs [batch, L]."""
        raise NotImplementedError

    def map_keys(self, cfg: SequenceConfig, j: int) -> list[int]:
        """The key positions (0-based, in the model's input) a solving head attends to when the
        model predicts output j (1-based), i.e. at query position L + j - 1."""
        raise NotImplementedError

    def sample(self, cfg: SequenceConfig, batch_size: int, generator: torch.Generator) -> SequenceBatch:
        inputs = torch.randint(1, cfg.max_value + 1, (batch_size, cfg.length), generator=generator)
        separator = torch.full((batch_size, 1), cfg.separator, dtype=torch.long)
        sequences = torch.cat([inputs, separator, self.outputs(cfg, inputs)], dim=1)
        return SequenceBatch(sequences=sequences, cfg=cfg)

    def static_map(self, cfg: SequenceConfig) -> torch.Tensor:
        """[2L, 2L] bool: the optimal map, the same for every sequence; rows before the separator empty."""
        n = cfg.length
        on_map = torch.zeros(2 * n, 2 * n, dtype=torch.bool)
        for j in range(1, n + 1):
            on_map[n + j - 1, self.map_keys(cfg, j)] = True
        return on_map

    def probe_targets(self, batch: SequenceBatch, names) -> dict[str, torch.Tensor]:
        """At the query that predicts output j (position L + j - 1): `output` y_j, `window` the sum of
        the inputs on its optimal map (MWS: x_(j-1) + x_j before the modulus; prefix sum: x_1 + ... + x_j;
        reverse: the one input it copies) and `input` the last of them alone (MWS: x_j). Other
        positions are 0 (they are not scored)."""
        names, n, b = self.check_probe_targets(names), batch.length, len(batch)
        keys = [self.map_keys(batch.cfg, j) for j in range(1, n + 1)]
        values = {"output": batch.outputs.double(),
                  "window": torch.stack([batch.tokens[:, k].double().sum(1) for k in keys], 1),
                  "input": torch.stack([batch.tokens[:, k[-1]].double() for k in keys], 1)}
        out = {}
        for name in names:
            full = torch.zeros(b, 2 * n, dtype=torch.float64)
            full[:, n:] = values[name].cpu()
            out[name] = full.reshape(-1, 1)
        return out

    def probe_positions(self, batch: SequenceBatch) -> dict[str, torch.Tensor]:
        return {"outputs": batch.scored.cpu().repeat(len(batch))}

    def patch_metric(self, clean: SequenceBatch, corrupted: SequenceBatch):
        """The logit difference `LD(logits [..., batch, pos, vocab]) -> [...]`: the mean over the scored
        positions whose clean and corrupted targets differ of logit[clean target] - logit[corrupted target]."""
        scored = clean.scored.to(clean.tokens.device)
        differ = (clean.targets != corrupted.targets) & scored  # [b, pos]
        good, bad = clean.targets.clamp_min(0), corrupted.targets.clamp_min(0)
        weight = differ.float() / differ.sum().clamp_min(1)

        def ld(logits: torch.Tensor) -> torch.Tensor:
            gap = logits.gather(-1, good.expand(*logits.shape[:-1])[..., None]).squeeze(-1) \
                - logits.gather(-1, bad.expand(*logits.shape[:-1])[..., None]).squeeze(-1)
            return (gap * weight).sum((-2, -1))

        return ld

    def reference_rows(self, batch: SequenceBatch) -> torch.Tensor:
        """The queries from the separator on: those that predict an output."""
        return batch.scored.cpu()

    def optimal_attention_map(self, batch: SequenceBatch) -> torch.Tensor:
        """[batch, 2L, 2L] bool (`static_map` for every sequence)."""
        return self.static_map(batch.cfg).to(batch.sequences.device).expand(len(batch), -1, -1)

    def loss(self, logits: torch.Tensor, batch: SequenceBatch) -> dict[str, torch.Tensor]:
        logits, targets, scored = logits.float(), batch.targets, batch.scored
        ce = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # [batch, 2L]
        correct = (logits.argmax(-1) == targets).float()
        return {"loss": ce.mean(), "loss_out": ce[:, scored].mean(), "acc_out": correct[:, scored].mean()}

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, batch: SequenceBatch, sites: Sites | None = None) -> dict[str, float]:
        """The losses, the greedy accuracy and repetition of the generated outputs (and of the
        truth), the share of attention on the optimal map (every attention site) and the collapse
        at the final hidden site across the outputs: the plateau paper's measures
        (`mechlrmc.measures`). `sites` (`mechlrmc.sites`; default: those of mechlrmc's own model)
        says where a model's internals are read; a measure without its site is NaN."""
        sites = Sites.of(model) if sites is None else sites
        device = next(model.parameters()).device
        batch = batch.to(device)
        logits, acts = sites.capture(model, batch.tokens)
        out = {k: float(v) for k, v in self.loss(logits, batch).items()}
        generated = measures.greedy_generate(model, batch.prompt, batch.length)
        out["greedy_acc"] = float((generated == batch.outputs).float().mean())
        out["rep"] = measures.consecutive_repetition(generated)
        out["rep_true"] = measures.consecutive_repetition(batch.outputs)
        on_map = self.optimal_attention_map(batch)
        patterns = sites.patterns(acts)
        out["attn_on_map"] = (float(torch.stack([measures.attention_share(p, on_map) for p in patterns]).mean())
                              if patterns else math.nan)
        final = sites.final
        out["collapse"] = measures.mean_pairwise_cosine(acts[final], batch.scored) if final else math.nan
        return out

    def plateau(self, cfg: SequenceConfig, n: int = 1 << 16) -> dict[str, float]:
        """The no-information level of the outputs: a model that predicts every output from its
        marginal distribution (ignoring the inputs) has `loss_out` = mean_j H(y_j) and `acc_out` =
        mean_j max_v P(y_j = v). The marginals are counted on `n` sequences of a fixed generator
        (the entropy is biased by about (modulus - 1) / 2n nats: < 2e-4 by default). On MWS
        (k = 2, p = 17) this is 2.829 nats and 0.0625; the observed plateau sits at the level with
        output 1 (a copy of x_1) solved, 15/16 of it (P4, docs/FINDINGS.md): `loss_out_first_solved`
        and `acc_out_first_solved`."""
        batch = self.sample(cfg, n, torch.Generator().manual_seed(0))
        counts = F.one_hot(batch.outputs, cfg.modulus).sum(0).double()  # [L, modulus]
        p = counts / n
        entropy = -(p * p.clamp_min(1e-300).log()).sum(-1)  # [L]
        best = p.max(-1).values
        tail = slice(1, None) if cfg.length > 1 else slice(0, 0)
        return {"loss_out": float(entropy.mean()), "acc_out": float(best.mean()),
                "loss_out_first_solved": float(entropy[tail].sum() / cfg.length),
                "acc_out_first_solved": float((1.0 + best[tail].sum()) / cfg.length)}

    @torch.no_grad()
    def position_scores(self, model: torch.nn.Module, batch: SequenceBatch) -> torch.Tensor:
        """[L]: the accuracy of each output position generated greedily from the prompt (P4)."""
        generated = measures.greedy_generate(model, batch.prompt, batch.length)
        return (generated == batch.outputs).float().mean(0)

    def phase_columns(self, evals, drop_index: int, band, window: int) -> dict[str, float]:
        """The greedy accuracy (median) and the largest repetition on the plateau band, the
        truth's repetition, and the final greedy accuracy."""
        before = evals.iloc[band[0]:band[-1] + 1] if len(band) else evals.iloc[1:drop_index]
        return {"plateau_greedy_acc": float(before.eval_greedy_acc.median()),
                "plateau_max_rep": float(before.eval_rep.max()),
                "rep_true": float(evals.eval_rep_true.median()),
                "final_greedy_acc": float(evals.eval_greedy_acc.iloc[-1])}

    def summary(self, row) -> str:
        return (f"eval loss={row.eval_loss:.4g} acc_out={row.eval_acc_out:.3f} greedy_acc={row.eval_greedy_acc:.3f} "
                f"rep={row.eval_rep:.3f} (truth {row.eval_rep_true:.3f})")
