"""What every lens shares: the run context, the registry of analyses, walking a run's checkpoints, caching activations and measurements."""
