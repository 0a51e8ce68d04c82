"""Atomic file writes: write a temp file in the same folder, fsync, then rename over the target.

A reader (or a rerun after a crash) sees either the old file or the new one, never a half-written one.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, exclusive: bool = False) -> Iterator[BinaryIO]:
    """Open a temporary file beside `path` for writing; on a clean exit make it `path` atomically.

    exclusive=True publishes with a hard link instead of a rename, so an existing `path` is never replaced
    (FileExistsError: another writer got there first). The temporary name is unique per writer, since tasks
    on different nodes may share a pid.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; outputs are meant to be shared
        if exclusive:
            os.link(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
    fsync_dir(path.parent)


def remove_stale_temporaries(folder: str | os.PathLike) -> None:
    """Delete the temporary files `atomic_open` left in `folder` when its writer was killed. Only for a folder
    no writer is using at the time (e.g. a run folder as its run starts)."""
    for tmp in Path(folder).glob(".*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename itself durable (a crash right after must not lose the new name)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path) as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())
