"""Measurements cached in the run directory, so a second report or a notebook reuses them.

`cached(run, "llc", step, settings, compute)` returns `compute()`'s DataFrame and keeps it as
`RUN/cache/llc/step_NNNNNN-KEY.csv`. KEY hashes what decides the numbers: the analysis name, the
checkpoint's SHA-256 from the manifest, the settings (any JSON-able dict: sampler settings, batch
size and seed...) and `STORE_VERSION`. So an entry is found only for the same weights and the
same settings; a retrained checkpoint or a changed setting gets a new key, and the old entry is
never read. The checkpoint itself is verified against its hash before an entry is used.

The run directory's guarantees hold: entries are written atomically (temporary file and rename),
as CSV (no pickle), and a run directory that cannot be written (read-only, full disk) computes
without caching. `clear(run)` removes every entry.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path
from typing import Callable

import pandas as pd

from mechlrmc.runs import Run, WriteError, atomic_write

STORE_VERSION = 1  # bump when an analysis changes what it computes for the same settings


FOLDER = "cache"


def entry_key(run: Run, name: str, step: int, settings: dict) -> str:
    """The hash that names the entry of `name` at `step` with `settings`."""
    sha = run.checkpoint_sha256(step)
    blob = json.dumps({"name": name, "step": int(step), "sha256": sha, "settings": settings,
                       "version": STORE_VERSION}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def entry_path(run: Run, name: str, step: int, settings: dict) -> Path:
    return run.path / FOLDER / name / f"step_{int(step):06d}-{entry_key(run, name, step, settings)}.csv"


def cached(run: Run, name: str, step: int, settings: dict, compute: Callable[[], pd.DataFrame]) -> pd.DataFrame:
    """`compute()` at checkpoint `step`, read from the run's cache when an entry for the same
    checkpoint hash and settings exists, else computed and stored."""
    path = entry_path(run, name, step, settings)
    if path.is_file():
        run.verify(step)  # the weights the entry was computed from are still the ones on disk
        return pd.read_csv(io.StringIO(path.read_text()), float_precision="round_trip")
    frame = compute()
    try:
        atomic_write(path, frame.to_csv(index=False).encode())
    except (WriteError, OSError):  # a read-only or full run directory: the result is still returned
        pass
    return frame


def clear(run: Run) -> None:
    """Remove every cached measurement of `run`."""
    shutil.rmtree(run.path / FOLDER, ignore_errors=True)
