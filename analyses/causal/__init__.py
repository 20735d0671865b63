"""Causal interventions on activations: ablation, activation patching, attribution patching and integrated gradients."""
