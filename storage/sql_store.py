"""The SQL adapter for the metadata ports: SQLite embedded by default, PostgreSQL for several nodes.

Every multi-row change runs in one transaction, so a crash leaves each change whole or absent.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import math
import sqlite3
import struct
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import orjson
from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, delete, event, func, insert, select, text, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from kms.approvals import Approval, Proposal, ProposalKind, ProposalState, Verdict
from kms.audit import JournalEntry, JournalMark, Refusal
from kms.audit_export import TreeHead
from kms.custody import ShareSetDescriptor
from kms.drill import Check, Drill
from kms.errors import ConflictError, InvalidRequestError, StorageError
from kms.identity import Principal, Role
from kms.keys import Classification, KeyPolicy, KeyType, KeyVersion, Residency, VersionState
from kms.merkle import HASH_SIZE, CompactRange, leaf_hash
from kms.rekey import PendingCommit, SealedValuesChangedError, ShareMember
from kms.review import Campaign
from kms.review_service import LastOfficerError
from kms.sealed_values import Purpose, SealedValue
from kms.sites import SiteRecord, StatusChange
from storage.schema import (
    approvals,
    audit_heads,
    audit_journals,
    audit_log,
    drills,
    emergencies,
    generation,
    issued_tokens,
    key_versions,
    meta,
    principals,
    proposals,
    review_campaigns,
    sealed_values,
    share_challenges,
    share_checks,
    share_members,
    sites,
    tokens,
    transit_keys,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

    from kms.audit import Admission, AuditRecord
    from kms.keyring import SetName

log = logging.getLogger("ekms.storage")
K = TypeVar("K")
V = TypeVar("V")
_MIGRATIONS = Path(__file__).parent / "migrations"
_PG_MIGRATION_LOCK = 0x656B6D73  # "ekms": one migrator at a time across nodes
_CACHE_LIMIT = 4096  # entries per cache; only rows that exist are cached, so callers cannot grow it
_READ_GENERATION = "SELECT value FROM generation WHERE name = 'registry'"
_LOCK_WAIT_SECONDS = 10.0
_CHECKPOINT_SECONDS = 0.5
_SQLITE_BUSY = frozenset({sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED})
_SWEEP_SECONDS = 60.0
# meta rows of a loaded domain backup (api.routes_domain): the document, and who imports it
_DOMAIN_IMPORT = "domain_import"
_DOMAIN_IMPORT_CLAIM = "domain_import_claim"
# Set once a request (its asyncio task, its context) has read the registry generation: every
# later read in the same request uses that answer, and any write in it clears the flag.
_GENERATION_READ: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "ekms_generation_read", default=False
)
_SQLITE_SQL = {
    "audit": (
        "INSERT INTO audit_log (time, request_id, node, record, seq, leaf_hash) "
        "VALUES (?, ?, ?, ?, ?, ?)"
    ),
    "tree": 'SELECT size, "range" FROM audit_tree WHERE id = 1',
    "tree_write": 'UPDATE audit_tree SET size = ?, "range" = ? WHERE id = 1',
    "once": "INSERT INTO once_ids (id) VALUES (?) ON CONFLICT DO NOTHING",
    "use": (
        "UPDATE proposals SET uses = uses + ? WHERE id = ? AND state = 'approved' "
        "AND (max_uses IS NULL OR uses + ? <= max_uses)"
    ),
    "issued": (
        "INSERT INTO issued_tokens (jti, principal, roles, scope, proposal_id, jkt, issued_at, "
        "expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
    ),
    "sweep": "DELETE FROM once_ids WHERE id < ?",
    "mark": (
        "INSERT INTO audit_journals (name, ingested) VALUES (?, ?) "
        "ON CONFLICT (name) DO UPDATE SET ingested = excluded.ingested"
    ),
}
_PG_SQL = {name: statement.replace("?", "%s") for name, statement in _SQLITE_SQL.items()}
# SQLite's BEGIN IMMEDIATE already makes writers take turns; PostgreSQL locks the tree's row.
_PG_SQL["tree"] += " FOR UPDATE"
# A head is stored only if it keeps heads in log order (sizes and times rising together): two
# nodes signing at once could otherwise store a larger head with an earlier time.
_INSERT_HEAD = text(
    "INSERT INTO audit_heads (size, root_hash, timestamp_ms, jws) "
    "SELECT :size, :root_hash, :timestamp_ms, :jws WHERE NOT EXISTS ("
    "SELECT 1 FROM audit_heads WHERE (size < :size AND timestamp_ms > :timestamp_ms) "
    "OR (size > :size AND timestamp_ms < :timestamp_ms)) "
    "ON CONFLICT (size) DO NOTHING"
)


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=4, max_overflow=4)


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest revision; safe to call from several nodes at once."""
    config = Config()
    config.set_main_option("script_location", str(_MIGRATIONS))
    with engine.begin() as connection:
        if engine.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_MIGRATION_LOCK})
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


class _RegistryCache:
    """Token, key, principal and revocation rows as of one registry generation."""

    def __init__(self, generation: int) -> None:
        self.generation = generation
        self.policies: dict[str, KeyPolicy] = {}
        self.tokens: dict[bytes, tuple[str, tuple[str, ...]]] = {}
        self.principals: dict[str, Principal] = {}
        self.revoked: frozenset[str] | None = None
        self.emergency: tuple[dict[str, Any]] | None = None
        self.sites: dict[str, SiteRecord] | None = None


class SqlStore:
    """Implements ``KeyStore``, ``CustodyStore``, ``TokenStore`` and ``AuditSink``.

    Every request needs its token and its key's policy. Reading them through SQLAlchemy costs
    more than the HSM operation itself, so each process keeps them in memory and checks, once
    per read, a single counter that every change bumps in its own transaction (one indexed
    row through a raw DBAPI connection). A revocation, rotation or new
    ``min_decryption_version`` committed by any process or node is therefore seen by the
    next request everywhere: the cache is never stale, only cheaper.
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._cache = _RegistryCache(-1)
        self._local = threading.local()
        self._raw_lock = threading.Lock()
        self._raw: list[Any] = []
        self._checkpointer: threading.Thread | None = None
        self._last_sweep = 0.0
        self._stopping = threading.Event()
        self._before_audit_read: Callable[[], None] | None = None
        # The audit tree's row as this process last committed it: (its stored range, the range).
        # A batch that reads the same bytes from the locked row resumes without parsing them.
        self._tree: tuple[bytes, CompactRange] | None = None

    def __repr__(self) -> str:
        return f"SqlStore({self._engine.dialect.name})"

    @classmethod
    def open(cls, url: str, *, run_migrations: bool = True) -> SqlStore:
        engine = make_engine(url)
        if run_migrations:
            migrate(engine)
        return cls(engine)

    def dispose(self) -> None:
        self._stopping.set()
        if self._checkpointer is not None:
            self._checkpointer.join(timeout=5)
        with self._raw_lock:
            raw, self._raw = self._raw, []
        for connection in raw:
            connection.invalidate()
        self._engine.dispose()

    # --- registry cache -------------------------------------------------------------------

    def _raw_connection(self) -> Any:
        connection = getattr(self._local, "raw", None)
        if connection is None:
            connection = self._engine.raw_connection()
            driver: Any = connection.driver_connection
            if self._engine.dialect.name == "postgresql":
                # Each read must see the newest commit, without holding a transaction open.
                driver.autocommit = True
            else:
                driver.execute("PRAGMA busy_timeout = 0")  # see _begin_immediate
                # A checkpoint copies the log into the database and syncs it: milliseconds
                # that would stall this worker's event loop. A background thread does it.
                driver.execute("PRAGMA wal_autocheckpoint = 0")
                self._start_checkpointer()
            self._local.raw = connection
            with self._raw_lock:
                self._raw.append(connection)
        return connection

    def begin_request(self) -> None:
        """Read the registry generation once for this request; its cached reads then use it.

        A request is ordered at its start: a change committed by anyone before it began is
        seen, a change committed while it runs may or may not be, as for any concurrent
        request. A request's own writes clear the mark, so it always reads what it wrote.
        """
        self._refresh()
        _GENERATION_READ.set(True)

    def _current(self) -> _RegistryCache:
        if _GENERATION_READ.get():
            return self._cache
        return self._refresh()

    def _refresh(self) -> _RegistryCache:
        """The cache, emptied first if any process has committed a change since it was filled."""
        try:
            row = self._raw_connection().driver_connection.execute(_READ_GENERATION).fetchone()
        except Exception as exc:
            self._drop_raw_connection()
            raise StorageError("metadata store unavailable") from exc
        value = -1 if row is None else int(row[0])
        cache = self._cache
        if cache.generation != value:
            cache = self._cache = _RegistryCache(value)
        return cache

    def _start_checkpointer(self) -> None:
        with self._raw_lock:
            if self._checkpointer is None:
                self._checkpointer = threading.Thread(
                    target=self._checkpoint_loop, name="sqlite-checkpoint", daemon=True
                )
                self._checkpointer.start()

    def _checkpoint_loop(self) -> None:
        """Keep the write-ahead log short without making a request wait for it.

        PASSIVE never blocks writers; SQLite releases the GIL while it copies. With several
        workers each runs one of these; a checkpoint that finds another running just skips.
        """
        while not self._stopping.wait(_CHECKPOINT_SECONDS):
            try:
                with self._engine.connect() as conn:
                    conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)")
            except SQLAlchemyError as exc:
                log.warning("SQLite checkpoint failed: %s", type(exc).__name__)

    def _drop_raw_connection(self) -> None:
        connection = getattr(self._local, "raw", None)
        self._local.raw = None
        if connection is not None:
            with self._raw_lock:
                if connection in self._raw:
                    self._raw.remove(connection)
            connection.invalidate()

    @staticmethod
    def _bump(conn: Any) -> None:
        _GENERATION_READ.set(False)
        conn.execute(
            update(generation)
            .where(generation.c.name == "registry")
            .values(value=generation.c.value + 1)
        )

    # --- custody --------------------------------------------------------------------------

    def get_share_set(self) -> ShareSetDescriptor | None:
        value = self._meta("share_set")
        return None if value is None else ShareSetDescriptor.from_json(value)

    def _meta(self, name: str) -> Any:
        try:
            with self._engine.connect() as conn:
                row = conn.execute(select(meta.c.value).where(meta.c.name == name)).first()
        except SQLAlchemyError as exc:
            raise StorageError("metadata store unavailable") from exc
        return None if row is None else json.loads(row[0])

    def is_initialised(self) -> bool:
        return self.get_share_set() is not None

    def claim_initialisation(self, started_at: float) -> None:
        try:
            with self._engine.begin() as conn:
                conn.execute(
                    insert(meta).values(
                        name="init", value=json.dumps({"state": "pending"}), updated_at=started_at
                    )
                )
        except IntegrityError:
            raise ConflictError("Vault is already initialized") from None
        except SQLAlchemyError as exc:
            raise StorageError("metadata store unavailable") from exc

    def complete_initialisation(
        self,
        descriptor: ShareSetDescriptor,
        root_token_hash: bytes,
        token_id: str,
        members: Sequence[ShareMember] = (),
    ) -> None:
        now = time.time()
        with self._engine.begin() as conn:
            self._bump(conn)
            conn.execute(
                insert(meta).values(
                    name="share_set", value=json.dumps(descriptor.to_json()), updated_at=now
                )
            )
            _insert_members(conn, (descriptor.identifier, descriptor.generation), members, now)
            conn.execute(
                update(meta)
                .where(meta.c.name == "init")
                .values(value=json.dumps({"state": "done"}), updated_at=now)
            )
            conn.execute(
                insert(tokens).values(
                    id=token_id,
                    token_hash=root_token_hash,
                    policies=json.dumps(["root"]),
                    created_at=now,
                )
            )

    def abandon_initialisation(self) -> None:
        with self._engine.begin() as conn:
            conn.execute(delete(meta).where(meta.c.name == "init"))

    # --- custody lifecycle: rekey commit, members, share checks, drills -------------------

    def pending_rekey(self) -> PendingCommit | None:
        value = self._meta("rekey_commit")
        if value is None:
            return None
        pending = PendingCommit.from_json(value)
        return replace(pending, members=tuple(self.share_members(pending.target)))

    def begin_rekey_commit(self, pending: PendingCommit) -> None:
        """Step (1) of a rekey commit: the row and the new set's members, in one transaction."""
        now = time.time()
        try:
            with self._engine.begin() as conn:
                conn.execute(
                    insert(meta).values(
                        name="rekey_commit", value=json.dumps(pending.to_json()), updated_at=now
                    )
                )
                _insert_members(conn, pending.target, pending.members, now)
        except IntegrityError:
            raise ConflictError("a rekey commit is already pending") from None
        except SQLAlchemyError as exc:
            raise StorageError("metadata store unavailable") from exc

    def finish_rekey_commit(self, pending: PendingCommit) -> None:
        """Step (3): the new set in force and the row gone, together; repeatable."""
        now = time.time()
        try:
            with self._engine.begin() as conn:
                row = conn.execute(
                    select(meta.c.value).where(meta.c.name == "rekey_commit")
                ).first()
                if row is None:
                    current = conn.execute(
                        select(meta.c.value).where(meta.c.name == "share_set")
                    ).scalar_one()
                    if ShareSetDescriptor.from_json(json.loads(current)) != pending.descriptor:
                        raise StorageError(
                            "the rekey commit row is gone but its share set is not in force"
                        )
                    return
                if PendingCommit.from_json(json.loads(row[0])).target != pending.target:
                    raise StorageError("the pending rekey commit is for another share set")
                conn.execute(
                    update(meta)
                    .where(meta.c.name == "share_set")
                    .values(value=json.dumps(pending.descriptor.to_json()), updated_at=now)
                )
                _swap_resealed(conn, pending, now)
                conn.execute(delete(meta).where(meta.c.name == "rekey_commit"))
                self._bump(conn)
        except SQLAlchemyError as exc:
            raise StorageError("metadata store unavailable") from exc

    def share_members(self, name: SetName) -> list[ShareMember]:
        identifier, generation = name
        with self._reading() as conn:
            rows = conn.execute(
                select(share_members.c.member, share_members.c.commitment, share_members.c.holder)
                .where(share_members.c.set_identifier == identifier)
                .where(share_members.c.set_generation == generation)
                .order_by(share_members.c.member)
            ).all()
        return [ShareMember(str(r[0]), None if r[1] is None else bytes(r[1]), r[2]) for r in rows]

    # --- sealed values (kms.sealed_values) ----------------------------------------------------

    def sealed_value(self, name: str) -> SealedValue | None:
        try:
            with self._engine.connect() as conn:
                row = conn.execute(
                    select(sealed_values.c.purpose, sealed_values.c.blob).where(
                        sealed_values.c.name == name
                    )
                ).first()
        except SQLAlchemyError as exc:
            raise StorageError("metadata store unavailable") from exc
        return None if row is None else SealedValue(name, Purpose(row[0]), bytes(row[1]))

    def all_sealed_values(self) -> list[SealedValue]:
        try:
            with self._engine.connect() as conn:
                rows = conn.execute(
                    select(
                        sealed_values.c.name, sealed_values.c.purpose, sealed_values.c.blob
                    ).order_by(sealed_values.c.name)
                ).all()
        except SQLAlchemyError as exc:
            raise StorageError("metadata store unavailable") from exc
        return [SealedValue(str(r[0]), Purpose(r[1]), bytes(r[2])) for r in rows]

    def put_sealed_value(self, value: SealedValue, *, only_if_absent: bool = False) -> bool:
        """Store ``value``; with ``only_if_absent``, False (and nothing written) if one exists.

        The first of several workers to seal a value wins; the others read the winner's.
        """
        now = time.time()
        row = {"purpose": value.purpose.value, "blob": value.blob, "updated_at": now}
        try:
            with self._engine.begin() as conn:
                found = conn.execute(
                    select(sealed_values.c.name).where(sealed_values.c.name == value.name)
                ).first()
                if found is not None and only_if_absent:
                    return False
                if found is None:
                    conn.execute(insert(sealed_values).values(name=value.name, **row))
                else:
                    conn.execute(
                        update(sealed_values)
                        .where(sealed_values.c.name == value.name)
                        .values(**row)
                    )
        except IntegrityError:
            if only_if_absent:
                return False
            raise ConflictError(f"sealed value {value.name!r} was written concurrently") from None
        except SQLAlchemyError as exc:
            raise StorageError("metadata store unavailable") from exc
        return True

    def claim_holder(self, name: SetName, member: str, principal: str) -> None:
        """Record who holds a member, unless someone is recorded already."""
        identifier, generation = name
        with self._writing() as conn:
            conn.execute(
                update(share_members)
                .where(share_members.c.set_identifier == identifier)
                .where(share_members.c.set_generation == generation)
                .where(share_members.c.member == member)
                .where(share_members.c.holder.is_(None))
                .values(holder=principal)
            )

    def issue_challenge(self, id_hash: bytes, expires_at: float, now: float, limit: int) -> bool:
        """Store a one-time challenge; False if ``limit`` unexpired ones are outstanding."""
        with self._writing() as conn:
            conn.execute(delete(share_challenges).where(share_challenges.c.expires_at < now))
            outstanding = conn.execute(
                select(func.count()).select_from(share_challenges)
            ).scalar_one()
            if outstanding >= limit:
                return False
            conn.execute(insert(share_challenges).values(id=id_hash, expires_at=expires_at))
        return True

    def spend_challenge(self, id_hash: bytes, now: float) -> bool:
        """Consume a challenge in a transaction of its own; False if unknown, spent or expired."""
        try:
            with self._engine.begin() as conn:
                deleted = conn.execute(
                    delete(share_challenges)
                    .where(share_challenges.c.id == id_hash)
                    .where(share_challenges.c.expires_at >= now)
                ).rowcount
        except SQLAlchemyError as exc:
            raise StorageError("metadata store unavailable") from exc
        return deleted == 1

    def record_share_check(self, name: SetName, check: Check) -> None:
        identifier, generation = name
        with self._writing() as conn:
            conn.execute(
                insert(share_checks).values(
                    set_identifier=identifier,
                    set_generation=generation,
                    member=check.member,
                    at=check.at,
                    official=check.official,
                    drill_id=check.drill,
                )
            )

    def share_checks(self, name: SetName) -> list[Check]:
        identifier, generation = name
        with self._reading() as conn:
            rows = conn.execute(
                select(
                    share_checks.c.member,
                    share_checks.c.at,
                    share_checks.c.official,
                    share_checks.c.drill_id,
                )
                .where(share_checks.c.set_identifier == identifier)
                .where(share_checks.c.set_generation == generation)
                .order_by(share_checks.c.id)
            ).all()
        return [Check(str(r[0]), float(r[1]), r[2], r[3]) for r in rows]

    def insert_drill(self, drill: Drill) -> None:
        with self._writing() as conn:
            conn.execute(
                insert(drills).values(
                    id=drill.id, started_at=drill.started_at, body=json.dumps(drill.to_json())
                )
            )

    def drill(self, drill_id: str) -> Drill | None:
        with self._reading() as conn:
            body = conn.execute(select(drills.c.body).where(drills.c.id == drill_id)).scalar()
        return None if body is None else Drill.from_json(json.loads(body))

    def list_drills(self, limit: int = 100) -> list[Drill]:
        with self._reading() as conn:
            rows = conn.execute(
                select(drills.c.body).order_by(drills.c.started_at.desc()).limit(limit)
            ).all()
        return [Drill.from_json(json.loads(r[0])) for r in rows]

    # --- sealed backend credential (hsm.transit_backend.TransitLogin) ------------------------

    def replace_sealed_value(self, value: SealedValue, *, expected: bytes) -> bool:
        """Put ``value`` in place of the stored blob ``expected``; False if that is not stored.

        Compare-and-swap, so that a credential sealed under keys a rekey has since replaced
        (the rekey resealed the blob) or a concurrent rotation is never overwritten.
        """
        try:
            with self._engine.begin() as conn:
                done = conn.execute(
                    update(sealed_values)
                    .where(sealed_values.c.name == value.name)
                    .where(sealed_values.c.blob == expected)
                    .values(purpose=value.purpose.value, blob=value.blob, updated_at=time.time())
                )
        except SQLAlchemyError as exc:
            raise StorageError("metadata store unavailable") from exc
        return bool(done.rowcount == 1)

    # --- domain backup (kms.domain_backup, api.routes_domain) ----------------------------------

    def load_domain(
        self,
        descriptor: ShareSetDescriptor,
        members: Sequence[ShareMember],
        document: str,
        at: float,
    ) -> None:
        """A new node takes a domain backup's share set and keeps the backup for its first
        unseal, in one transaction; ``ConflictError`` if it is initialised or being so."""
        try:
            with self._engine.begin() as conn:
                conn.execute(
                    insert(meta).values(
                        name="init",
                        value=json.dumps({"state": "done", "by": "domain-load"}),
                        updated_at=at,
                    )
                )
                conn.execute(
                    insert(meta).values(
                        name="share_set", value=json.dumps(descriptor.to_json()), updated_at=at
                    )
                )
                _insert_members(conn, (descriptor.identifier, descriptor.generation), members, at)
                conn.execute(
                    insert(meta).values(name=_DOMAIN_IMPORT, value=document, updated_at=at)
                )
                self._bump(conn)
        except IntegrityError:
            raise ConflictError(
                "this node is initialised already: a domain backup is loaded only on a new node"
            ) from None
        except SQLAlchemyError as exc:
            raise StorageError("metadata store unavailable") from exc

    def pending_domain_import(self) -> str | None:
        """The loaded backup (its JSON) while its import has not finished."""
        try:
            with self._engine.connect() as conn:
                row = conn.execute(
                    select(meta.c.value).where(meta.c.name == _DOMAIN_IMPORT)
                ).first()
        except SQLAlchemyError as exc:
            raise StorageError("metadata store unavailable") from exc
        return None if row is None else str(row[0])

    def claim_domain_import(self, holder: str, now: float, stale_after: float) -> bool:
        """Take the one import lock of the store; False while another holder's is fresh.

        Workers and nodes sharing the store import one at a time; a holder that died is
        replaced once its claim is ``stale_after`` seconds old.
        """
        claim = json.dumps({"holder": holder, "at": now})
        try:
            with self._engine.begin() as conn:
                row = conn.execute(
                    select(meta.c.value).where(meta.c.name == _DOMAIN_IMPORT_CLAIM)
                ).first()
                if row is None:
                    conn.execute(
                        insert(meta).values(name=_DOMAIN_IMPORT_CLAIM, value=claim, updated_at=now)
                    )
                    return True
                if float(json.loads(row[0]).get("at", 0.0)) > now - stale_after:
                    return False
                taken = conn.execute(
                    update(meta)
                    .where(meta.c.name == _DOMAIN_IMPORT_CLAIM, meta.c.value == row[0])
                    .values(value=claim, updated_at=now)
                ).rowcount
                return bool(taken == 1)
        except IntegrityError:
            return False
        except SQLAlchemyError as exc:
            raise StorageError("metadata store unavailable") from exc

    def release_domain_import(self, holder: str, *, finished: bool) -> None:
        """Drop ``holder``'s claim; with ``finished``, the loaded backup too (the last step)."""
        try:
            with self._engine.begin() as conn:
                row = conn.execute(
                    select(meta.c.value).where(meta.c.name == _DOMAIN_IMPORT_CLAIM)
                ).first()
                if row is not None and json.loads(row[0]).get("holder") == holder:
                    conn.execute(delete(meta).where(meta.c.name == _DOMAIN_IMPORT_CLAIM))
                if finished:
                    conn.execute(delete(meta).where(meta.c.name == _DOMAIN_IMPORT))
        except SQLAlchemyError as exc:
            raise StorageError("metadata store unavailable") from exc

    # --- sites (kms.sites) ------------------------------------------------------------------

    def sites(self) -> list[SiteRecord]:
        """Every site this site knows, by name."""
        return list(self._site_map().values())

    def site(self, name: str) -> SiteRecord | None:
        """One site's row; every key operation reads this site's own (``require_serving``)."""
        return self._site_map().get(name)

    def _site_map(self) -> dict[str, SiteRecord]:
        """The whole table, cached per registry generation: a handful of rows, all small."""
        cache = self._current()
        found = cache.sites
        if found is None:
            with self._reading() as conn:
                rows = conn.execute(select(sites).order_by(sites.c.name)).all()
            found = cache.sites = {row.name: self._site_record(row) for row in rows}
        return found

    def insert_site(self, record: SiteRecord, *, only_if_absent: bool = False) -> bool:
        """Add a row; with ``only_if_absent``, False (nothing written) if the name is taken."""
        row = self._site_row(record)
        try:
            with self._writing() as conn:
                conn.execute(insert(sites).values(**row))
        except IntegrityError:
            if only_if_absent:
                return False
            raise ConflictError(f"site {record.name!r} is already registered") from None
        return True

    def set_site_audit_key(self, name: str, jwk: Mapping[str, str], at: float) -> bool:
        with self._writing() as conn:
            count = conn.execute(
                update(sites)
                .where(sites.c.name == name)
                .values(audit_public_key=self._jwk_text(jwk), updated_at=at)
            ).rowcount
        return bool(count)

    def change_site_statuses(
        self, changes: Sequence[StatusChange], at: float, *, revoke_tokens: bool = False
    ) -> bool:
        """Every change, each only if its row still has the status expected, or none at all.

        A compare-and-set, so two nodes cannot both act on one decision. The generation is
        bumped first: its row lock makes registry changes take turns. ``revoke_tokens``
        revokes every token issued here, access tokens and root tokens, in the same
        transaction (a retired site keeps no authority).
        """
        try:
            with self._engine.connect() as conn, conn.begin() as transaction:
                self._bump(conn)
                for change in changes:
                    count = conn.execute(
                        update(sites)
                        .where(sites.c.name == change.name, sites.c.status == change.expect.value)
                        .values(status=change.status.value, updated_at=at)
                    ).rowcount
                    if count != 1:
                        transaction.rollback()
                        return False
                if revoke_tokens:
                    conn.execute(
                        update(issued_tokens)
                        .where(issued_tokens.c.revoked_at.is_(None))
                        .values(revoked_at=at)
                    )
                    conn.execute(
                        update(tokens).where(tokens.c.revoked_at.is_(None)).values(revoked_at=at)
                    )
        except SQLAlchemyError as exc:
            raise StorageError("metadata store unavailable") from exc
        return True

    @staticmethod
    def _site_row(record: SiteRecord) -> dict[str, Any]:
        key = record.audit_public_key
        return {
            "name": record.name,
            "kind": record.kind.value,
            "backend": record.backend.value,
            "status": record.status.value,
            "url": record.url,
            "audit_public_key": None if key is None else SqlStore._jwk_text(key),
            "registered_at": record.registered_at,
            "updated_at": record.updated_at,
            "note": record.note,
        }

    @staticmethod
    def _jwk_text(jwk: Mapping[str, str]) -> str:
        return orjson.dumps(dict(jwk), option=orjson.OPT_SORT_KEYS).decode()

    @staticmethod
    def _site_record(row: Any) -> SiteRecord:
        try:
            return SiteRecord.from_json(
                {
                    **row._asdict(),
                    "audit_public_key": (
                        None if row.audit_public_key is None else orjson.loads(row.audit_public_key)
                    ),
                }
            )
        except (orjson.JSONDecodeError, InvalidRequestError) as exc:
            raise StorageError(f"the stored row of site {row.name!r} is corrupt") from exc

    # --- tokens ---------------------------------------------------------------------------

    def find_token(self, token_hash: bytes) -> tuple[str, Sequence[str]] | None:
        return _cached(self._current().tokens, token_hash, self._load_token)

    def revoke_token(self, token_id: str, at: float) -> bool:
        """Returns False if no live token has that id."""
        try:
            with self._engine.begin() as conn:
                result = conn.execute(
                    update(tokens)
                    .where(tokens.c.id == token_id, tokens.c.revoked_at.is_(None))
                    .values(revoked_at=at)
                )
                if result.rowcount:
                    self._bump(conn)
        except SQLAlchemyError as exc:
            raise StorageError("metadata store unavailable") from exc
        return bool(result.rowcount)

    def insert_token(
        self, token_id: str, token_hash: bytes, policies: Sequence[str], created_at: float
    ) -> None:
        """Store a token's hash (never its value); the bump makes every node see it at once."""
        try:
            with self._engine.begin() as conn:
                conn.execute(
                    insert(tokens).values(
                        id=token_id,
                        token_hash=token_hash,
                        policies=json.dumps(list(policies)),
                        created_at=created_at,
                    )
                )
                self._bump(conn)
        except IntegrityError:
            raise ConflictError("a token with that id or hash already exists") from None
        except SQLAlchemyError as exc:
            raise StorageError("metadata store unavailable") from exc

    def _load_token(self, token_hash: bytes) -> tuple[str, tuple[str, ...]] | None:
        with self._reading() as conn:
            row = conn.execute(
                select(tokens.c.id, tokens.c.policies).where(
                    tokens.c.token_hash == token_hash, tokens.c.revoked_at.is_(None)
                )
            ).first()
        return None if row is None else (row[0], tuple(json.loads(row[1])))

    # --- keys -----------------------------------------------------------------------------

    def get_policy(self, name: str) -> KeyPolicy | None:
        return _cached(self._current().policies, name, self._load_policy)

    def _load_policy(self, name: str) -> KeyPolicy | None:
        policy = self.stored_key(name)
        if policy is None or policy.latest_version == 0:
            return None  # creation still pending: not visible yet
        return policy

    def stored_key(self, name: str) -> KeyPolicy | None:
        """Uncached, with versions in every state; ``latest_version`` 0 while pending."""
        with self._reading() as conn:
            key = conn.execute(select(transit_keys).where(transit_keys.c.name == name)).first()
            if key is None:
                return None
            rows = conn.execute(select(key_versions).where(key_versions.c.key_name == name)).all()
        return KeyPolicy(
            name=key.name,
            key_type=KeyType(key.key_type),
            classification=Classification(key.classification),
            residency=Residency(key.residency),
            created_at=key.created_at,
            latest_version=key.latest_version,
            min_decryption_version=key.min_decryption_version,
            min_encryption_version=key.min_encryption_version,
            deletion_allowed=key.deletion_allowed,
            versions={r.version: _version(r) for r in rows},
            origin_site=key.origin_site,
        )

    def list_names(self) -> list[str]:
        with self._engine.connect() as conn:
            return list(
                conn.execute(
                    select(transit_keys.c.name)
                    .where(transit_keys.c.latest_version > 0)
                    .order_by(transit_keys.c.name)
                ).scalars()
            )

    def insert_pending_key(self, policy: KeyPolicy, version: KeyVersion) -> None:
        try:
            with self._engine.begin() as conn:
                conn.execute(
                    insert(transit_keys).values(
                        name=policy.name,
                        key_type=policy.key_type.value,
                        classification=policy.classification.value,
                        residency=policy.residency.value,
                        latest_version=0,
                        min_decryption_version=policy.min_decryption_version,
                        min_encryption_version=policy.min_encryption_version,
                        deletion_allowed=policy.deletion_allowed,
                        created_at=policy.created_at,
                        updated_at=policy.created_at,
                        origin_site=policy.origin_site,
                    )
                )
                conn.execute(insert(key_versions).values(**_version_row(policy.name, version)))
        except IntegrityError:
            raise ConflictError(f"key {policy.name!r} already exists") from None

    def insert_pending_version(self, name: str, version: KeyVersion) -> None:
        try:
            with self._engine.begin() as conn:
                conn.execute(insert(key_versions).values(**_version_row(name, version)))
        except IntegrityError:
            raise ConflictError(
                f"key {name!r} was rotated concurrently; retry the rotation"
            ) from None

    def activate_version(
        self,
        name: str,
        version: int,
        public_key: bytes | None,
        wrapped: bytes | None = None,
        escrow: bytes | None = None,
    ) -> None:
        with self._engine.begin() as conn:
            self._bump(conn)
            conn.execute(
                update(key_versions)
                .where(key_versions.c.key_name == name, key_versions.c.version == version)
                .values(
                    state=VersionState.ACTIVE.value,
                    public_key=public_key,
                    wrapped_working_key=wrapped,
                    escrow=escrow,
                )
            )
            conn.execute(
                update(transit_keys)
                .where(transit_keys.c.name == name, transit_keys.c.latest_version < version)
                .values(latest_version=version, updated_at=time.time())
            )

    def update_policy(self, policy: KeyPolicy) -> None:
        with self._engine.begin() as conn:
            self._bump(conn)
            conn.execute(
                update(transit_keys)
                .where(transit_keys.c.name == policy.name)
                .values(
                    min_decryption_version=policy.min_decryption_version,
                    min_encryption_version=policy.min_encryption_version,
                    deletion_allowed=policy.deletion_allowed,
                    updated_at=time.time(),
                )
            )

    def mark_deleting(self, name: str) -> None:
        with self._engine.begin() as conn:
            self._bump(conn)
            conn.execute(
                update(key_versions)
                .where(key_versions.c.key_name == name)
                .values(state=VersionState.DELETING.value)
            )
            conn.execute(
                update(transit_keys)
                .where(transit_keys.c.name == name)
                .values(latest_version=0, updated_at=time.time())
            )

    def deleting_versions(self) -> list[tuple[str, KeyVersion]]:
        with self._engine.connect() as conn:
            rows = conn.execute(
                select(key_versions).where(key_versions.c.state == VersionState.DELETING.value)
            ).all()
        return [(r.key_name, _version(r)) for r in rows]

    def pending_versions(self, older_than: float) -> list[tuple[str, KeyVersion]]:
        with self._engine.connect() as conn:
            rows = conn.execute(
                select(key_versions).where(
                    key_versions.c.state == VersionState.PENDING.value,
                    key_versions.c.created_at < older_than,
                )
            ).all()
        return [(r.key_name, _version(r)) for r in rows]

    def discard_version(self, name: str, version: int) -> None:
        """Drop a pending or deleting version; a key left with no version goes too."""
        with self._engine.begin() as conn:
            self._bump(conn)
            conn.execute(
                delete(key_versions).where(
                    key_versions.c.key_name == name,
                    key_versions.c.version == version,
                    key_versions.c.state != VersionState.ACTIVE.value,
                )
            )
            remaining = conn.execute(
                select(key_versions.c.version).where(key_versions.c.key_name == name)
            ).first()
            if remaining is None:
                conn.execute(delete(transit_keys).where(transit_keys.c.name == name))

    def all_handles(self) -> set[bytes]:
        with self._engine.connect() as conn:
            return {bytes(h) for h in conn.execute(select(key_versions.c.handle)).scalars()}

    # --- identities, issued tokens, proposals, emergencies ------------------------------------

    def principal(self, principal_id: str) -> Principal | None:
        return _cached(self._current().principals, principal_id, self._load_principal)

    def _load_principal(self, principal_id: str) -> Principal | None:
        with self._reading() as conn:
            row = conn.execute(select(principals).where(principals.c.id == principal_id)).first()
        return None if row is None else _principal(row)

    def list_principals(self) -> list[Principal]:
        with self._reading() as conn:
            rows = conn.execute(select(principals).order_by(principals.c.id)).all()
        return [_principal(r) for r in rows]

    def insert_principal(self, principal: Principal) -> None:
        try:
            with self._writing() as conn:
                conn.execute(insert(principals).values(**_principal_row(principal)))
        except IntegrityError:
            raise ConflictError(
                f"principal {principal.id!r} exists, or its key is registered to another"
            ) from None

    def update_principal(self, principal: Principal) -> None:
        try:
            with self._writing() as conn:
                conn.execute(
                    update(principals)
                    .where(principals.c.id == principal.id)
                    .values(**_principal_row(principal))
                )
        except IntegrityError:
            raise ConflictError("that key is registered to another principal") from None

    def revoked_jtis(self) -> frozenset[str]:
        """Revoked tokens that have not expired yet: the set every request is checked against."""
        cache = self._current()
        if cache.revoked is None:
            with self._reading() as conn:
                jtis = conn.execute(
                    select(issued_tokens.c.jti).where(
                        issued_tokens.c.revoked_at.is_not(None),
                        issued_tokens.c.expires_at > time.time() - 60,
                    )
                ).scalars()
                cache.revoked = frozenset(jtis)
        return cache.revoked

    def issued_token(self, jti: str) -> dict[str, Any] | None:
        with self._reading() as conn:
            row = conn.execute(select(issued_tokens).where(issued_tokens.c.jti == jti)).first()
        return None if row is None else _issued(row)

    def issued_tokens(
        self, *, principal: str | None = None, limit: int = 1000
    ) -> list[dict[str, Any]]:
        query = select(issued_tokens).order_by(issued_tokens.c.issued_at.desc()).limit(limit)
        if principal is not None:
            query = query.where(issued_tokens.c.principal == principal)
        with self._reading() as conn:
            return [_issued(r) for r in conn.execute(query).all()]

    def revoke_jtis(
        self,
        at: float,
        *,
        jti: str | None = None,
        proposal_id: str | None = None,
        principal: str | None = None,
    ) -> int:
        """Revoke issued tokens by id, by grant or by principal; returns how many."""
        query = update(issued_tokens).where(issued_tokens.c.revoked_at.is_(None))
        if jti is not None:
            query = query.where(issued_tokens.c.jti == jti)
        if proposal_id is not None:
            query = query.where(issued_tokens.c.proposal_id == proposal_id)
        if principal is not None:
            query = query.where(issued_tokens.c.principal == principal)
        with self._writing() as conn:
            count = conn.execute(query.values(revoked_at=at)).rowcount
        return int(count)

    def insert_proposal(self, proposal: Proposal, *, max_uses: int | None) -> None:
        try:
            with self._writing() as conn:
                conn.execute(
                    insert(proposals).values(
                        id=proposal.id,
                        kind=proposal.kind.value,
                        requester=proposal.requester,
                        payload=orjson.dumps(
                            proposal.payload, option=orjson.OPT_SORT_KEYS
                        ).decode(),
                        audience=proposal.audience,
                        created_at=proposal.created_at,
                        expires_at=proposal.expires_at,
                        state=ProposalState.PENDING.value,
                        decided_at=None,
                        uses=0,
                        max_uses=max_uses,
                    )
                )
        except IntegrityError:
            raise ConflictError(f"proposal {proposal.id!r} exists") from None

    def proposal(self, proposal_id: str) -> StoredProposal | None:
        with self._reading() as conn:
            row = conn.execute(select(proposals).where(proposals.c.id == proposal_id)).first()
            if row is None:
                return None
            votes = conn.execute(
                select(approvals)
                .where(approvals.c.proposal_id == proposal_id)
                .order_by(approvals.c.signed_at)
            ).all()
        return _stored_proposal(row, votes)

    def list_proposals(
        self,
        *,
        kind: str | None = None,
        state: str | None = None,
        party: str | None = None,
        limit: int = 200,
    ) -> list[StoredProposal]:
        """Newest first. ``party``: only proposals it filed, or restores naming it as the tool."""
        query = select(proposals).order_by(proposals.c.created_at.desc(), proposals.c.id)
        if kind is not None:
            query = query.where(proposals.c.kind == kind)
        if state is not None:
            query = query.where(proposals.c.state == state)
        if party is not None:
            tool = orjson.dumps({"tool": party}).decode()[1:-1]  # '"tool":"<id>"', sorted keys
            query = query.where(
                (proposals.c.requester == party)
                | proposals.c.payload.contains(tool, autoescape=True)
            )
        with self._reading() as conn:
            rows = conn.execute(query.limit(limit)).all()
            votes = conn.execute(
                select(approvals).where(approvals.c.proposal_id.in_([r.id for r in rows]))
            ).all()
        by_id: dict[str, list[Any]] = {}
        for vote in votes:
            by_id.setdefault(vote.proposal_id, []).append(vote)
        return [_stored_proposal(r, by_id.get(r.id, [])) for r in rows]

    def add_approval(self, approval: Approval) -> None:
        try:
            with self._writing() as conn:
                conn.execute(
                    insert(approvals).values(
                        proposal_id=approval.proposal_id,
                        official=approval.official,
                        verdict=approval.verdict.value,
                        signed_at=approval.signed_at,
                        signature=approval.signature,
                    )
                )
        except IntegrityError:
            raise ConflictError(
                f"{approval.official!r} has already decided on this proposal"
            ) from None

    def set_proposal_state(
        self, proposal_id: str, state: ProposalState, at: float, *, expect: ProposalState
    ) -> bool:
        """Compare-and-set, so that two nodes cannot both act on one approval."""
        with self._writing() as conn:
            count = conn.execute(
                update(proposals)
                .where(proposals.c.id == proposal_id, proposals.c.state == expect.value)
                .values(state=state.value, decided_at=at)
            ).rowcount
        return bool(count)

    def emergency(self, now: float) -> dict[str, Any] | None:
        """The emergency in force at ``now``, if any (cached per registry generation)."""
        cache = self._current()
        if cache.emergency is None:
            with self._reading() as conn:
                row = conn.execute(
                    select(
                        emergencies.c.proposal_id,
                        emergencies.c.declared_at,
                        emergencies.c.ends_at,
                    )
                    .where(emergencies.c.ended_at.is_(None))
                    .order_by(emergencies.c.ends_at.desc())
                ).first()
            names = ("proposal_id", "declared_at", "ends_at")
            cache.emergency = (dict(zip(names, row, strict=True)) if row else {},)
        found = cache.emergency[0]
        if not found or found["ends_at"] <= now:
            return None
        return dict(found)

    def declare_emergency(self, proposal_id: str, at: float, ends_at: float) -> None:
        with self._writing() as conn:
            conn.execute(
                insert(emergencies).values(proposal_id=proposal_id, declared_at=at, ends_at=ends_at)
            )

    def end_emergency(self, at: float, ended_by: str) -> int:
        with self._writing() as conn:
            count = conn.execute(
                update(emergencies)
                .where(emergencies.c.ended_at.is_(None))
                .values(ended_at=at, ended_by=ended_by)
            ).rowcount
        return int(count)

    # --- access reviews (kms.review_service.ReviewStore) ------------------------------------

    def each_issued_token(self, page: int = 2000) -> Iterator[dict[str, Any]]:
        """Every issued token, a page per read, so no connection is held while a report runs."""
        after = ""
        while True:
            with self._reading() as conn:
                rows = conn.execute(
                    select(issued_tokens)
                    .where(issued_tokens.c.jti > after)
                    .order_by(issued_tokens.c.jti)
                    .limit(page)
                ).all()
            yield from (_issued(r) for r in rows)
            if len(rows) < page:
                return
            after = rows[-1].jti

    def all_proposals(self) -> list[StoredProposal]:
        """Every proposal with its approvals, newest first (two reads, no list of ids)."""
        with self._reading() as conn:
            rows = conn.execute(
                select(proposals).order_by(proposals.c.created_at.desc(), proposals.c.id)
            ).all()
            votes = conn.execute(select(approvals).order_by(approvals.c.signed_at)).all()
        by_id: dict[str, list[Any]] = {}
        for vote in votes:
            by_id.setdefault(vote.proposal_id, []).append(vote)
        return [_stored_proposal(r, by_id.get(r.id, [])) for r in rows]

    def each_audit_record(self, page: int = 5000) -> Iterator[dict[str, Any]]:
        """Every audit record as stored, in log order, a page per read.

        A row that is not valid JSON is yielded as ``{}``: the report counts it as skipped
        rather than failing or quietly leaving it out.
        """
        self._settle_audit()
        start = 0
        while True:
            with self._reading() as conn:
                rows = conn.execute(
                    select(audit_log.c.seq, audit_log.c.record)
                    .where(audit_log.c.seq >= start)
                    .order_by(audit_log.c.seq)
                    .limit(page)
                ).all()
            for _, record in rows:
                try:
                    yield orjson.loads(record)
                except orjson.JSONDecodeError:
                    yield {}
            if len(rows) < page:
                return
            start = int(rows[-1][0]) + 1

    def insert_campaign(self, campaign: Campaign) -> None:
        try:
            with self._engine.begin() as conn:
                conn.execute(
                    insert(review_campaigns).values(
                        id=campaign.id,
                        state=campaign.state.value,
                        opened_at=campaign.opened_at,
                        version=1,
                        body=_campaign_body(campaign),
                    )
                )
        except IntegrityError:
            raise ConflictError(f"review campaign {campaign.id!r} exists") from None
        except SQLAlchemyError as exc:
            raise StorageError("metadata store unavailable") from exc

    def campaign(self, campaign_id: str) -> tuple[Campaign, int] | None:
        """The campaign and its version."""
        with self._reading() as conn:
            row = conn.execute(
                select(review_campaigns.c.body, review_campaigns.c.version).where(
                    review_campaigns.c.id == campaign_id
                )
            ).first()
        return None if row is None else (_campaign(row.body), int(row.version))

    def list_campaigns(
        self, *, state: str | None = None, limit: int = 100
    ) -> list[tuple[Campaign, int]]:
        """Newest first."""
        query = select(review_campaigns.c.body, review_campaigns.c.version).order_by(
            review_campaigns.c.opened_at.desc(), review_campaigns.c.id
        )
        if state is not None:
            query = query.where(review_campaigns.c.state == state)
        with self._reading() as conn:
            rows = conn.execute(query.limit(limit)).all()
        return [(_campaign(row.body), int(row.version)) for row in rows]

    def update_campaign(self, campaign: Campaign, *, version: int) -> bool:
        """Compare-and-set on the version: False if another writer stored a change first."""
        try:
            with self._engine.begin() as conn:
                count = conn.execute(_campaign_update(campaign, version)).rowcount
        except SQLAlchemyError as exc:
            raise StorageError("metadata store unavailable") from exc
        return bool(count)

    def close_campaign(
        self, campaign: Campaign, *, version: int, disable: Sequence[str], at: float
    ) -> bool:
        """Store the closed campaign, disable ``disable`` and revoke their tokens: all or none.

        The registry generation is bumped first: its row lock makes closings (and every other
        registry change) take turns, so the count of remaining security officers taken at the
        end sees every other closing that committed before. ``tokens_valid_after`` is set past
        ``at`` so that no token issued before the suspension works if the principal is enabled
        again.
        """
        try:
            with self._engine.connect() as conn, conn.begin() as transaction:
                self._bump(conn)
                if not conn.execute(_campaign_update(campaign, version)).rowcount:
                    transaction.rollback()
                    return False
                if disable:
                    conn.execute(
                        update(principals)
                        .where(principals.c.id.in_(disable), principals.c.disabled_at.is_(None))
                        .values(disabled_at=at, tokens_valid_after=at + 1)
                    )
                    conn.execute(
                        update(issued_tokens)
                        .where(
                            issued_tokens.c.principal.in_(disable),
                            issued_tokens.c.revoked_at.is_(None),
                        )
                        .values(revoked_at=at)
                    )
                    officers = conn.execute(
                        select(func.count())
                        .select_from(principals)
                        .where(
                            principals.c.disabled_at.is_(None),
                            principals.c.roles.contains(
                                orjson.dumps(Role.SECURITY_OFFICER.value).decode(),
                                autoescape=True,
                            ),
                        )
                    ).scalar_one()
                    if not officers:
                        raise LastOfficerError
        except SQLAlchemyError as exc:
            raise StorageError("metadata store unavailable") from exc
        return True

    @contextlib.contextmanager
    def _reading(self) -> Iterator[Any]:
        try:
            with self._engine.connect() as conn:
                yield conn
        except SQLAlchemyError as exc:
            raise StorageError("metadata store unavailable") from exc

    @contextlib.contextmanager
    def _writing(self) -> Iterator[Any]:
        """A transaction that also bumps the registry generation (every cache depends on it)."""
        try:
            with self._engine.begin() as conn:
                yield conn
                self._bump(conn)
        except IntegrityError:
            raise
        except SQLAlchemyError as exc:
            raise StorageError("metadata store unavailable") from exc

    # --- audit ----------------------------------------------------------------------------

    def before_audit_read(self, hook: Callable[[], None] | None) -> None:
        """Run ``hook`` before every read of the log: the writer's journal drain.

        A worker acknowledges records before they join the tree (``api.audit_writer``); with
        the hook, whatever reads the log through this store (proofs, exports, heads, reviews)
        sees every record this process has acknowledged.
        """
        self._before_audit_read = hook

    def _settle_audit(self) -> None:
        hook = self._before_audit_read
        if hook is not None:
            hook()

    def append(self, records: Iterable[AuditRecord]) -> None:
        self.commit([(record, None) for record in records])

    def commit(
        self,
        batch: Sequence[tuple[AuditRecord, Admission | None]],
        journaled: Sequence[JournalEntry] = (),
        mark: JournalMark | None = None,
    ) -> list[Refusal | None]:
        """One transaction per batch, on the raw connection: this runs on the hot path.

        The journaled entries, then the batch's records, become the next leaves of the audit
        tree: the transaction first locks the tree's row, so indexes are gap-free and in commit
        order across processes and nodes, and it writes the tree's new size and compact range
        (and the journal's mark) back before it commits.
        """
        if not batch and not journaled and mark is None:
            return []
        connection = self._raw_connection()
        postgres = self._engine.dialect.name == "postgresql"
        try:
            cursor = connection.cursor()
            try:
                if postgres:
                    with connection.driver_connection.transaction():
                        outcome, tree = self._commit_batch(cursor, batch, journaled, mark, _PG_SQL)
                else:
                    _begin_immediate(cursor)
                    try:
                        outcome, tree = self._commit_batch(
                            cursor, batch, journaled, mark, _SQLITE_SQL
                        )
                    except BaseException:
                        connection.rollback()
                        raise
                    connection.commit()
            finally:
                cursor.close()
        except Exception:
            self._drop_raw_connection()
            raise
        self._tree = tree
        return outcome

    def _commit_batch(
        self,
        cursor: Any,
        batch: Sequence[tuple[AuditRecord, Admission | None]],
        journaled: Sequence[JournalEntry],
        mark: JournalMark | None,
        sql: Mapping[str, str],
    ) -> tuple[list[Refusal | None], tuple[bytes, CompactRange]]:
        cursor.execute(sql["tree"])  # first: every writer takes the locks in the same order
        compact = self._resume_tree(cursor.fetchall())
        outcome: list[Refusal | None] = []
        rows = []
        for entry in journaled:
            leaf = leaf_hash(entry.data)
            rows.append(
                (entry.time, entry.request_id, entry.node, entry.data.decode(), compact.size, leaf)
            )
            compact.append(leaf)
        for record, admission in batch:
            refusal = None if admission is None else _admit(cursor, admission, sql)
            outcome.append(refusal)
            if refusal is not None:
                record = replace(  # noqa: PLW2901 - the record says what really happened
                    record, decision="deny", status=refusal.status, reason=refusal.reason
                )
            data = record.canonical()
            leaf = leaf_hash(data)
            rows.append(
                (record.time, record.request_id, record.node, data.decode(), compact.size, leaf)
            )
            compact.append(leaf)
        if rows:
            cursor.executemany(sql["audit"], rows)
        tree_bytes = b"".join(compact.hashes)
        cursor.execute(sql["tree_write"], (compact.size, tree_bytes))
        if mark is not None:
            cursor.execute(sql["mark"], (mark.name, mark.offset))
        now = time.time()
        if now - self._last_sweep > _SWEEP_SECONDS:
            self._last_sweep = now
            cursor.execute(sql["sweep"], (struct.pack(">Q", math.floor(now)),))
        return outcome, (tree_bytes, compact)

    def journal_offset(self, name: str) -> int:
        with self._reading() as conn:
            value = conn.execute(
                select(audit_journals.c.ingested).where(audit_journals.c.name == name)
            ).scalar()
        return 0 if value is None else int(value)

    def forget_journal(self, name: str) -> None:
        try:
            with self._engine.begin() as conn:
                conn.execute(delete(audit_journals).where(audit_journals.c.name == name))
        except SQLAlchemyError as exc:
            raise StorageError("metadata store unavailable") from exc

    def _resume_tree(self, rows: list[Any]) -> CompactRange:
        """The tree as the locked row holds it, to append to.

        The range this process committed last is reused if the row still holds it; it is
        taken out of the cache first, so a batch that fails leaves no half-appended range
        behind. (Only the holder of the row's lock gets here, one at a time.) The rows are
        fetched to the end: a SELECT left open on SQLite makes the UPDATE of the same row
        that follows cost as much as the whole commit.
        """
        if not rows:
            raise StorageError("the audit tree is missing: run the database migrations")
        size, tree_bytes = rows[0]
        cached, self._tree = self._tree, None
        if cached is not None and cached[0] == tree_bytes:
            return cached[1]
        return _compact_range(int(size), bytes(tree_bytes))

    def tree_state(self) -> tuple[int, bytes]:
        """The audit tree's size and root hash, as of the last committed batch."""
        self._settle_audit()
        with self._reading() as conn:
            row = conn.execute(text('SELECT size, "range" FROM audit_tree WHERE id = 1')).first()
        if row is None:
            raise StorageError("the audit tree is missing: run the database migrations")
        compact = _compact_range(int(row[0]), bytes(row[1]))
        return compact.size, compact.root()

    def audit_records(self, limit: int = 1000) -> list[dict[str, Any]]:
        """The first ``limit`` records in log order, as stored (``time_us``, not ``time``)."""
        self._settle_audit()
        with self._reading() as conn:
            rows = conn.execute(
                select(audit_log.c.seq, audit_log.c.record).order_by(audit_log.c.seq).limit(limit)
            ).all()
        return [{"seq": seq, "leaf_index": seq, **json.loads(record)} for seq, record in rows]

    def audit_leaf_data(self, start: int = 0, end: int | None = None) -> list[bytes]:
        """The stored bytes of records ``[start, end)``; a missing index is a storage error.

        Each is what its leaf hash was taken over when it was written, unless someone changed
        the row since: exactly what a proof or an export must expose.
        """
        return [data.encode() for data, _ in self._leaf_rows(start, end)]

    def leaves(self, start: int = 0, end: int | None = None) -> list[bytes]:
        """Leaf hashes ``[start, end)`` as stored when each record was written.

        Proofs are computed from these: a record changed later then fails its own proof, and
        only its own (``audit_leaf_data`` gives what to recompute them from).
        """
        return [bytes(leaf) for _, leaf in self._leaf_rows(start, end)]

    def _leaf_rows(self, start: int, end: int | None) -> list[tuple[str, bytes]]:
        self._settle_audit()
        query = select(audit_log.c.seq, audit_log.c.record, audit_log.c.leaf_hash).where(
            audit_log.c.seq >= start
        )
        if end is not None:
            query = query.where(audit_log.c.seq < end)
        with self._reading() as conn:
            rows = conn.execute(query.order_by(audit_log.c.seq)).all()
        for expected, row in enumerate(rows, start):
            if row[0] != expected:
                raise StorageError(f"audit record {expected} is missing from the database")
        if end is not None and len(rows) != end - start:
            raise StorageError(f"audit record {start + len(rows)} is missing from the database")
        return [(row[1], row[2]) for row in rows]

    def audit_export_rows(
        self, limit: int | None = None
    ) -> list[tuple[int, dict[str, Any], bytes]]:
        """(leaf index, record, stored leaf hash) in log order, the first ``limit`` (or all)."""
        self._settle_audit()
        query = select(audit_log.c.seq, audit_log.c.record, audit_log.c.leaf_hash).order_by(
            audit_log.c.seq
        )
        if limit is not None:
            query = query.limit(limit)
        with self._reading() as conn:
            rows = conn.execute(query).all()
        try:
            return [(index, orjson.loads(record), bytes(leaf)) for index, record, leaf in rows]
        except orjson.JSONDecodeError:
            raise StorageError("an audit record in the database is not valid JSON") from None

    def add_tree_head(self, head: TreeHead, jws: str) -> bool:
        """Store a signed head; False if one of that size exists or it would break log order."""
        values = {
            "size": head.size,
            "root_hash": head.root_hash.hex(),
            "timestamp_ms": head.timestamp_ms,
            "jws": jws,
        }
        try:
            with self._engine.begin() as conn:
                if self._engine.dialect.name == "postgresql":
                    conn.execute(text("SELECT size FROM audit_tree WHERE id = 1 FOR UPDATE"))
                inserted = conn.execute(_INSERT_HEAD, values).rowcount
        except SQLAlchemyError as exc:
            raise StorageError("metadata store unavailable") from exc
        return bool(inserted)

    def tree_heads(self) -> list[tuple[TreeHead, str]]:
        """Every signed head with its JWS, smallest first."""
        with self._reading() as conn:
            rows = conn.execute(select(audit_heads).order_by(audit_heads.c.size)).all()
        return [_tree_head(row) for row in rows]

    def tree_head(self, size: int | None = None) -> tuple[TreeHead, str] | None:
        """The signed head of ``size``, or the largest one; None if there is none."""
        query = select(audit_heads)
        if size is None:
            query = query.order_by(audit_heads.c.size.desc()).limit(1)
        else:
            query = query.where(audit_heads.c.size == size)
        with self._reading() as conn:
            row = conn.execute(query).first()
        return None if row is None else _tree_head(row)

    # --- audit search, usage and immediate one-time ids (api.audit_log, api.routes_sys) ---

    def audit_rows(
        self,
        start: int,
        end: int,
        *,
        since: float | None = None,
        until: float | None = None,
        request_id: str | None = None,
    ) -> list[tuple[int, float, str, bytes]]:
        """(leaf index, time, stored record, stored leaf hash) for indexes ``[start, end)``.

        A range of the primary key, so its cost is bounded by ``end - start``; the optional
        filters use the row's own columns (no index on them: they only thin that range).
        """
        self._settle_audit()
        query = select(
            audit_log.c.seq, audit_log.c.time, audit_log.c.record, audit_log.c.leaf_hash
        ).where(audit_log.c.seq >= start, audit_log.c.seq < end)
        if since is not None:
            query = query.where(audit_log.c.time >= since)
        if until is not None:
            query = query.where(audit_log.c.time < until)
        if request_id is not None:
            query = query.where(audit_log.c.request_id == request_id)
        with self._reading() as conn:
            rows = conn.execute(query.order_by(audit_log.c.seq)).all()
        return [(int(seq), float(at), record, bytes(leaf)) for seq, at, record, leaf in rows]

    def audit_index_at(self, moment: float, size: int) -> int:
        """The first leaf index below ``size`` whose record's time is ``moment`` or later.

        A binary search over the primary key (about 2 log2(size) point reads), which assumes
        times rise with the index; callers widen ``moment`` by how far out of order records
        may be. ``size`` if every record is earlier.
        """
        self._settle_audit()
        probe = text("SELECT seq, time FROM audit_log WHERE seq >= :s ORDER BY seq LIMIT 1")
        low, high = 0, size
        with self._reading() as conn:
            while low < high:
                middle = (low + high) // 2
                row = conn.execute(probe, {"s": middle}).first()
                if row is None or int(row[0]) >= high:
                    high = middle
                elif float(row[1]) < moment:
                    low = int(row[0]) + 1
                else:
                    high = middle
        return low

    def spend_once(self, id_hash: bytes, keep_until: float) -> bool:
        """Consume a one-time id now, in a transaction of its own; False if it was spent.

        For a check that must hold before an effect that the audit commit cannot undo: an
        unseal share is counted in memory before its record is written.
        """
        statement = text("INSERT INTO once_ids (id) VALUES (:id) ON CONFLICT DO NOTHING")
        try:
            with self._engine.begin() as conn:
                inserted = conn.execute(statement, {"id": once_key(id_hash, keep_until)}).rowcount
        except SQLAlchemyError as exc:
            raise StorageError("metadata store unavailable") from exc
        return inserted == 1


def _swap_resealed(conn: Any, pending: PendingCommit, now: float) -> None:
    """Step (3) of a rekey: each value resealed for the new set, where the old one still is.

    A compare-and-swap on the whole blob (after the descriptor's update has taken the write
    lock): a value written or added since the row was made raises, and the caller's
    transaction rolls back, descriptor included.
    """
    for value in pending.resealed:
        done = conn.execute(
            update(sealed_values)
            .where(sealed_values.c.name == value.old.name)
            .where(sealed_values.c.blob == value.old.blob)
            .values(blob=value.new.blob, updated_at=now)
        )
        if done.rowcount != 1:
            raise SealedValuesChangedError(f"sealed value {value.old.name!r} changed")
    stored = set(conn.execute(select(sealed_values.c.name)).scalars())
    if stored != {value.old.name for value in pending.resealed}:
        raise SealedValuesChangedError("a sealed value was added or removed")


def _insert_members(conn: Any, name: SetName, members: Sequence[ShareMember], now: float) -> None:
    if not members:
        return
    identifier, generation = name
    conn.execute(
        insert(share_members),
        [
            {
                "set_identifier": identifier,
                "set_generation": generation,
                "member": m.member,
                "commitment": m.commitment,
                "holder": m.holder,
                "created_at": now,
            }
            for m in members
        ],
    )


def _compact_range(size: int, tree_bytes: bytes) -> CompactRange:
    """The stored range: its subtree roots, 32 bytes each, largest subtree first."""
    hashes = [tree_bytes[i : i + HASH_SIZE] for i in range(0, len(tree_bytes), HASH_SIZE)]
    try:
        return CompactRange(size=size, hashes=hashes)
    except (InvalidRequestError, ValueError) as exc:
        raise StorageError("the audit tree row is corrupt: its size and range disagree") from exc


def _tree_head(row: Any) -> tuple[TreeHead, str]:
    try:
        head = TreeHead(int(row.size), bytes.fromhex(row.root_hash), int(row.timestamp_ms))
    except (ValueError, InvalidRequestError) as exc:
        raise StorageError(f"the stored tree head of size {row.size} is corrupt") from exc
    return head, str(row.jws)


def _campaign_body(campaign: Campaign) -> str:
    return orjson.dumps(campaign.to_json(), option=orjson.OPT_SORT_KEYS).decode()


def _campaign(body: str) -> Campaign:
    try:
        return Campaign.from_json(orjson.loads(body))
    except (orjson.JSONDecodeError, InvalidRequestError) as exc:
        raise StorageError("a stored review campaign is corrupt") from exc


def _campaign_update(campaign: Campaign, version: int) -> Any:
    return (
        update(review_campaigns)
        .where(review_campaigns.c.id == campaign.id, review_campaigns.c.version == version)
        .values(state=campaign.state.value, version=version + 1, body=_campaign_body(campaign))
    )


def _cached(entries: dict[K, V], key: K, load: Callable[[K], V | None]) -> V | None:
    """Serve ``key`` from one of the generation-checked caches, loading rows that exist."""
    found = entries.get(key)
    if found is None:
        found = load(key)
        if found is not None and len(entries) < _CACHE_LIMIT:
            entries[key] = found
    return found


@dataclass(frozen=True)
class StoredProposal:
    proposal: Proposal
    state: ProposalState
    decided_at: float | None
    uses: int
    max_uses: int | None
    approvals: tuple[Approval, ...]


def _stored_proposal(row: Any, votes: Iterable[Any]) -> StoredProposal:
    proposal = Proposal(
        id=row.id,
        kind=ProposalKind(row.kind),
        requester=row.requester,
        payload=orjson.loads(row.payload),
        created_at=row.created_at,
        expires_at=row.expires_at,
        audience=row.audience,
    )
    return StoredProposal(
        proposal=proposal,
        state=ProposalState(row.state),
        decided_at=row.decided_at,
        uses=row.uses,
        max_uses=row.max_uses,
        approvals=tuple(
            Approval(v.proposal_id, v.official, Verdict(v.verdict), v.signed_at, v.signature)
            for v in votes
        ),
    )


def _principal(row: Any) -> Principal:
    return Principal(
        id=row.id,
        roles=frozenset(Role(r) for r in orjson.loads(row.roles)),
        jwk=orjson.loads(row.jwk),
        thumbprint=row.thumbprint,
        created_at=row.created_at,
        created_by=row.created_by,
        disabled_at=row.disabled_at,
        tokens_valid_after=row.tokens_valid_after,
        display_name=row.display_name,
    )


def _principal_row(principal: Principal) -> dict[str, Any]:
    return {
        "id": principal.id,
        "display_name": principal.display_name,
        "roles": orjson.dumps(sorted(r.value for r in principal.roles)).decode(),
        "jwk": orjson.dumps(dict(principal.jwk), option=orjson.OPT_SORT_KEYS).decode(),
        "thumbprint": principal.thumbprint,
        "created_at": principal.created_at,
        "created_by": principal.created_by,
        "disabled_at": principal.disabled_at,
        "tokens_valid_after": principal.tokens_valid_after,
    }


def _issued(row: Any) -> dict[str, Any]:
    return {
        "jti": row.jti,
        "principal": row.principal,
        "roles": orjson.loads(row.roles),
        "scope": None if row.scope is None else orjson.loads(row.scope),
        "proposal_id": row.proposal_id,
        "jkt": row.jkt,
        "issued_at": row.issued_at,
        "expires_at": row.expires_at,
        "revoked_at": row.revoked_at,
    }


def _admit(cursor: Any, admission: Admission, sql: Mapping[str, str]) -> Refusal | None:
    for id_hash, keep_until in admission.once:
        cursor.execute(sql["once"], (once_key(id_hash, keep_until),))
        if cursor.rowcount != 1:
            return Refusal(401, "one-time id replayed")
    if admission.use_of is not None:
        cursor.execute(sql["use"], (admission.uses, admission.use_of, admission.uses))
        if cursor.rowcount != 1:
            return Refusal(403, "grant exhausted, revoked or not approved")
    issued = admission.issued
    if issued is not None:
        cursor.execute(
            sql["issued"],
            (
                issued.jti,
                issued.principal,
                orjson.dumps(list(issued.roles)).decode(),
                None if issued.scope is None else orjson.dumps(issued.scope).decode(),
                issued.proposal_id,
                issued.jkt,
                issued.issued_at,
                issued.expires_at,
            ),
        )
    return None


def once_key(id_hash: bytes, keep_until: float) -> bytes:
    """Expiry second, then the id's hash: a replay has the same signed time, so the same key."""
    return struct.pack(">Q", math.ceil(keep_until)) + id_hash[:24]


def _begin_immediate(cursor: Any) -> None:
    """Take SQLite's write lock, retrying every 50 µs to 1 ms while another process holds it.

    The audit commit runs on a worker's event loop thread, so waiting blocks the worker.
    SQLite's own busy handler sleeps at least 1 ms per attempt, several times longer than the
    other worker's commit takes: measured with two workers, it cost a quarter of throughput.
    """
    delay = 0.00005
    deadline = time.monotonic() + _LOCK_WAIT_SECONDS
    while True:
        try:
            cursor.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode not in _SQLITE_BUSY or time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.001)
        else:
            return


def _version_row(name: str, version: KeyVersion) -> dict[str, Any]:
    return {
        "key_name": name,
        "version": version.number,
        "handle": version.handle,
        "state": version.state.value,
        "created_at": version.created_at,
        "public_key": version.public_key,
        "wrapped_working_key": version.wrapped_working_key,
        "escrow": version.escrow,
    }


def _version(row: Any) -> KeyVersion:
    return KeyVersion(
        number=row.version,
        handle=bytes(row.handle),
        state=VersionState(row.state),
        created_at=row.created_at,
        public_key=None if row.public_key is None else bytes(row.public_key),
        wrapped_working_key=(
            None if row.wrapped_working_key is None else bytes(row.wrapped_working_key)
        ),
        escrow=None if row.escrow is None else bytes(row.escrow),
    )
