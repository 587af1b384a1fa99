"""The one way files of a run or a study are written: a temporary name, then a rename.

:func:`write_atomic` hands a writer a temporary path beside the target
(``.<name>.tmp-<pid>``, hidden, so globs such as ``part-*.parquet`` and
pyarrow's dataset discovery never see it) and renames it over the target
with :func:`os.replace`, which is atomic on POSIX file systems: a reader
sees the old file or the new one, never half of one.  A writer that fails
leaves no temporary file; one killed mid-write leaves a hidden one, which
:func:`remove_stale_temporaries` clears.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

TEMP_GLOB = ".*.tmp-*"


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
    except BaseException:
        tmp.unlink(missing_ok=True)
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
