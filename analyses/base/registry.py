"""The one list of analyses: the report, `mechlrmc analyze NAME RUN` and the notebooks all use it.

Each `Analysis` names two functions of its module, given as "module:function" so that reading the
list imports nothing:
- `tables(ctx) -> dict[str, DataFrame]`: what it measures (written as NAME.csv by the CLI);
- `figures(ctx, tables) -> dict[str, Part]`: what it shows, in order (the report's section; the
  CLI writes each figure and page as NAME.html and each DataFrame as NAME.csv).
`ctx` is an `analyses.base.context.Context`. An entry also states the finding it reproduces
(docs/FINDINGS.md), what the run's task must support (`Task.supports`, e.g. "matrix" for LRMC's
row/column structure, "generation" for greedy outputs; by default nothing, so a new analysis applies to
every task), the parts of the model's anatomy it reads (`mechlrmc.anatomy`: "pattern", "z", "resid",
...; every entry reads any model, mechlrmc's or a user's, only through its anatomy and its task) and
the context it needs (a family, interventions).

Adding an analysis is one module (its plain functions, plus these two) and one entry below.

    from analyses.base.registry import get
    ctx = Context(Run("checkpoints/cpu"))
    tables = get("taxonomy").compute(ctx)          # {"taxonomy": ..., "taxonomy_structured": ...}
    parts = get("taxonomy").draw(ctx, tables)      # {"taxonomy": go.Figure, ...}
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from mechlrmc.errors import OptionError

if TYPE_CHECKING:
    import pandas as pd


@dataclass(frozen=True)
class Option:
    """An extra flag of `mechlrmc analyze NAME`, stored in `ctx.options[dest]`."""

    flag: str
    help: str
    type: type = str
    nargs: str | None = None
    choices: tuple | None = None

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


@dataclass(frozen=True)
class Analysis:
    name: str
    title: str
    finding: str  # "finding 4", "findings 1-11", "P1" ... (docs/FINDINGS.md)
    caption: str  # one line: what it shows
    tables: str | Callable  # "module:function" (or the function), (ctx) -> dict[str, DataFrame]
    figures: str | Callable  # "module:function" (or the function), (ctx, tables) -> dict[str, Part]
    requires: tuple[str, ...] = ()  # what the run's task must support (`Task.supports`: "matrix", "generation", ...)
    needs: str | None = None  # a Context field that must be set ("family", "interventions")
    options: tuple[Option, ...] = ()
    steps: str = "around_drop"  # default step selection of `mechlrmc analyze NAME`
    parts: tuple[str, ...] = ()  # the anatomy parts it reads ("pattern", "z", "resid", ...): it applies where the
    # model's anatomy has them
    data: bool = True  # needs the run's data (its task's batches; a recorded loop's recorded batch)

    @staticmethod
    def _resolve(target):
        if callable(target):  # an analysis defined in a notebook or a test
            return target
        module, name = target.split(":")
        return getattr(importlib.import_module(f"analyses.{module}"), name)

    def compute(self, ctx) -> dict[str, pd.DataFrame]:
        return self._resolve(self.tables)(ctx)

    def draw(self, ctx, tables: dict[str, pd.DataFrame]) -> dict[str, Any]:
        return self._resolve(self.figures)(ctx, tables)

    def applies(self, ctx) -> bool:
        """Whether the entry applies to the context's run: its task supports what the entry
        requires, and the context has what it needs."""
        if not set(self.requires) <= ctx.run.config.task.supports:
            return False
        if self.data and not ctx.run.config.task.has_data and ctx.run.recorded_batch() is None:
            return False
        if self.parts and not _anatomy_has(ctx, self.parts):
            return False
        return self.needs is None or getattr(ctx, self.needs) is not None


def _anatomy_has(ctx, parts: tuple[str, ...]) -> bool:
    """Whether the run's model has `parts` (False where its model cannot be rebuilt)."""
    from mechlrmc.errors import UsageError

    try:
        return ctx.anatomy.has(*parts)
    except UsageError:
        return False


def _entry(name, title, finding, caption, module, **kw) -> Analysis:
    return Analysis(name, title, finding, caption, f"{module}:{name}_tables", f"{module}:{name}_figures", **kw)


ANALYSES: list[Analysis] = [
    _entry("overview", "Run", "findings 1-11", "The task, model and training recipe, and the detected phases.",
           "report.adapters", data=False),
    _entry("family", "In its family", "run families",
           "Where this run's drop step and final L_mask sit among the seeds of its recipe (a shipped family "
           "summary), and how close its machine type is to the family's.", "report.adapters", requires=("matrix",), needs="family"),
    _entry("phases", "Loss curves and phases", "finding 1",
           "The losses with the detected plateau and drop (LRMC: L, L_obs and L_mask against the copy-and-zero "
           "level E[X^2]; a sequence task: the outputs' cross-entropy, greedy accuracy and repetition).", "plateau.adapters",
           steps="all", data=False),
    _entry("llc", "Local learning coefficient", "finding 1",
           "The calibrated LLC (SGLD estimate of the effective dimension, halved; settings chosen once per run and "
           "checked: checkpoints whose diagnostics fail are hollow) at the plateau, drop and end checkpoints under the "
           "loss curves: does the drop show as a change in the model's effective complexity?", "llc.adapters"),
    _entry("copy", "Copy check", "finding 2",
           "MASK replaced by a value token: before the drop the output is the inserted value (copying); after "
           "it the model still mostly copies (the token looks observed) but pulls the entry toward the value "
           "the rest of the matrix implies, so the error against the inserted value grows.", "completion.adapters", requires=("matrix",),
           options=(Option("--values", "inserted values (default -0.8 -0.24 0 0.44 0.8)", float, "+"),)),
    _entry("baselines", "Nuclear norm and copy-and-zero across p_mask", "finding 3",
           "The final model against nuclear-norm minimisation and copy-and-zero for p_mask 0.1-0.6: MSE on masked "
           "entries and nuclear norm of the completed matrices.", "completion.adapters", requires=("matrix",),
           options=(Option("--step", "checkpoint to evaluate (default the last)", int),
                    Option("--n-matrices", "matrices per p_mask / OOD variant", int),
                    Option("--p-masks", "p_mask values (default 0.1 to 0.6)", float, "+"))),
    _entry("ood", "Out of distribution", "finding 3",
           "Other rank, fewer rows or columns, Gaussian and Laplace factors: masked MSE relative to copy-and-zero.",
           "completion.adapters", requires=("matrix",), options=(Option("--step", "checkpoint to evaluate (default the last)", int),
                                 Option("--n-matrices", "matrices per OOD variant", int),
                                 Option("--layout", "how smaller matrices meet the trained position grid", str,
                                        choices=("pad", "gather")))),
    _entry("taxonomy", "Head taxonomy over time", "finding 4",
           "Share of each head's attention on the query's row, column, itself or observed keys, per checkpoint "
           "(random masks, and the fixed structured mask); letters: R row, C column, S self, O observed-only; "
           "and the step from which each head keeps its final label; a token task: the share on its optimal map, the previous "
           "token, the query itself and the first token.", "attention.adapters", steps="all", parts=("pattern",)),
    _entry("views", "Attention at the key checkpoints", "finding 4, P3",
           "circuitsvis patterns of every head averaged over the analysis batch (random masks, or sequences) and "
           "for one example, on the plateau, at the drop and at the end.", "attention.adapters", parts=("pattern",),
           options=(Option("--views", "steps to draw (default: the key checkpoints)", int, "+"),)),
    _entry("scrubber", "Attention across training", "finding 4, P3",
           "Every head's average attention pattern at every checkpoint behind one slider, titled with its "
           "taxonomy label (LRMC: the row and column heads forming) or its share on the task's optimal map.",
           "attention.adapters", steps="all", parts=("pattern",)),
    _entry("ablation", "Head and component ablation", "finding 5",
           "Change in the task's loss (LRMC: L_mask) when one head, or one layer's attention or MLP output, is zeroed "
           "or mean-ablated: which heads and components the task needs.", "causal.adapters", parts=("z",),
           options=(Option("--kinds", "ablations (default zero mean)", str, "+", ("zero", "mean", "uniform")),)),
    _entry("patching", "Activation patching", "finding 6",
           "Recovery of the clean output when clean activations of one head / layer / position are patched into "
           "the run on a corrupted matrix (-X by default).", "causal.adapters", requires=("matrix",),
           parts=("embed", "resid", "attn_out", "mlp_out", "z"),
           options=(Option("--corruption", "corruption of the clean matrices", str,
                           choices=("negate", "resample", "shuffle_rows")),)),
    _entry("attribution", "Attribution patching", "finding 6",
           "The first-order estimate of patching, (clean - corrupted activation) x gradient, and integrated "
           "gradients along each layer's clean-to-corrupted path, against exact patching for every site at the "
           "key checkpoints: where each estimate holds and fails.",
           "causal.adapters", requires=("matrix",), parts=("embed", "resid", "attn_out", "mlp_out", "z")),
    _entry("sequence_patching", "Activation patching and attribution", "finding 6, P4",
           "Recovery of the clean answer's logit difference when one site's clean activation (per layer and "
           "position; z per head) is patched into a run on other sequences of the batch: exact patching beside its "
           "first-order estimate, on the plateau, at the drop and at the end.", "causal.adapters",
           requires=("generation",), parts=("embed", "resid", "attn_out", "mlp_out", "z")),
    _entry("probes", "Linear probes", "finding 7",
           "Test R^2 of linear probes at masked positions, per layer and checkpoint: which layer stores the entry, "
           "its row and column and the singular vectors (a token task: the input, the window on its optimal map and the "
           "output at each output position), and from when.", "representations.adapters",
           parts=("embed", "resid"), requires=("probes",),
           options=(Option("--targets", "comma-separated probe targets (default: the task's, LRMC value,row,col,u,v)"),)),
    _entry("embeddings", "Embeddings", "finding 8",
           "Token-embedding symmetry and sign/magnitude PCs, position clustering by column, and the loss with "
           "permuted position embeddings.", "representations.adapters", requires=("matrix",), parts=("tables",)),
    _entry("swaps", "Component swaps", "finding 9",
           "Losses of the post-drop model with components from the pre-drop checkpoint, and the reverse.", "weights.adapters", parts=("components",),
           options=(Option("--pre", "pre-drop step (default: the plateau checkpoint)", int),
                    Option("--post", "post-drop step (default: the last)", int),
                    Option("--components", "';'-separated component sets, e.g. 'attn;qkv;~attn'"))),
    _entry("dynamics", "Plateau dynamics", "P1-P3",
           "Repetition of masked predictions, collapse of hidden states and attention share on the optimal "
           "row/column map across checkpoints.", "plateau.adapters", requires=("matrix",), steps="all",
           parts=("embed", "resid", "final", "pattern")),
    _entry("plateau_dynamics", "Plateau dynamics in the plateau paper's definitions", "P1-P4",
           "Repetition of the greedy outputs against the truth's, collapse of the hidden states at every layer, "
           "each head's attention on the task's optimal map, and the accuracy of every output position, at "
           "every checkpoint.", "plateau.adapters", requires=("generation",), steps="all"),
    _entry("learning_times", "Learning times of the outputs", "P4",
           "Each output position's score (a token task: greedy accuracy; LRMC: 1 - masked MSE / copy-and-zero) "
           "across the checkpoints: the two checkpoints that bracket its change, and a logistic curve's onset and "
           "width where checkpoints lie inside the rise; positions that do not fit named as such. Does the model "
           "learn all outputs at once, or in order?", "plateau.adapters",
           requires=("position_scores",), steps="all"),
    _entry("early_warning", "Early warnings of the drop", "P3",
           "Every trajectory measure (attention progress per head, collapse, repetition, weight and gradient norms "
           "per component, the top Hessian eigenvalue, the essential dynamics) against the drop: the step at which "
           "it has covered 10 % and 50 % of its change, and its lead over the drop, in steps and in plateau lengths.", "plateau.adapters",
           steps="all", options=(Option("--hessian", "also the top Hessian eigenvalue at every checkpoint (slow; "
                                        "default no; the family report has it)", str, choices=("yes", "no")),)),
    _entry("interventions", "Attention intervention", "P5, finding 11",
           "Runs trained with attention scaled toward the optimal map by c: plateau length against c.", "plateau.adapters", requires=("matrix",),
           needs="interventions", options=(Option("--interventions", "a `mechlrmc analyze intervention` folder"),)),
]


GROUPS = {"attention": ("phases", "taxonomy", "views", "scrubber")}  # CLI names for several entries


def get(name: str) -> Analysis:
    for analysis in ANALYSES:
        if analysis.name == name:
            return analysis
    raise OptionError(f"analysis {name!r} is not registered: allowed {[a.name for a in ANALYSES]}")


def applicable(ctx) -> list[Analysis]:
    """The entries that apply to the context's run (its task) and have what they need."""
    return [a for a in ANALYSES if a.applies(ctx)]
