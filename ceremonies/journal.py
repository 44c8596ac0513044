"""The journal file: one hash-chained line per entry, each written and fsync'd before going on.

An unfinished ceremony's journal is ``<name>.journal.jsonl`` in the transcript directory, so
running the same script again finds it. When the ceremony ends it is renamed to
``<name>-<ceremony id>.journal.jsonl`` beside its transcript; a restart renames it to
``<name>-<ceremony id>.abandoned.journal.jsonl`` and the new transcript names it.
"""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING, Any

from ceremonies.state import GENESIS, JournalError, decode_entries, encode_entry

if TYPE_CHECKING:
    from collections.abc import Mapping
    from pathlib import Path


def active_path(directory: Path, name: str) -> Path:
    return directory / f"{name}.journal.jsonl"


class Journal:
    def __init__(self, path: Path, entries: list[dict[str, Any]], head: str) -> None:
        self.path = path
        self.entries = entries
        self.head = head

    @classmethod
    def create(cls, path: Path) -> Journal:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise JournalError(f"{path} exists already") from None
        os.close(fd)
        _sync_directory(path.parent)
        return cls(path, [], GENESIS)

    @classmethod
    def open(cls, path: Path) -> Journal:
        """Read and check a journal; a line cut short by a kill is dropped from the file."""
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise JournalError(f"cannot read journal {path}: {exc.strerror or exc}") from None
        entries, head, whole = decode_entries(data)
        if whole < len(data):
            with path.open("r+b") as file:
                file.truncate(whole)
                file.flush()
                os.fsync(file.fileno())
        return cls(path, entries, head)

    def append(self, entry: Mapping[str, Any]) -> None:
        line, head = encode_entry(self.head, entry)
        with self.path.open("ab") as file:
            file.write(line)
            file.flush()
            os.fsync(file.fileno())
        self.head = head
        self.entries.append(dict(entry))

    def move(self, target: Path) -> None:
        self.path.replace(target)
        _sync_directory(target.parent)
        self.path = target


def write_atomically(path: Path, data: bytes) -> None:
    """Write beside the target, fsync, then rename: a reader sees the old file or the new one."""
    partial = path.with_name(path.name + ".partial")
    with partial.open("wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    partial.replace(path)
    _sync_directory(path.parent)


def _sync_directory(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
