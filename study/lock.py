"""One driver per study folder: ``<study>/.driver.lock``.

``eos study run`` and ``eos study resume`` hold the lock while they drive
the study, so a second driver on the same folder (two ``run``s, ``run``
and ``resume``, an overlapping resubmission of a batch job) is refused
with :class:`StudyLocked` instead of training the same trials twice in one
folder.  The lock is a file created with ``O_CREAT | O_EXCL`` (atomic also
on NFS v3+) holding the owner's host, pid, process start time and command;
it is removed when the driver exits, also by an exception or Ctrl+C.

A driver that was killed (SIGKILL, a node that went down) leaves the file
behind.  A lock of this host whose process no longer runs — or whose pid
now belongs to a different process (the start time differs) — is stale and
taken over, with a line saying so.  A lock of another host cannot be checked
from here: the error names host and pid and says to delete the file once
that driver is known to be gone.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import sys
from pathlib import Path
from typing import Iterator, Optional

from trainers.config import ConfigError

LOCK_NAME = ".driver.lock"


class StudyLocked(ConfigError):
    """Another driver holds the study folder."""


def _start_time(pid: int) -> Optional[str]:
    """The process's start time in clock ticks since boot (Linux ``/proc``), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]   # field 22 of stat(5), counted after "(comm)"


def _alive(pid: int, start: Optional[str]) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True          # someone else's process: it exists
    now = _start_time(pid)
    return start is None or now is None or now == start


def owner_record() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": _start_time(os.getpid()),
            "command": " ".join(sys.argv)[:300],
            "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def read_lock(path: Path) -> Optional[dict]:
    """The owner written in a lock file; {} when it is unreadable (being written, or damaged)."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}


def _describe(owner: dict) -> str:
    command = f", `{owner['command']}`" if owner.get("command") else ""
    return f"pid {owner.get('pid')} on host {owner.get('host')} since {owner.get('since')}{command}"


def _try_create(path: Path, owner: dict) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump(owner, f)
    return True


def acquire(root: Path) -> Path:
    """Take the lock of study folder ``root`` (which must exist); raises :class:`StudyLocked`."""
    path = Path(root) / LOCK_NAME
    owner = owner_record()
    for _ in range(3):
        if _try_create(path, owner):
            return path
        held = read_lock(path)
        if held is None:          # released meanwhile
            continue
        if held and held.get("host") == owner["host"] and held.get("pid") == owner["pid"] \
                and held.get("start") == owner["start"]:
            raise StudyLocked(f"study: {root} is already driven by this process")
        if held and held.get("host") == owner["host"] and not _alive(int(held["pid"]), held.get("start")):
            print(f"[eos] removing the stale lock of a driver that no longer runs ({_describe(held)})",
                  flush=True)
            path.unlink(missing_ok=True)
            continue
        if not held:
            raise StudyLocked(f"study: {root} is locked by {path}, which cannot be read; if no driver runs "
                              f"on this study, delete {path}")
        where = "" if held.get("host") == owner["host"] else \
            f" (another host: check there; once that driver is gone, delete {path})"
        raise StudyLocked(f"study: {root} is in use by another driver ({_describe(held)}){where}; "
                          "wait for it to end or stop it — two drivers would train the same trials twice")
    raise StudyLocked(f"study: could not take the lock {path} (it keeps changing hands)")


def release(path: Path) -> None:
    """Remove the lock if this process still owns it."""
    held = read_lock(path)
    if held and held.get("pid") == os.getpid() and held.get("host") == socket.gethostname():
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def study_lock(root: Path) -> Iterator[Path]:
    """Hold the driver lock of ``root`` for the duration of the block."""
    path = acquire(root)
    try:
        yield path
    finally:
        release(path)
