"""The local learning coefficient: the SGLD estimator, its calibration, per-component (refined) LLC and the LLC of a run and a family."""
