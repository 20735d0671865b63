"""Components of the weights: one component vocabulary, swaps between checkpoints, component-wise training."""
