"""A worker's local audit journal: records acknowledged, not yet leaves of the Merkle log.

A request is answered only once its record is durable. Committing it to the log on the request's
path costs a database transaction per batch of requests (ADR 0013 has the figures); appending a
line to a local file costs about a microsecond and is exactly as durable as the embedded
database's commit (both are a ``write(2)`` with no ``fsync``: they survive the process, not the
machine). The writer appends here, answers, and takes the journal into the log a few
milliseconds later, in one transaction that also records how far the log now holds this file.

Each line is a record's canonical JSON, which never holds a raw newline, followed by ``\\n``.
A last line without one is a write the process died inside, so its request was never answered.

The file is held under an exclusive ``flock`` for the writer's lifetime. A file whose lock can
be taken therefore belongs to a process that is gone, and the next worker to start on the same
directory takes it in from where the log stops and deletes it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import orjson

from kms.audit import AuditRecord, JournalEntry
from kms.canonical import canonical_json
from kms.errors import AuditError, InvalidRequestError, StorageError

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

log = logging.getLogger("ekms.audit")

SUFFIX = ".jsonl"
# A journal is replaced by a fresh file once it is this long and fully in the log.
ROTATE_BYTES = 64 * 1024 * 1024


class AuditJournal:
    """This process's journal file, open for appending and locked."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.name = secrets.token_hex(16)
        self.path = directory / (self.name + SUFFIX)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC
        self._fd = os.open(self.path, flags, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._fd)
            raise
        self.offset = 0  # bytes written: the mark that puts everything so far in the log
        self.pid = os.getpid()  # a forked child must not write to its parent's journal

    def append(self, data: bytes) -> None:
        """Append one record's canonical bytes; raises ``AuditError`` if not all were written.

        A short write leaves a partial last line, which recovery drops; the request that wrote
        it is refused, so nothing answered is lost. The offset is not advanced past it, and
        the file is not used again (a partial line in the middle would hide later records).
        """
        line = data + b"\n"
        try:
            written = os.write(self._fd, line)
        except OSError as exc:
            log.error("audit journal write failed: %s", errno.errorcode.get(exc.errno or 0, "?"))
            raise AuditError from exc
        if written != len(line):
            log.error("audit journal write was short (%d of %d bytes)", written, len(line))
            raise AuditError
        self.offset += written

    def remove(self) -> None:
        """Delete the file and release it: every record in it must already be in the log."""
        _unlink_and_close(self.path, self._fd)


@dataclass(frozen=True)
class Orphan:
    """A journal left by a process that is gone, locked by the process that takes it in."""

    name: str
    path: Path
    fd: int

    def entries(self, start: int, node: str) -> list[tuple[JournalEntry, int]]:
        """Each record from byte ``start`` on, with the offset just past its line.

        ``node`` names the node taking a damaged line in, in the record that reports it.
        """
        with os.fdopen(os.dup(self.fd), "rb") as file:
            file.seek(start)
            content = file.read()
        end = content.rfind(b"\n") + 1
        if end < len(content):
            log.warning(
                "audit journal %s ends inside a record (a write the process died in); "
                "its request was not answered and it is dropped",
                self.name,
            )
        found = []
        position = start
        for line in content[:end].split(b"\n")[:-1]:
            found.append((_entry(line, self.name, position, node), position + len(line) + 1))
            position += len(line) + 1
        return found

    def remove(self) -> None:
        _unlink_and_close(self.path, self.fd)

    def release(self) -> None:
        os.close(self.fd)


def orphans(directory: Path) -> Iterator[Orphan]:
    """Journals in ``directory`` whose writer is gone, each locked until removed or released."""
    if not directory.is_dir():
        return
    for path in sorted(directory.glob("*" + SUFFIX)):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue  # taken in and removed by another worker meanwhile
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue  # its writer is alive
        except OSError as exc:
            os.close(fd)
            raise StorageError(f"cannot lock audit journal {path.name}") from exc
        if not path.exists():  # removed between the open and the lock
            os.close(fd)
            continue
        yield Orphan(path.name.removesuffix(SUFFIX), path, fd)


def _unlink_and_close(path: Path, fd: int) -> None:
    """Unlink before the lock goes with the descriptor, so no one else can take the file in."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    os.close(fd)


def _entry(line: bytes, journal: str, offset: int, node: str) -> JournalEntry:
    """The entry a journal line holds; a damaged line becomes a record that says so.

    Only a line that is exactly a record's canonical JSON is taken as written. Anything else
    (a disk error, a hand edit) is not dropped silently: the log gets a record naming the
    journal, the offset and the damaged line's hash, so the gap is visible to an auditor.
    """
    try:
        value = orjson.loads(line)
        if type(value) is not dict or canonical_json(value) != line:
            raise ValueError("not canonical")  # noqa: TRY301 - one path for every damage
        return JournalEntry(
            time=int(value["time_us"]) / 1_000_000,
            request_id=str(value["request_id"]),
            node=str(value["node"]),
            data=line,
        )
    except (orjson.JSONDecodeError, InvalidRequestError, ValueError, KeyError, TypeError):
        damaged = AuditRecord(
            time=time.time(),
            request_id=f"journal-{journal}-{offset}",
            node=node,
            operation="audit.journal-damaged",
            decision="error",
            status=500,
            reason="an audit journal line was not a canonical record",
            details={
                "journal": journal,
                "offset": offset,
                "line_sha256": hashlib.sha256(line).hexdigest(),
            },
        )
        log.error("audit journal %s holds a damaged record at byte %d", journal, offset)
        return JournalEntry.of(damaged)
