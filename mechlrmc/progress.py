"""Progress bars that behave in a log file: tqdm on a terminal or in a notebook, plain lines elsewhere.

Where stderr is not a terminal (`nohup`, CI, a cluster job, `2> log`), a redrawn bar would write
one update after another into the file. There `progress_bar` prints the same tqdm line, as its own
line, at most every `MECHLRMC_PROGRESS_EVERY` seconds (default 5) and once at the end.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Any, TextIO

from tqdm.auto import tqdm
from tqdm.autonotebook import tqdm as notebook_or_std
from tqdm.std import tqdm as std_tqdm

from mechlrmc.errors import OptionError

DEFAULT_EVERY = 5.0  # seconds between two progress lines in a log


class _Lines:
    """A file for tqdm that turns each redraw (`\\r` + line) into one line of text."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").rstrip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


def interactive(stream: TextIO | None = None) -> bool:
    """Whether a redrawn bar is seen as one line: in a notebook, or on a terminal."""
    stream = sys.stderr if stream is None else stream
    return notebook_or_std is not std_tqdm or bool(getattr(stream, "isatty", lambda: False)())


def log_interval() -> float:
    """Seconds between two progress lines in a log (`MECHLRMC_PROGRESS_EVERY`, default 5)."""
    text = os.environ.get("MECHLRMC_PROGRESS_EVERY", "")
    try:
        every = float(text) if text else DEFAULT_EVERY
    except ValueError:
        every = math.nan
    if not 0 < every < math.inf:
        raise OptionError(f"MECHLRMC_PROGRESS_EVERY={text!r} is invalid: allowed a number of seconds > 0")
    return every


def progress_bar(**kwargs: Any) -> tqdm:
    """`tqdm(**kwargs)` on a terminal or in a notebook; in a log, one line at most every `log_interval()`
    seconds (its `mininterval`)."""
    if kwargs.get("disable") or interactive():
        return tqdm(**kwargs)
    kwargs.pop("dynamic_ncols", None)
    return std_tqdm(**kwargs, file=_Lines(sys.stderr), mininterval=log_interval(), ascii=True)
