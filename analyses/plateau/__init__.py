"""The plateau and the drop: phases of the loss curves, the plateau paper's measures (repetition, collapse, attention progress), early warnings, LM checkpoint series."""
