"""The analysis layer: plain functions from (model, batch) or (run, steps) to tidy DataFrames,
each with a sibling `plot_*` that draws it. `across_checkpoints` maps any of them over a run."""

from analyses.walk import across_checkpoints, analysis_batch, models_at, select_steps  # noqa: F401
from analyses.cache import cache_hooks, chunked_cache, mean_patterns, pattern_names  # noqa: F401
from analyses.phases import detect_phases, plot_phases, steps_around_drop  # noqa: F401
from analyses.heads import default_structured_mask, head_taxonomy, label_heads, plot_taxonomy, score_pattern, structured_taxonomy  # noqa: F401
from analyses.views import attention_page, save_attention_views  # noqa: F401
from analyses.copying import copy_check, plot_copy, summarize_copy  # noqa: F401
from analyses.ablation import ablate, ablation_hooks, head_ablation_sweep, mean_z, plot_ablation  # noqa: F401
from analyses.baselines import compare_baselines, copy_zero_predict, evaluate_ood, model_predict, nuclear_norm_complete, ood_variants, plot_baselines, plot_ood  # noqa: F401
from analyses.dynamics import attention_progress, collapse, compare_interventions, intervention_runs, load_interventions, plot_dynamics, plot_interventions, repetition, track_dynamics  # noqa: F401
from analyses.components import COMPONENTS, FREEZE_SET, SWAP_SET, component_params, model_component_params  # noqa: F401
from analyses.probes import default_hooks, first_step_encoded, fit_probe, plot_probes, probe, probe_summary, probe_targets  # noqa: F401
from analyses.embeddings import embedding_geometry, permuted_position_losses, plot_embedding_geometry, plot_position_tsne, plot_token_embeddings  # noqa: F401
from analyses.patching import batched_outputs, batched_sweep, corrupt, patching, plot_patching, plot_patching_steps, recovery_metrics, stock_sweep  # noqa: F401
from analyses.swaps import plot_swaps, swap_grid, swap_state, swapped_model  # noqa: F401
from analyses.freeze import FreezeTrainer, drop_step, freeze_info, freeze_sweep, freeze_train, plot_freeze  # noqa: F401
from analyses.report import build_report, write_report  # noqa: F401
from analyses.family import across_runs, family_findings, family_runs, family_summary, findings_table, plot_drop_steps, plot_family_curves, varied_keys  # noqa: F401
from analyses.family_report import build_family_report, write_family_report  # noqa: F401
