"""Files fedq writes whole or not at all: a temp file, then a rename over the target.

The temp file gets a random name (``.tmp-XXXXXXXX``) and is opened with ``O_CREAT | O_EXCL``
(``tempfile.mkstemp``): a name fixed in advance (``coordinator.key.tmp``) lets whoever can write the
folder plant that file, or a symlink to a file of theirs, and have fedq write a private key into it.
A file that holds a key or a secret is ``PRIVATE`` (0600) from its first byte; its folder ``0700``.
Plain file I/O, no event loop.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

TEMP_PREFIX = ".tmp-"  # readers that list a folder skip these (the store, the outbox)
PRIVATE = 0o600
PUBLIC = 0o644
PRIVATE_DIR = 0o700


def open_temp(directory: Path) -> tuple[int, Path]:
    """A new, empty file in ``directory`` under a random name, opened ``O_EXCL`` (never one that was
    there before, nor a symlink), mode 0600."""
    fd, name = tempfile.mkstemp(dir=directory, prefix=TEMP_PREFIX)
    return fd, Path(name)


def write_atomic(path: Path, data: bytes, *, mode: int = PUBLIC, fsync: bool = False) -> None:
    """Put ``data`` in ``path`` through a fresh temp file beside it, with ``mode`` (set on the open
    file, so a private one is never readable by others); ``fsync``: the file's bytes are on disk
    before the rename (``sync_dir`` then makes the rename itself survive a power cut)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = open_temp(path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), mode)
            fh.write(data)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_private(path: Path, data: bytes) -> None:
    """``write_atomic`` for a key or a secret: mode 0600, in a folder of mode 0700 when fedq makes it
    (a folder that is there already keeps its mode: it may be the user's)."""
    path.parent.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
    write_atomic(path, data, mode=PRIVATE)


def private_dir(path: Path) -> Path:
    """``path`` as a folder only its owner may enter (0700), made when missing, tightened when not:
    for folders fedq lays out itself (a run's key folders)."""
    path.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
    os.chmod(path, PRIVATE_DIR)
    return path


def sync_dir(directory: Path) -> None:
    """fsync a folder, so a rename or an unlink in it survives a power cut."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
