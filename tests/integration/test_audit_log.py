"""The audit table as a Merkle log, on SQLite and PostgreSQL: leaves, ordering, heads, migration.

Two stores on one database stand for two processes (or nodes) writing at once.
"""

from __future__ import annotations

import json
import threading
from typing import TYPE_CHECKING

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config

from kms.audit import Admission, AuditRecord
from kms.audit_export import TreeHead
from kms.canonical import canonical_json
from kms.merkle import EMPTY_ROOT, CompactRange, leaf_hash, root_from_leaves
from storage import sql_store
from storage.sql_store import SqlStore, make_engine

if TYPE_CHECKING:
    from collections.abc import Iterator


@pytest.fixture
def stores(database_url: str) -> Iterator[tuple[SqlStore, SqlStore]]:
    first = SqlStore.open(database_url)
    second = SqlStore.open(database_url, run_migrations=False)
    yield first, second
    first.dispose()
    second.dispose()


def _record(request_id: str, **details: object) -> AuditRecord:
    return AuditRecord(
        time=1_750_000_000.123456,
        request_id=request_id,
        node="test",
        operation="test.op",
        decision="allow",
        status=200,
        principal="p-1",
        details=dict(details),
    )


def _rows(store: SqlStore) -> list[tuple[int, str, bytes]]:
    with store._engine.connect() as conn:
        return [
            (int(i), r, bytes(h))
            for i, r, h in conn.execute(
                sa.text("SELECT seq, record, leaf_hash FROM audit_log ORDER BY seq")
            )
        ]


def test_records_are_canonical_leaves_with_consecutive_indexes(
    stores: tuple[SqlStore, SqlStore],
) -> None:
    store, _ = stores
    assert store.tree_state() == (0, EMPTY_ROOT)
    store.append([_record("a", note="Grüße ✓")])
    store.commit([(_record("b"), None), (_record("c"), Admission(once=((b"x" * 32, 1e10),)))])
    store.commit([(_record("d"), Admission(once=((b"x" * 32, 1e10),)))])  # replay: a denial

    rows = _rows(store)
    assert [i for i, _, _ in rows] == [0, 1, 2, 3]
    for _, text, stored in rows:
        obj = json.loads(text)
        assert canonical_json(obj) == text.encode()  # stored byte for byte as hashed
        assert stored == leaf_hash(text.encode())
        assert obj["time_us"] == 1_750_000_000_123_456
        assert "time" not in obj
    records = store.audit_records()
    assert [r["request_id"] for r in records] == ["a", "b", "c", "d"]
    assert records[0]["details"] == {"note": "Grüße ✓"}
    assert (records[3]["decision"], records[3]["status"]) == ("deny", 401)

    size, root = store.tree_state()
    assert size == 4
    assert root == root_from_leaves(leaf_hash(data) for data in store.audit_leaf_data())
    assert store.leaves(1, 3) == [stored for _, _, stored in rows[1:3]]


def test_details_canonical_json_refuses_do_not_fail_the_batch(
    stores: tuple[SqlStore, SqlStore],
) -> None:
    store, _ = stores
    store.append([_record("odd", ratio=0.5), _record("fine")])
    odd, fine = store.audit_records()
    assert "float" in odd["details"]["unencodable_details"]
    assert fine["request_id"] == "fine"


def test_two_writers_get_gap_free_unique_indexes(stores: tuple[SqlStore, SqlStore]) -> None:
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def write(store: SqlStore, tag: str) -> None:
        try:
            barrier.wait()
            for n in range(60):
                store.commit([(_record(f"{tag}-{n}-{k}"), None) for k in range(1 + n % 3)])
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=write, args=(s, t)) for s, t in zip(stores, "ab", strict=True)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    rows = _rows(stores[0])
    expected = 2 * sum(1 + n % 3 for n in range(60))
    assert [i for i, _, _ in rows] == list(range(expected))
    ids = [json.loads(r)["request_id"] for _, r, _ in rows]
    assert len(set(ids)) == expected
    # Each writer's records keep their order, and both wrote in between the other's.
    for tag in "ab":
        mine = [i for i in ids if i.startswith(tag)]
        assert mine == sorted(mine, key=lambda i: (int(i.split("-")[1]), int(i.split("-")[2])))
    for store in stores:
        assert store.tree_state() == (expected, root_from_leaves(h for _, _, h in rows))


def test_leaf_index_is_unique(stores: tuple[SqlStore, SqlStore]) -> None:
    store, _ = stores
    store.append([_record("a")])
    with pytest.raises(sa.exc.IntegrityError), store._engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO audit_log (time, request_id, node, record, seq, leaf_hash) "
                "VALUES (0, 'x', 'n', '{}', 0, :h)"
            ),
            {"h": b"\0" * 32},
        )


def test_a_failed_batch_leaves_the_tree_as_it_was(
    stores: tuple[SqlStore, SqlStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, other = stores
    store.append([_record("a")])
    before = store.tree_state()

    def broken(*_: object) -> None:
        raise RuntimeError("refused")

    monkeypatch.setattr(sql_store, "_admit", broken)
    with pytest.raises(RuntimeError):
        store.commit([(_record("b"), Admission(use_of="p"))])
    monkeypatch.undo()
    assert store.tree_state() == before
    other.append([_record("c")])
    store.append([_record("d")])  # resumes from the row, not from what it failed to write
    assert [r["request_id"] for r in store.audit_records()] == ["a", "c", "d"]
    assert store.tree_state()[1] == root_from_leaves(store.leaves())


def test_tree_heads(stores: tuple[SqlStore, SqlStore]) -> None:
    store, other = stores
    store.append([_record(str(n)) for n in range(5)])
    size, root = store.tree_state()
    head = TreeHead(size, root, 1_000)
    assert store.add_tree_head(head, "jws-1") is True
    assert other.add_tree_head(TreeHead(size, root, 2_000), "jws-2") is False  # same size: kept
    assert store.tree_heads() == [(head, "jws-1")]
    # A larger head signed earlier than a stored smaller one would break log order.
    store.append([_record("x")])
    size, root = store.tree_state()
    assert store.add_tree_head(TreeHead(size, root, 999), "late") is False
    newer = TreeHead(size, root, 1_000)
    assert store.add_tree_head(newer, "jws-3") is True
    assert store.tree_head() == (newer, "jws-3")
    assert store.tree_head(5) == (head, "jws-1")
    assert store.tree_head(4) is None


def test_migration_re_encodes_existing_records(database_url: str) -> None:
    engine = make_engine(database_url)
    config = Config()
    config.set_main_option("script_location", str(sql_store._MIGRATIONS))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "0004")
    old = [
        {"decision": "allow", "operation": "sys.init", "request_id": "r1", "status": 200},
        {"decision": "deny", "operation": "x", "request_id": "r2", "status": 403, "reason": "no"},
        {
            "decision": "allow",
            "operation": "y",
            "request_id": "r3",
            "status": 200,
            "details": {"n": 1.5},
        },
    ]
    with engine.begin() as conn:
        for n, record in enumerate(old):
            at = 1_700_000_000.25 + n
            conn.execute(
                sa.text(
                    "INSERT INTO audit_log (time, request_id, node, record) "
                    "VALUES (:t, :r, 'n', :rec)"
                ),
                {"t": at, "r": record["request_id"], "rec": json.dumps({**record, "time": at})},
            )
    engine.dispose()

    store = SqlStore.open(database_url)
    try:
        rows = _rows(store)
        assert [i for i, _, _ in rows] == [0, 1, 2]
        records = [json.loads(text) for _, text, _ in rows]
        assert [r["time_us"] for r in records] == [
            1_700_000_000_250_000 + n * 10**6 for n in range(3)
        ]
        assert records[1]["reason"] == "no"
        assert "unencodable_details" in records[2]["details"]
        assert all(h == leaf_hash(t.encode()) for _, t, h in rows)
        assert store.tree_state() == (3, root_from_leaves(h for _, _, h in rows))
        store.append([_record("after")])
        assert [r["request_id"] for r in store.audit_records()] == ["r1", "r2", "r3", "after"]
        assert store.tree_state()[1] == root_from_leaves(store.leaves())
    finally:
        store.dispose()


def test_resuming_from_the_row_equals_appending_in_memory(
    stores: tuple[SqlStore, SqlStore],
) -> None:
    store, other = stores
    compact = CompactRange()
    for n in range(40):
        writer = store if n % 3 else other
        writer.append([_record(f"r{n}")])
        compact.append(leaf_hash(writer.audit_leaf_data(n, n + 1)[0]))
        assert writer.tree_state() == (compact.size, compact.root())
