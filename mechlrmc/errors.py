"""The errors a user can cause, as one hierarchy that `mechlrmc.cli.main` turns into one line.

`UsageError` is the base: bad config values, a path that is not a run, a step the run does not
have, a tampered checkpoint, a run another process is writing, a bad analysis option. The CLI
prints its message and exits with `exit_code` (2: bad input; 1: the environment failed, e.g. a
full disk); `--debug` or `MECHLRMC_DEBUG=1` shows the traceback instead.
"""

from __future__ import annotations


class UsageError(Exception):
    """An error whose message alone tells the user what to fix."""

    exit_code = 2


class OptionError(UsageError, ValueError):
    """An argument of an analysis or command is out of range or unknown."""
