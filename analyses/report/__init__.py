"""The HTML report of a run and of a family: the registry's entries assembled into one page."""
