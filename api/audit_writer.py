"""Writing audit records: every request's record is durable before its answer leaves.

Two ways, by what the record has to decide:

- **A record with an admission** (a one-time id, a grant's use counter, a token to record)
  must commit with its checks, so the request waits for its transaction. Requests that reach
  that point in the same turn of the event loop share one (group commit): the first schedules
  a flush for the end of the turn, the others join it.
- **Every other record** is appended to this worker's local journal (``storage.audit_journal``),
  and the request is answered at once. The journal is taken into the Merkle log at most every
  ``FLUSH_INTERVAL``, in one transaction with its new mark, and before anything in this
  process reads the log (``SqlStore.before_audit_read``), so a reader here sees every record
  acknowledged here. ADR 0013 explains why this is as durable as a commit and what it saves.

If the log cannot be written, the journal keeps what it holds, and from then on every request
waits until the journal is taken in; while that fails, requests fail closed with 503, as they
do when the journal itself cannot be written.

Everything runs on the event loop thread. An earlier design handed records to a writer
thread; measured on two cores it halved throughput, because python-pkcs11 releases the GIL
for every HSM call and the writer thread then held it for up to the interpreter's switch
interval (5 ms) before the request thread could continue.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from typing import TYPE_CHECKING

from kms.audit import JournalEntry, JournalMark
from kms.errors import AuditError, StorageError
from storage.audit_journal import ROTATE_BYTES, AuditJournal, orphans

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

    from kms.audit import Admission, AuditRecord, Refusal
    from kms.ports import AuditSink

log = logging.getLogger("ekms.audit")

# How long journaled records may wait for the log. Under load it sets the batch size (at
# 4,000 requests/s a worker takes ~80 records per transaction, and a transaction's fixed cost
# is then under a microsecond a record); when idle, a record is taken in on the next turn of
# the loop, after its answer has left. Reads in this process never wait for it (``drain``).
FLUSH_INTERVAL = 0.02
# While the log cannot be written: how often to retry taking the journal in.
RETRY_INTERVAL = 1.0
# Journaled records held in memory beyond this are taken in on the request's path.
MAX_WAITING = 10_000
# Records per transaction when taking in a journal a crashed worker left.
RECOVERY_BATCH = 1000

_Pending = list[tuple["AuditRecord", "Admission | None", "asyncio.Future[Refusal | None]"]]


class AuditWriter:
    def __init__(self, sink: AuditSink, journal_dir: Path | None = None, node: str = "") -> None:
        self._sink = sink
        self._node = node
        self._pending: dict[asyncio.AbstractEventLoop, _Pending] = {}
        self._journal_dir = journal_dir
        # The journal, the records in it not yet in the log, and the commits that take them
        # in: one lock, so a mark always matches the records committed with it. A reader on
        # another thread (SqlStore.before_audit_read) takes it too.
        self._lock = threading.RLock()
        self._journal: AuditJournal | None = None
        self._waiting: list[JournalEntry] = []
        self._failure: BaseException | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_loop: asyncio.AbstractEventLoop | None = None
        self._last_flush = 0.0

    async def write(
        self, record: AuditRecord, admission: Admission | None = None
    ) -> Refusal | None:
        """Returns once the record is durable; raises ``AuditError`` if it could not be.

        With an ``admission``, returns the ``Refusal`` if its conditions failed (the record
        was then stored as a denial) and ``None`` if the request may be answered.
        """
        loop = asyncio.get_running_loop()
        if admission is None and self._journal_dir is not None:
            self._journal_append(JournalEntry.of(record))
            self._schedule_journal(loop)
            return None
        pending = self._pending.get(loop)
        if pending is None:
            pending = self._pending[loop] = []
            loop.call_soon(self._flush, loop)
        future: asyncio.Future[Refusal | None] = loop.create_future()
        pending.append((record, admission, future))
        return await future

    def write_now(self, record: AuditRecord) -> None:
        """Synchronous path for callers outside an event loop (supervisor, CLI)."""
        try:
            self._sink.append([record])
        except Exception as exc:
            log.error("audit write failed: %s", type(exc).__name__)
            raise AuditError from exc

    def drain(self) -> None:
        """Take every journaled record into the log now; raises ``StorageError`` if it fails."""
        try:
            self._commit([])  # under the lock: a flush in progress on the loop finishes first
        except Exception as exc:  # noqa: BLE001 - logged by type; the reader must not go on
            _log_failure(exc)
            raise StorageError(
                "audit records waiting in this worker's journal could not be written to the log"
            ) from None

    def recover(self) -> int:
        """Take in the journals that workers which are gone left behind; returns the count.

        Runs when a worker starts. A journal still locked by a live worker is left to it.
        """
        if self._journal_dir is None:
            return 0
        taken = 0
        for orphan in orphans(self._journal_dir):
            try:
                offset = self._sink.journal_offset(orphan.name)
                entries = orphan.entries(offset, self._node)
                for start in range(0, len(entries), RECOVERY_BATCH):
                    chunk = entries[start : start + RECOVERY_BATCH]
                    mark = JournalMark(orphan.name, chunk[-1][1])
                    with self._lock:
                        self._sink.commit([], [entry for entry, _ in chunk], mark)
                    taken += len(chunk)
            except Exception:
                orphan.release()  # the next worker to start tries again
                raise
            orphan.remove()
            self._forget(orphan.name)
            if entries:
                log.warning(
                    "took %d audit records from journal %s, left by a worker that stopped "
                    "without taking them in (taken in by worker pid %d)",
                    len(entries),
                    orphan.name,
                    os.getpid(),
                )
        return taken

    def close(self) -> None:
        """Take the journal in and delete it; if that fails, leave it to ``recover``."""
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            journal = self._journal
            if journal is None:
                return
            try:
                self.drain()
            except StorageError:
                log.error("audit journal %s is left for the next worker to take in", journal.name)
                return
            self._journal = None
            journal.remove()
        self._forget(journal.name)

    # --- the journal --------------------------------------------------------------------

    def _journal_append(self, entry: JournalEntry) -> None:
        with self._lock:
            if self._failure is not None:
                # The log could not be written: nothing more is acknowledged until it can.
                try:
                    self._commit([])
                except Exception as exc:
                    raise AuditError from exc
            journal = self._journal
            if journal is None or journal.pid != os.getpid():
                journal = self._journal = AuditJournal(self._journal_dir)  # type: ignore[arg-type]
            try:
                journal.append(entry.data)
            except AuditError:
                self._journal = None  # a partial line may end it: the next record starts anew
                raise
            self._waiting.append(entry)
            if len(self._waiting) < MAX_WAITING:
                return
            try:
                self._commit([])
            except Exception as exc:  # noqa: BLE001 - this record is safe in the journal
                _log_failure(exc)

    def _schedule_journal(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._timer is not None and self._timer_loop is loop:
            return
        delay = max(0.0, self._last_flush + FLUSH_INTERVAL - time.monotonic())
        self._timer = loop.call_later(delay, self._flush_journal, loop)
        self._timer_loop = loop

    def _flush_journal(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        try:
            self._commit([])
        except Exception as exc:  # noqa: BLE001 - kept in the journal; retried, requests wait
            _log_failure(exc)
            self._timer = loop.call_later(RETRY_INTERVAL, self._flush_journal, loop)
            self._timer_loop = loop

    def _commit(
        self, batch: Sequence[tuple[AuditRecord, Admission | None]]
    ) -> list[Refusal | None]:
        """Commit ``batch`` with every journaled record waiting; on failure, they wait on."""
        with self._lock:
            if not batch and not self._waiting:
                self._failure = None  # nothing waits: the next record tries the log afresh
                return []
            entries, self._waiting = self._waiting, []
            journal = self._journal
            mark = (
                None
                if not entries or journal is None
                else JournalMark(journal.name, journal.offset)
            )
            try:
                outcome = self._sink.commit(batch, entries, mark)
            except BaseException as exc:
                self._waiting[:0] = entries
                if entries:
                    self._failure = exc
                raise
            self._failure = None
            self._last_flush = time.monotonic()
            if journal is not None and journal.offset > ROTATE_BYTES and not self._waiting:
                self._journal = None
                journal.remove()
                self._forget(journal.name)
            return outcome

    def _forget(self, name: str) -> None:
        try:
            self._sink.forget_journal(name)
        except Exception as exc:  # noqa: BLE001 - a stale mark names a file that is gone
            log.warning("could not drop the mark of audit journal %s: %s", name, exc)

    # --- group commit of admissions -----------------------------------------------------

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        batch = self._pending.pop(loop, [])
        error: BaseException | None = None
        outcome: list[Refusal | None] = []
        try:
            outcome = self._commit([(record, admission) for record, admission, _ in batch])
        except Exception as exc:  # noqa: BLE001 - every failure means fail closed
            log.error("audit write failed: %s", type(exc).__name__)
            error = exc
        for index, (_, _, future) in enumerate(batch):
            if future.done():
                continue  # the request was cancelled (client gone); its record is still written
            if error is None:
                future.set_result(outcome[index])
            else:
                failure = AuditError()
                failure.__cause__ = error
                future.set_exception(failure)


def _log_failure(exc: BaseException) -> None:
    """By type only: a driver's message may quote the statement, and with it a record."""
    log.error("audit journal could not be taken into the log: %s", type(exc).__name__)
