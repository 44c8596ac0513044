"""Group commit for the audit log.

Each request waits until its record is durable before answering (fail closed), but records from
concurrent requests share one transaction: the writer thread drains whatever is queued and
commits it at once, so the database sees one commit per batch rather than per request.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from typing import TYPE_CHECKING

from kms.errors import AuditError

if TYPE_CHECKING:
    from kms.audit import AuditRecord
    from kms.ports import AuditSink

log = logging.getLogger("ekms.audit")
_MAX_BATCH = 512
_STOP = object()


class AuditWriter:
    def __init__(self, sink: AuditSink) -> None:
        self._sink = sink
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
                self._thread.start()

    def stop(self) -> None:
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(_STOP)
            thread.join(timeout=10)

    async def write(self, record: AuditRecord) -> None:
        """Returns once the record is committed; raises ``AuditError`` if it could not be."""
        if self._thread is None:
            self.start()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._queue.put((record, future, loop))
        await future

    def write_now(self, record: AuditRecord) -> None:
        """Synchronous path for callers outside an event loop (supervisor, CLI)."""
        try:
            self._sink.append([record])
        except Exception as exc:
            log.error("audit write failed: %s", type(exc).__name__)
            raise AuditError from exc

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch = [first]
            while len(batch) < _MAX_BATCH:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    self._queue.put(_STOP)
                    break
                batch.append(item)
            self._commit(batch)

    def _commit(self, batch: list[object]) -> None:
        items = [item for item in batch if isinstance(item, tuple)]
        error: BaseException | None = None
        try:
            self._sink.append([record for record, _, _ in items])
        except Exception as exc:  # noqa: BLE001 - every failure means fail closed
            log.error("audit write failed: %s", type(exc).__name__)
            error = exc
        by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}
        for _, future, loop in items:
            by_loop.setdefault(loop, []).append(future)
        for loop, futures in by_loop.items():
            loop.call_soon_threadsafe(_settle, futures, error)


def _settle(futures: list[asyncio.Future[None]], error: BaseException | None) -> None:
    for future in futures:
        if future.done():
            continue
        if error is None:
            future.set_result(None)
        else:
            failure = AuditError()
            failure.__cause__ = error
            future.set_exception(failure)
