"""Writing a run directory's files safely: atomic writes, the one-writer lock, and their errors.

Every file is written to a temporary name, flushed to disk and renamed (`atomic_write`), so a
killed process leaves either the old file or the new one, never half of one; a write that fails
(full disk, file-size limit) removes its temporary file and raises `WriteError` naming the file.
One process writes a run at a time (`RunLock`, an `fcntl.flock` the OS drops when its holder
dies). `mechlrmc.runs` (the trainer's and the recorder's run directory) is built on these.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
from pathlib import Path

from mechlrmc.errors import UsageError

LOCK_FILE = "writer.lock"
TMP_MARK = ".tmp"  # temporary files are ".NAME.tmpPID"


class CheckpointError(UsageError, RuntimeError):
    """A checkpoint or run directory is missing, truncated, tampered with or inconsistent."""


class RunLockedError(CheckpointError):
    """Another process holds the run's writer lock."""


class RunExistsError(UsageError, FileExistsError):
    """A new run was asked for where a run (or anything else) already is."""


class WriteError(UsageError, OSError):
    """A file of the run could not be written (full disk, file-size limit, permissions)."""

    exit_code = 1


def write_failed(path: Path, e: OSError) -> WriteError:
    reason = {errno.EFBIG: "the file-size limit was reached", errno.ENOSPC: "the disk is full"}.get(
        e.errno, e.strerror or str(e))
    return WriteError(f"could not write {path}: {reason}; nothing was left half-written")


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers only ever see the old or the complete new file."""
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise write_failed(path, e) from e


class RunLock:
    """An exclusive `fcntl.flock` on RUN/writer.lock, recording the holder's PID and host.

    The OS releases the lock when its holder exits or is killed, so a dead writer never blocks a
    later one; the file itself stays (it is not the lock) and is rewritten by the next holder.
    """

    def __init__(self, path: str | Path):
        self.file = Path(path) / LOCK_FILE
        self._handle = None

    @property
    def held(self) -> bool:
        return self._handle is not None

    def acquire(self) -> RunLock:
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            handle = open(self.file, "a+")
        except OSError as e:
            raise write_failed(self.file, e) from e
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip()
            handle.close()
            try:
                info = json.loads(holder)
                who = f"PID {info['pid']} on host {info['host']}"
            except (ValueError, KeyError, TypeError):
                who = "a process that has not yet recorded its PID and host"
            raise RunLockedError(
                f"{self.file.parent} is being written by {who}: one writer per run; "
                f"wait for it to finish or stop it") from None
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
        handle.flush()
        self._handle = handle
        return self

    def release(self) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None

    def __enter__(self) -> RunLock:
        return self if self.held else self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def is_bookkeeping(name: str) -> bool:
    """Files that do not make a directory a run: the lock and temporary files of killed writes."""
    return name == LOCK_FILE or (name.startswith(".") and TMP_MARK in name)
