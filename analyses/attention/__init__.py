"""Attention heads: the head taxonomy, attention views and the scrubber across checkpoints."""
