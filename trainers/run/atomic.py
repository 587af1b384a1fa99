"""The one way files of a run or a study are written: a temporary name, then a rename.

:func:`write_atomic` hands a writer a temporary path beside the target
(``.<name>.tmp-<pid>``, hidden, so globs such as ``part-*.parquet`` and
pyarrow's dataset discovery never see it) and renames it over the target
with :func:`os.replace`, which is atomic on POSIX file systems: a reader
sees the old file or the new one, never half of one.  A writer that fails
leaves no temporary file; one killed mid-write leaves a hidden one, which
:func:`remove_stale_temporaries` clears.

A write that fails because the file system is full raises :class:`DiskFull`
(an ``OSError`` with ``errno.ENOSPC``) whose one-line message names the file,
the space left and about how much was needed.  "Full" is the writer's
``ENOSPC``/``EDQUOT`` error, or any error while less than :data:`FULL_BELOW`
bytes are left (``torch.save`` reports a full disk as a ``RuntimeError``
"unexpected pos ...").
"""
from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

TEMP_GLOB = ".*.tmp-*"
FULL_BELOW = 1 << 20          # bytes free under which a failed write counts as "disk full"
NO_SPACE = "no space left on device"


class DiskFull(OSError):
    """A write failed because the file system is full (``errno.ENOSPC``; the message says which file)."""


def _size(nbytes: Optional[float]) -> str:
    if nbytes is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1000 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    return "?"


def _free(folder: Path) -> Optional[int]:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _is_no_space(error: BaseException, free: Optional[int]) -> bool:
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if NO_SPACE in str(error).lower():
        return True
    return isinstance(error, (OSError, RuntimeError)) and free is not None and free < FULL_BELOW


def _needed(path: Path, written: int) -> tuple[int, str]:
    """About how many bytes the write needed: the size of the file it replaces or of its
    largest sibling of the same kind (the previous checkpoint), else what it had written."""
    sizes = [(p.stat().st_size, p.name) for p in path.parent.glob(f"*{path.suffix}")
             if p.is_file() and not p.name.startswith(".")] if path.suffix else []
    size, name = max(sizes, default=(0, ""))
    if size > written:
        return size, f"; it needs about {_size(size)} (the size of {name})"
    return written, f"; it needs more than {_size(written)}" if written else ""


def disk_full(path: Path, written: int, free: Optional[int]) -> DiskFull:
    _, needed = _needed(path, written)
    return DiskFull(errno.ENOSPC, f"{NO_SPACE}: writing {path} failed with {_size(free)} free on that "
                                  f"file system{needed}")


def temporary_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_atomic(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Create ``path`` by ``write(tmp)`` (which must create ``tmp``), then rename ``tmp`` to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    tmp.unlink(missing_ok=True)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        written = tmp.stat().st_size if tmp.exists() else 0
        free = _free(path.parent)            # measured with the partial file still there
        tmp.unlink(missing_ok=True)
        if not isinstance(e, DiskFull) and isinstance(e, Exception) and _is_no_space(e, free):
            raise disk_full(path, written, free) from e
        raise
    return path


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """``obj`` as indented JSON with sorted keys (values JSON cannot hold are written with ``str``)."""
    text = json.dumps(obj, indent=2, sort_keys=True, default=str)
    return write_atomic(path, lambda tmp: tmp.write_text(text))


def remove_stale_temporaries(folder: str | os.PathLike) -> None:
    """Delete the temporary files that writers killed mid-write left in ``folder``."""
    folder = Path(folder)
    if folder.is_dir():
        for tmp in folder.glob(TEMP_GLOB):
            tmp.unlink(missing_ok=True)
