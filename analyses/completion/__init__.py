"""Matrix completion against its baselines: nuclear-norm minimisation, copy-and-zero, out-of-distribution inputs, the copy check."""
