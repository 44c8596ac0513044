"""The audit journal: records acknowledged before they join the tree are never lost or doubled.

Against a real SQLite (and PostgreSQL for the store's part) database and real files: a journal
left by a worker that died is taken in exactly from where the log stops, a torn last line is
dropped (its request was never answered), a damaged line is reported in the log rather than
skipped, and a journal whose writer is alive is left alone.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import time
from typing import TYPE_CHECKING

import pytest

from api.audit_writer import AuditWriter
from kms.audit import AuditRecord, JournalEntry, JournalMark
from kms.errors import AuditError, StorageError
from kms.merkle import leaf_hash, root_from_leaves
from storage.audit_journal import AuditJournal, orphans
from storage.sql_store import SqlStore

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path


def record(number: int) -> AuditRecord:
    return AuditRecord(
        time=1_700_000_000 + number,
        request_id=f"request-{number}",
        node="node-a",
        operation="transit.decrypt",
        decision="allow",
        status=200,
        key="registry",
        details={"n": number},
    )


@pytest.fixture
def store(database_url: str) -> Iterator[SqlStore]:
    opened = SqlStore.open(database_url)
    yield opened
    opened.dispose()


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[SqlStore]:
    opened = SqlStore.open(f"sqlite:///{tmp_path / 'ekms.db'}")
    yield opened
    opened.dispose()


def request_ids(store: SqlStore) -> list[str]:
    return [row["request_id"] for row in store.audit_records(100_000)]


def test_journaled_entries_and_their_mark_commit_together(store: SqlStore) -> None:
    store.commit([(record(0), None)])
    entries = [JournalEntry.of(record(n)) for n in (1, 2)]
    store.commit([(record(3), None)], entries, JournalMark("j1", 400))
    assert request_ids(store) == ["request-0", "request-1", "request-2", "request-3"]
    assert store.journal_offset("j1") == 400
    store.commit([], [JournalEntry.of(record(4))], JournalMark("j1", 600))
    assert store.journal_offset("j1") == 600
    assert store.journal_offset("unknown") == 0
    store.forget_journal("j1")
    assert store.journal_offset("j1") == 0
    rows = store.audit_export_rows()
    assert [row[1]["request_id"] for row in rows][-1] == "request-4"
    # The stored bytes are exactly the journal's: the leaf commits to what was acknowledged.
    assert store.audit_leaf_data(1, 2) == [entries[0].data]


def crashed_journal(directory: Path, count: int) -> tuple[str, list[int]]:
    """A journal as a worker that died leaves it: written, then closed with no clean-up."""
    journal = AuditJournal(directory)
    ends = []
    for number in range(count):
        journal.append(record(number).canonical())
        ends.append(journal.offset)
    os.close(journal._fd)  # the process is gone: its lock with it
    return journal.name, ends


def test_a_crashed_workers_journal_is_taken_in_from_where_the_log_stops(
    sqlite_store: SqlStore, tmp_path: Path
) -> None:
    directory = tmp_path / "journal"
    name, ends = crashed_journal(directory, 5)
    # The worker had taken the first two in before it died.
    data = [record(n).canonical() for n in range(5)]
    taken = [JournalEntry.of(record(n)) for n in range(2)]
    sqlite_store.commit([], taken, JournalMark(name, ends[1]))
    writer = AuditWriter(sqlite_store, directory, "node-b")
    assert writer.recover() == 3
    assert request_ids(sqlite_store) == [f"request-{n}" for n in range(5)]
    assert sqlite_store.audit_leaf_data(0, 5) == data
    assert list(directory.iterdir()) == []
    assert sqlite_store.journal_offset(name) == 0
    assert writer.recover() == 0  # nothing twice


def test_a_torn_last_line_is_dropped_and_a_damaged_one_reported(
    sqlite_store: SqlStore, tmp_path: Path
) -> None:
    directory = tmp_path / "journal"
    name, _ = crashed_journal(directory, 2)
    path = directory / f"{name}.jsonl"
    lines = path.read_bytes().split(b"\n")
    edited = lines[0].replace(b'"n":0', b'"n": 7')  # no longer the canonical form
    torn = record(9).canonical()[:40]
    path.write_bytes(edited + b"\n" + lines[1] + b"\n" + torn)
    AuditWriter(sqlite_store, directory, "node-b").recover()
    records = sqlite_store.audit_records()
    assert [r["operation"] for r in records] == ["audit.journal-damaged", "transit.decrypt"]
    damaged = records[0]
    assert damaged["node"] == "node-b"
    assert damaged["details"]["journal"] == name
    assert damaged["details"]["offset"] == 0
    assert len(damaged["details"]["line_sha256"]) == 64
    assert records[1]["request_id"] == "request-1"
    assert "request-9" not in request_ids(sqlite_store)


def test_a_live_workers_journal_is_left_to_it(sqlite_store: SqlStore, tmp_path: Path) -> None:
    directory = tmp_path / "journal"
    live = AuditJournal(directory)
    live.append(record(1).canonical())
    assert list(orphans(directory)) == []
    assert AuditWriter(sqlite_store, directory, "node-b").recover() == 0
    assert request_ids(sqlite_store) == []
    live.remove()


def test_the_writer_acknowledges_from_the_journal_and_reads_see_it(
    sqlite_store: SqlStore, tmp_path: Path
) -> None:
    directory = tmp_path / "journal"
    writer = AuditWriter(sqlite_store, directory, "node-a")
    sqlite_store.before_audit_read(writer.drain)

    async def answer(count: int) -> None:
        for number in range(count):
            assert await writer.write(record(number)) is None

    asyncio.run(answer(3))
    (path,) = directory.iterdir()
    assert path.stat().st_mode & 0o777 == 0o600
    assert directory.stat().st_mode & 0o777 == 0o700
    assert len(path.read_bytes().splitlines()) == 3
    # A read through the store takes in what this process acknowledged, whatever the timer.
    assert request_ids(sqlite_store) == ["request-0", "request-1", "request-2"]
    writer.close()
    assert list(directory.iterdir()) == []
    assert request_ids(sqlite_store) == ["request-0", "request-1", "request-2"]


class Breakable:
    """The real store, with a switch that makes its commits fail like a lost database."""

    def __init__(self, store: SqlStore) -> None:
        self.store = store
        self.broken = False

    def commit(self, *args: object, **kwargs: object) -> object:
        if self.broken:
            raise OSError("database is gone")
        return self.store.commit(*args, **kwargs)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> object:
        return getattr(self.store, name)


def test_when_the_log_fails_the_journal_keeps_what_was_answered_and_the_rest_fail_closed(
    sqlite_store: SqlStore, tmp_path: Path
) -> None:
    sink = Breakable(sqlite_store)
    writer = AuditWriter(sink, tmp_path / "journal", "node-a")  # type: ignore[arg-type]

    async def scenario() -> None:
        await writer.write(record(0))
        await asyncio.sleep(0.02)
        sink.broken = True
        await writer.write(record(1))  # durable in the journal: answered
        await asyncio.sleep(0.02)  # its flush fails: from now on nothing more is acknowledged
        with pytest.raises(AuditError):
            await writer.write(record(2))
        with pytest.raises(StorageError):
            writer.drain()
        sink.broken = False
        await writer.write(record(3))  # the log is back: the waiting record goes in first

    asyncio.run(scenario())
    writer.drain()
    assert request_ids(sqlite_store) == ["request-0", "request-1", "request-3"]
    writer.close()


def test_a_journal_that_cannot_be_written_fails_closed(
    sqlite_store: SqlStore, tmp_path: Path
) -> None:
    writer = AuditWriter(sqlite_store, tmp_path / "journal", "node-a")

    async def scenario() -> None:
        await writer.write(record(0))
        journal = writer._journal
        assert journal is not None
        full = os.open("/dev/full", os.O_WRONLY)
        os.dup2(full, journal._fd)  # the disk is full: writes fail with ENOSPC
        os.close(full)
        with pytest.raises(AuditError):
            await writer.write(record(1))
        await writer.write(record(2))  # a fresh journal file

    asyncio.run(scenario())
    writer.drain()
    assert request_ids(sqlite_store) == ["request-0", "request-2"]


def test_journal_files_are_locked_while_their_writer_lives(tmp_path: Path) -> None:
    journal = AuditJournal(tmp_path)
    other = os.open(journal.path, os.O_RDONLY)
    with pytest.raises(BlockingIOError):
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.close(other)
    journal.remove()
    assert not journal.path.exists()


def test_records_survive_a_server_killed_mid_load(tmp_path: Path) -> None:
    """SIGKILL the whole server under load; after a restart every answered request is logged.

    Each answered request's record was in a journal or the log when its answer left; the
    restarted workers take the journals in, and each record appears exactly once.
    """
    import base64
    import signal
    import threading

    import requests

    from tests.integration.test_server_process import ServerProcess
    from tests.support.ports import free_port

    port = free_port()
    config = tmp_path / "ekms.toml"
    (tmp_path / "data").mkdir()
    config.write_text(
        f'data_dir = "{tmp_path / "data"}"\nlisten = "127.0.0.1:{port}"\nworkers = 2\n'
        'node_name = "home-1"\n'
    )
    server = ServerProcess(config, port, tmp_path / "server.log").start()
    url = server.url
    try:
        init = requests.post(
            f"{url}/v1/sys/init", json={"secret_shares": 3, "secret_threshold": 2}, timeout=30
        ).json()
        root = init["root_token"]
        for share in init["keys"][:2]:
            unseal = requests.post(f"{url}/v1/sys/unseal", json={"key": share}, timeout=30)
            unseal.raise_for_status()
        headers = {"X-Vault-Token": root}
        requests.post(f"{url}/v1/transit/keys/k", headers=headers, timeout=30).raise_for_status()
        context = base64.b64encode(b"dataset=registry").decode()
        plaintext = base64.b64encode(b"x" * 32).decode()
        answered: list[str] = []
        stop = threading.Event()

        def load() -> None:
            with requests.Session() as session:
                while not stop.is_set():
                    try:
                        response = session.post(
                            f"{url}/v1/transit/encrypt/k",
                            headers=headers,
                            json={"plaintext": plaintext, "context": context},
                            timeout=5,
                        )
                    except requests.RequestException:
                        return
                    if response.status_code == 200:
                        answered.append(response.headers["X-Request-Id"])

        threads = [threading.Thread(target=load) for _ in range(4)]
        for thread in threads:
            thread.start()
        time.sleep(1.5)
        assert server.process is not None
        os.killpg(server.process.pid, signal.SIGKILL)
        server.process.wait()
        stop.set()
        for thread in threads:
            thread.join()
        assert len(answered) > 100
        left = list((tmp_path / "data" / "audit-journal").glob("*.jsonl"))
        assert left, "a killed worker leaves its journal behind"

        server.start()  # the workers take the journals in before they serve
        deadline = time.monotonic() + 30
        while list((tmp_path / "data" / "audit-journal").glob("*.jsonl")) != [] and (
            time.monotonic() < deadline
        ):
            # Only journals of workers that are gone are taken in; the new workers' own
            # files appear once they write, and none has written yet.
            time.sleep(0.1)
        store = SqlStore.open(f"sqlite:///{tmp_path / 'data' / 'ekms.db'}", run_migrations=False)
        try:
            ids = request_ids(store)
            size, root_hash = store.tree_state()
            leaves = store.leaves()
            data = store.audit_leaf_data()
        finally:
            store.dispose()
    finally:
        server.stop()
    assert set(answered) <= set(ids)
    assert len(ids) == len(set(ids))
    # The tree the restarted node holds is the one its stored records hash to.
    assert size == len(ids) == len(leaves)
    assert [leaf_hash(item) for item in data] == leaves
    assert root_from_leaves(leaves) == root_hash


def test_the_journal_is_on_with_sqlite_off_with_postgresql_unless_asked(tmp_path: Path) -> None:
    from api.settings import ConfigError, Settings

    sqlite = Settings(data_dir=tmp_path)
    assert sqlite.journal_dir == tmp_path / "audit-journal"
    postgres = Settings(data_dir=tmp_path, database_url="postgresql+psycopg://db/ekms")
    assert postgres.journal_dir is None
    chosen = Settings(
        data_dir=tmp_path,
        database_url="postgresql+psycopg://db/ekms",
        audit_journal="on",
        audit_journal_dir=str(tmp_path / "j"),
    )
    assert chosen.journal_dir == tmp_path / "j"
    assert Settings(data_dir=tmp_path, audit_journal="off").journal_dir is None
    with pytest.raises(ConfigError, match="audit_journal must be one of: auto, on, off"):
        Settings.from_mapping({"data_dir": str(tmp_path), "audit_journal": True})
