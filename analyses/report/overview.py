"""A run at a glance: its task, model and recipe, its checkpoints and the detected phases."""

from __future__ import annotations

import pandas as pd

from mechlrmc.runs import Run


def run_facts(run: Run, phases: pd.Series, walked: list[int] | None = None, anatomy: str | None = None) -> pd.DataFrame:
    """Two columns ("", value): task, model, training, checkpoints, plateau and drop of `run`
    (`phases`: a row of `detect_phases`; `walked`: the checkpoints an analysis walks)."""
    cfg, p = run.config, phases
    task = cfg.data.describe()
    rows = [
        ("task", task),
        *model_rows(cfg, anatomy),
        ("checkpoints", f"{len(run.steps)}: {run.steps}"),
        *([("walked by the analyses", f"{walked}")] if walked is not None else []),
        _plateau(p),
        ("drop", (f"at step {p.drop_step}; L_mask after it {p.post_drop_loss_mask:.4g}" if "post_drop_loss_mask" in p
                  else f"at step {p.drop_step}; output cross-entropy after it {p.post_drop_loss_out:.4g}, final "
                       f"greedy accuracy {p.final_greedy_acc:.3f}") if p.dropped else "no drop detected"),
    ]
    return pd.DataFrame(rows, columns=["", "value"])


def _plateau(p: pd.Series) -> tuple[str, str]:
    if "plateau_loss_mask" in p:
        return ("plateau", f"L_mask {p.plateau_loss_mask:.4g} = {p.plateau_over_analytic:.2f} x the copy-and-zero "
                           f"level {p.analytic_loss_mask:.4g}, from step {p.plateau_start} to {p.plateau_end}")
    return ("plateau", f"output cross-entropy {p.plateau_loss_out:.4g} from step {p.plateau_start} to "
                       f"{p.plateau_end}: greedy accuracy {p.plateau_greedy_acc:.3f}, repetition up to "
                       f"{p.plateau_max_rep:.2f} (truth {p.rep_true:.2f})")


def model_rows(cfg, anatomy: str | None = None) -> list[tuple[str, str]]:
    """The model and training rows: mechlrmc's recipe, or what a recorded run knows of the user's
    (`anatomy`: `Anatomy.describe()` of its model, or why it could not be derived)."""
    if cfg.recorded:
        r = cfg.record
        sites = ", ".join([*(f"{k}: {v}" for k, v in r.sites.get("hidden", {}).items()),
                           *(f"attention: {a}" for a in r.sites.get("attention", []))]) or "none"
        missing = [text for kind, text in (
            ("hidden", "collapse during training (no hidden-state site: Recorder(sites={'final': 'module.name'}))"),
            ("attention", "attention on the optimal map during training (no attention site: Recorder(sites="
                          "{'attention': 'blocks.{L}.attn.pattern'}))")) if not r.sites.get(kind)]
        factory = f"{r.model_factory}" if r.model_factory else "(recorded without a factory)"
        rows = [("model", f"the user's own: {r.model_line()}; rebuilt by {factory}; sites read: {sites}"),
                ("training", f"the user's own loop, recorded by the {r.source} recorder: {cfg.train.steps} steps, "
                             f"evaluated every {cfg.train.eval_every}; the loop told: {r.loop_line()} (all in config.yaml, record.loop)")]
        if anatomy:
            rows.append(("anatomy", f"{anatomy} (the lenses read the model through it; `mechlrmc.anatomy`)"))
        return rows + ([("not measured", "; ".join(missing))] if missing else [])
    m = cfg.model
    model = (f"{'post-LN' if m.norm == 'post' else 'pre-LN'} {'causal' if m.causal else 'bidirectional'} "
             f"transformer, {m.attention} attention, {m.n_layers} layers x {m.n_heads} heads, d_model {m.d_model}, "
             f"d_mlp {m.d_mlp}")
    return [("model", model),
            ("training", f"{cfg.train.steps} steps, batch {cfg.train.batch_size}, Adam lr {cfg.train.lr:g}, seed "
                         f"{cfg.train.seed}")]
