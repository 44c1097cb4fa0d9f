"""A worker's on-disk outbox: signed update messages that are trained but not yet confirmed by the broker.

One file per task id holds the exact bytes to publish. A file is written atomically
(a fresh temp file opened O_EXCL, fsync, rename, fsync of the directory: ``shared.files``),
so an entry is either complete or absent; a temp file left by a crash mid-write is never
listed. Names start with the write time in nanoseconds, so ``entries()`` lists the oldest
first::

    <root>/01718000000000000000.<task id>.msg

Task ids made of letters, digits, ``_`` and ``-`` are used as they are; any other id is
hex-encoded behind a ``~``. Plain file I/O, no event loop: the worker calls it in a thread.
"""

from __future__ import annotations

import contextlib
import re
import time
from dataclasses import dataclass
from pathlib import Path

from shared.files import PRIVATE, TEMP_PREFIX, sync_dir, write_atomic

SUFFIX = ".msg"
MAX_TASK_ID_BYTES = 100  # hex-encoded that is 201 characters: file names stay under 255 bytes
_PLAIN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
_NAME = re.compile(r"(\d{20})\.([A-Za-z0-9][A-Za-z0-9_-]*|~[0-9a-f]+)" + re.escape(SUFFIX))


class OutboxError(ValueError):
    """A task id that cannot name an outbox entry."""


@dataclass(frozen=True)
class Entry:
    task_id: str
    path: Path
    written_ns: int


def encode_task_id(task_id: str) -> str:
    raw = task_id.encode("utf-8")
    if not raw or len(raw) > MAX_TASK_ID_BYTES:
        raise OutboxError(
            f"task id of {len(raw)} bytes cannot name an outbox entry (1 to {MAX_TASK_ID_BYTES})"
        )
    return task_id if _PLAIN_ID.fullmatch(task_id) else "~" + raw.hex()


def decode_task_id(text: str) -> str:
    return bytes.fromhex(text[1:]).decode("utf-8") if text.startswith("~") else text


def parse_name(name: str) -> tuple[int, str] | None:
    """``(written_ns, task_id)`` of an entry's file name; ``None`` for anything else (temp files too)."""
    match = _NAME.fullmatch(name)
    if match is None:
        return None
    try:
        return int(match.group(1)), decode_task_id(match.group(2))
    except ValueError:  # odd-length hex or invalid utf-8: not an entry of ours
        return None


class Outbox:
    """The directory ``root`` of pending updates, created on first use."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def put(self, task_id: str, body: bytes) -> Entry:
        """Durably store ``body`` as the entry of ``task_id``, replacing any older entry of it."""
        stem = encode_task_id(task_id)
        self.root.mkdir(parents=True, exist_ok=True)
        entries = self.entries()
        older = [e for e in entries if e.task_id == task_id]
        # names must sort in write order even when the clock is coarse or steps back
        written_ns = max(time.time_ns(), entries[-1].written_ns + 1 if entries else 0)
        path = self.root / f"{written_ns:020d}.{stem}{SUFFIX}"
        write_atomic(path, body, mode=PRIVATE, fsync=True)
        sync_dir(self.root)
        for entry in older:
            with contextlib.suppress(FileNotFoundError):
                entry.path.unlink()
        return Entry(task_id, path, written_ns)

    def entries(self) -> list[Entry]:
        """Every complete entry, oldest first; temp files and foreign files are ignored."""
        if not self.root.is_dir():
            return []
        found = []
        for path in self.root.iterdir():
            parsed = parse_name(path.name)
            if parsed is not None and path.is_file():
                found.append(Entry(parsed[1], path, parsed[0]))
        return sorted(found, key=lambda e: (e.written_ns, e.path.name))

    def task_ids(self) -> list[str]:
        return [e.task_id for e in self.entries()]

    def find(self, task_id: str) -> Entry | None:
        """The newest entry of ``task_id``, if any."""
        hits = [e for e in self.entries() if e.task_id == task_id]
        return hits[-1] if hits else None

    def read(self, entry: Entry) -> bytes | None:
        """The bytes of ``entry``; ``None`` when it was removed meanwhile."""
        try:
            return entry.path.read_bytes()
        except FileNotFoundError:
            return None

    def get(self, task_id: str) -> bytes | None:
        entry = self.find(task_id)
        return None if entry is None else self.read(entry)

    def remove(self, task_id: str) -> bool:
        """Remove every entry of ``task_id``; ``False`` when there was none."""
        removed = False
        for entry in self.entries():
            if entry.task_id == task_id:
                with contextlib.suppress(FileNotFoundError):
                    entry.path.unlink()
                    removed = True
        if removed:
            sync_dir(self.root)
        return removed

    def sweep_temp(self, older_than: float = 60.0) -> int:
        """Delete temp files a crash left behind mid-write (their entries were never written)."""
        if not self.root.is_dir():
            return 0
        cutoff = time.time() - older_than
        count = 0
        for path in self.root.glob(TEMP_PREFIX + "*"):
            with contextlib.suppress(OSError):
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    count += 1
        return count

    def __len__(self) -> int:
        return len(self.entries())
