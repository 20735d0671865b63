"""Families of runs: summaries, drop statistics and the findings counted k of N."""
