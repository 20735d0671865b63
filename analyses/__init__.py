"""The analysis layer: plain functions from (model, batch) or (run, steps) to tidy DataFrames,
each with a sibling `plot_*` that draws it. `across_checkpoints` maps any of them over a run.
`ANALYSES` (analyses.registry) is the one list of analyses that the report, `mechlrmc analyze`
and the notebooks share; each takes a `Context` (the run and what its analyses share).

Names load lazily: `import analyses` is instant, and `analyses.head_taxonomy` imports
`analyses.heads` on first use (so the `mechlrmc` command starts without the whole layer)."""

from __future__ import annotations

import importlib

_EXPORTS = {  # module -> the names it exports here
    "walk": ("across_checkpoints", "analysis_batch", "select_steps"),
    "cache": ("cache_hooks", "chunked_cache", "mean_patterns", "pattern_names"),
    "phases": ("detect_phases", "plot_phases", "steps_around_drop"),
    "heads": ("default_structured_mask", "head_onsets", "head_taxonomy", "label_heads", "plot_taxonomy", "score_pattern", "structured_taxonomy"),
    "views": ("attention_page", "save_attention_views"),
    "copying": ("copy_check", "plot_copy", "summarize_copy"),
    "ablation": ("ablate", "ablation_hooks", "head_ablation_sweep", "mean_z", "plot_ablation"),
    "baselines": ("compare_baselines", "copy_zero_predict", "evaluate_ood", "model_predict", "nuclear_norm_complete", "ood_variants", "plot_baselines", "plot_ood"),
    "dynamics": ("attention_progress", "collapse", "compare_interventions", "dynamics_summary", "intervention_runs", "load_interventions", "plot_dynamics", "plot_interventions", "repetition", "track_dynamics"),
    "components": ("COMPONENTS", "FREEZE_SET", "SWAP_SET", "component_params", "model_component_params"),
    "probes": ("default_hooks", "first_step_encoded", "fit_probe", "plot_probes", "probe", "probe_summary", "probe_targets"),
    "embeddings": ("embedding_geometry", "permuted_position_losses", "plot_embedding_geometry", "plot_position_tsne", "plot_token_embeddings"),
    "patching": ("batched_outputs", "batched_sweep", "corrupt", "patching", "plot_patching", "plot_patching_steps", "recovery_metrics", "stock_sweep"),
    "swaps": ("plot_swaps", "swap_grid", "swap_state", "swapped_model"),
    "freeze": ("freeze_info", "freeze_sweep", "freeze_train", "freeze_trainer", "half_plateau_step", "plot_freeze"),
    "report": ("build_report", "write_report"),
    "registry": ("ANALYSES", "Analysis", "applicable", "get"),
    "context": ("Budget", "Context"),
    "page": ("Page", "Section", "assemble"),
    "store": ("cached",),
    "overview": ("run_facts",),
    "family": ("across_runs", "drop_sharpness", "family_runs", "family_summary", "find_family", "place_in_family", "plot_drop_steps", "plot_family_curves", "plot_run_in_family", "varied_keys"),
    "findings": ("CRITERIA", "family_findings", "findings_table", "key_steps"),
    "family_report": ("build_family_report", "write_family_report"),
    "attribution": ("attribution", "attribution_agreement", "attribution_sweep", "attribution_verdict", "compare_with_patching", "plot_attribution_vs_patching"),
    "llc": ("SGLDConfig", "llc_from_traces", "llc_per_step", "local_learning_coefficient", "plot_llc", "plot_sgld_traces", "sgld_traces"),
    "llc_calibrate": ("Calibration", "calibrate", "rrr_learning_coefficient"),
    "llc_components": ("component_changes", "component_llc", "component_masks", "model_components",
                       "plot_component_llc", "run_component_llc"),
    "llc_report": ("family_llc", "plot_family_llc"),
    "scrubber": ("pattern_frame", "plot_attention_scrubber", "save_attention_scrubber", "scrub_data"),
    "sequences": ("attention_progress_native", "collapse_native", "native_measures", "partial_solution",
                  "head_map_share", "plot_native_dynamics", "plot_sequence_phases", "repetition_native",
                  "sequence_phases"),
    "early_warning": ("early_warning_table", "essential_dynamics", "family_early_warning", "milestones",
                      "plot_drop_aligned", "run_trajectory", "top_hessian_eigenvalue", "warning_measures"),
    "integrated_gradients": ("diagonal_groups", "integrated_gradients_sweep", "joint_integrated_gradients_sweep"),
    "sequence_patching": ("patching_agreement", "plot_sequence_patching", "sequence_patching"),
    "sequence_findings": ("SEQUENCE_CRITERIA", "intervention_findings", "sequence_run_findings"),
    "lm_checkpoints": ("across_lm_checkpoints", "checkpoint_series", "consecutive_repetition", "lm_dynamics_summary", "lm_repetition_collapse", "mean_pairwise_cosine", "plot_lm_dynamics"),
}
_HOME = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_HOME)


def __getattr__(name: str):
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module 'analyses' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"analyses.{module}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
