"""The SQL store's per-process caches and its audit commit, on SQLite and PostgreSQL.

Each test opens two stores on one database: two processes (or nodes) sharing it.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from typing import TYPE_CHECKING

import pytest

from kms.audit import AuditRecord
from kms.custody import ShareSetDescriptor
from kms.keys import Classification, KeyPolicy, KeyType, KeyVersion, Residency, VersionState
from kms.tokens import hash_token
from storage import sql_store
from storage.sql_store import SqlStore

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path


@pytest.fixture
def stores(database_url: str) -> Iterator[tuple[SqlStore, SqlStore]]:
    first = SqlStore.open(database_url)
    second = SqlStore.open(database_url, run_migrations=False)
    yield first, second
    first.dispose()
    second.dispose()


def _key(store: SqlStore, name: str) -> None:
    policy = KeyPolicy(
        name=name,
        key_type=KeyType.AES256_GCM96,
        classification=Classification.SECRET,
        residency=Residency.HSM,
        created_at=time.time(),
    )
    handle = name.encode().ljust(16, b"\0")[:16]
    version = KeyVersion(1, handle, VersionState.PENDING, time.time())
    store.insert_pending_key(policy, version)
    store.activate_version(name, 1, None)


def _record(request_id: str) -> AuditRecord:
    return AuditRecord(
        time=time.time(),
        request_id=request_id,
        node="test",
        operation="test.op",
        decision="allow",
        status=200,
    )


def test_a_cached_policy_follows_changes_made_elsewhere(stores: tuple[SqlStore, SqlStore]) -> None:
    writer, reader = stores
    _key(writer, "k")
    cached = reader.get_policy("k")
    assert cached is not None
    assert cached.min_decryption_version == 1
    assert reader.get_policy("k") is cached  # served from memory

    writer.update_policy(cached.with_changes(min_decryption_version=2, deletion_allowed=True))
    changed = reader.get_policy("k")
    assert changed is not None
    assert changed.min_decryption_version == 2

    writer.mark_deleting("k")
    assert reader.get_policy("k") is None


def test_a_cached_token_is_refused_once_revoked_elsewhere(
    stores: tuple[SqlStore, SqlStore],
) -> None:
    writer, reader = stores
    descriptor = ShareSetDescriptor(
        identifier=1,
        extendable=True,
        iteration_exponent=1,
        group_threshold=1,
        groups=((2, 3),),
        verifier=bytes(32),
        created_at=time.time(),
    )
    writer.complete_initialisation(descriptor, hash_token("ekms.t"), "root-id")
    assert reader.find_token(hash_token("ekms.t")) == ("root-id", ("root",))

    assert writer.revoke_token("root-id", time.time()) is True
    assert reader.find_token(hash_token("ekms.t")) is None
    assert writer.revoke_token("root-id", time.time()) is False


def test_unknown_names_are_not_cached(stores: tuple[SqlStore, SqlStore]) -> None:
    writer, reader = stores
    for n in range(50):
        assert reader.get_policy(f"missing-{n}") is None
        assert reader.find_token(hash_token(f"guess-{n}")) is None
    assert reader._cache.policies == {}
    assert reader._cache.tokens == {}
    _key(writer, "missing-0")
    assert reader.get_policy("missing-0") is not None


def test_audit_commit_waits_for_another_writer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    store = SqlStore.open(url)
    try:
        store.append([_record("before")])  # opens the raw connection
        other = sqlite3.connect(
            tmp_path / "audit.db", isolation_level=None, check_same_thread=False
        )
        other.execute("BEGIN IMMEDIATE")
        threading.Timer(0.2, other.execute, args=("COMMIT",)).start()
        started = time.monotonic()
        store.append([_record("waited")])
        assert time.monotonic() - started >= 0.15

        monkeypatch.setattr(sql_store, "_LOCK_WAIT_SECONDS", 0.1)
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(sqlite3.OperationalError):
            store.append([_record("refused")])
        other.execute("COMMIT")
        other.close()
        store.append([_record("after")])  # the store recovers once the lock is free
        ids = [r["request_id"] for r in store.audit_records()]
        assert ids == ["before", "waited", "after"]
    finally:
        store.dispose()
