"""The analysis layer: plain functions from (model, batch) or (run, steps) to tidy DataFrames,
each with a sibling `plot_*` that draws it. `across_checkpoints` maps any of them over a run.
`ANALYSES` (analyses.base.registry) is the one list of analyses that the report, `mechlrmc analyze`
and the notebooks share; each takes a `Context` (the run and what its analyses share).

Names load lazily: `import analyses` is instant, and `analyses.head_taxonomy` imports
`analyses.attention.heads` on first use (so the `mechlrmc` command starts without the whole layer)."""

from __future__ import annotations

import importlib

_EXPORTS = {  # module -> the names it exports here
    "mechlrmc.components": ("COMPONENTS", "FREEZE_SET", "SWAP_SET", "component_params", "model_component_params"),
    "mechlrmc.measures": ("consecutive_repetition", "greedy_generate", "mean_pairwise_cosine"),
    "attention.figures": ("plot_attention_scrubber", "plot_taxonomy"),
    "attention.heads": ("default_structured_mask", "head_map_share", "head_onsets", "head_taxonomy", "label_heads",
                        "score_pattern", "structured_taxonomy"),
    "attention.scrubber": ("pattern_frame", "scrub_data"),
    "attention.views": ("attention_page", "save_attention_scrubber", "save_attention_views"),
    "base.cache": ("cache_hooks", "chunked_cache", "mean_patterns", "pattern_names"),
    "base.context": ("Budget", "Context"),
    "base.registry": ("ANALYSES", "Analysis", "applicable", "get"),
    "base.store": ("cached",),
    "base.walk": ("across_checkpoints", "analysis_batch", "select_steps"),
    "causal.ablation": ("ablate", "ablation_edits", "head_ablation_sweep", "mean_z"),
    "causal.agreement": ("attribution_agreement", "attribution_verdict", "compare_with_patching"),
    "causal.attribution": ("attribution", "attribution_sweep"),
    "causal.figures": ("plot_ablation", "plot_attribution_vs_patching", "plot_patching", "plot_patching_steps",
                       "plot_sequence_patching"),
    "causal.integrated_gradients": ("diagonal_groups", "integrated_gradients_sweep",
                                    "joint_integrated_gradients_sweep"),
    "causal.patching": ("batched_outputs", "batched_sweep", "corrupt", "patching", "recovery_metrics", "stock_sweep"),
    "causal.sequence_patching": ("patching_agreement", "sequence_patching"),
    "completion.baselines": ("compare_baselines", "copy_zero_predict", "evaluate_ood", "model_predict",
                             "nuclear_norm_complete", "ood_variants"),
    "completion.copying": ("copy_check", "summarize_copy"),
    "completion.figures": ("plot_baselines", "plot_copy", "plot_ood"),
    "family.figures": ("plot_drop_steps", "plot_drop_variance", "plot_family_curves", "plot_run_in_family",
                        "plot_scaling", "plot_survival"),
    "family.findings": ("CRITERIA", "family_findings", "findings_table", "key_steps"),
    "family.sequence_findings": ("SEQUENCE_CRITERIA", "intervention_findings", "sequence_run_findings"),
    "family.summary": ("across_runs", "drop_sharpness", "family_runs", "family_summary", "find_family",
                       "place_in_family", "varied_keys"),
    "family.scaling_power": ("power_law_power", "power_law_power_table"),
    "family.survival": ("drop_survival", "k_of_n", "logrank", "median_drop", "power_law_check", "power_law_checks",
                        "scaling_exponent", "scaling_exponents"),
    "family.variance": ("drop_grid", "drop_variance", "variance_verdict"),
    "llc.adapters": ("run_component_llc",),
    "llc.calibrate": ("Calibration", "calibrate"),
    "llc.known": ("dln_learning_coefficient", "dln_posterior_llc", "rrr_learning_coefficient"),
    "llc.components": ("component_changes", "component_llc", "component_masks", "model_components"),
    "llc.data": ("SGLDConfig",),
    "llc.estimator": ("llc_per_step", "local_learning_coefficient"),
    "llc.figures": ("plot_component_llc", "plot_family_llc", "plot_llc", "plot_sgld_traces"),
    "llc.runs": ("family_llc",),
    "llc.sampler": ("llc_from_traces", "sgld_traces"),
    "plateau.dynamics": ("attention_progress", "collapse", "compare_interventions", "dynamics_summary",
                         "intervention_runs", "load_interventions", "repetition", "track_dynamics"),
    "plateau.early_warning": ("early_warning_table", "essential_dynamics", "family_early_warning", "milestones",
                              "run_trajectory", "top_hessian_eigenvalue", "warning_measures"),
    "plateau.figures": ("plot_drop_aligned", "plot_dynamics", "plot_interventions", "plot_learning_times",
                        "plot_lm_dynamics", "plot_native_dynamics", "plot_phases", "plot_sequence_phases"),
    "plateau.learning_times": ("fit_learning_times", "learning_order", "learning_times", "position_scores"),
    "plateau.lm_checkpoints": ("across_lm_checkpoints", "checkpoint_series", "lm_dynamics_summary",
                               "lm_repetition_collapse"),
    "plateau.phases": ("detect_phases", "steps_around_drop"),
    "plateau.sequences": ("attention_progress_native", "collapse_native", "native_measures", "partial_solution",
                          "repetition_native"),
    "report.family_report": ("build_family_report", "write_family_report"),
    "report.overview": ("run_facts",),
    "report.page": ("Page", "Section", "assemble"),
    "report.run_report": ("build_report", "write_report"),
    "representations.embeddings": ("embedding_geometry", "permuted_position_losses", "position_tsne",
                                   "token_embedding_plane"),
    "representations.figures": ("plot_embedding_geometry", "plot_position_tsne", "plot_probes",
                                "plot_token_embeddings"),
    "representations.probes": ("default_hooks", "first_step_encoded", "fit_probe", "probe", "probe_summary",
                               "probe_targets"),
    "weights.figures": ("plot_freeze", "plot_swaps"),
    "weights.freeze": ("freeze_info", "freeze_sweep", "freeze_train", "freeze_trainer", "half_plateau_step"),
    "weights.swaps": ("swap_grid", "swap_state", "swapped_model"),
}
_HOME = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_HOME)


def __getattr__(name: str):
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module 'analyses' has no attribute {name!r}")
    value = getattr(importlib.import_module(module if module.startswith("mechlrmc.") else f"analyses.{module}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
