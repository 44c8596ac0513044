"""The SQL adapter for the metadata ports: SQLite embedded by default, PostgreSQL for several nodes.

Every multi-row change runs in one transaction, so a crash leaves each change whole or absent.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, delete, event, insert, select, text, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from kms.custody import ShareSetDescriptor
from kms.errors import ConflictError, StorageError
from kms.keys import Classification, KeyPolicy, KeyType, KeyVersion, Residency, VersionState
from storage.schema import audit_log, key_versions, meta, tokens, transit_keys

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from kms.audit import AuditRecord

_MIGRATIONS = Path(__file__).parent / "migrations"
_PG_MIGRATION_LOCK = 0x656B6D73  # "ekms": one migrator at a time across nodes


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


class SqlStore:
    """Implements ``KeyStore``, ``CustodyStore``, ``TokenStore`` and ``AuditSink``."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def __repr__(self) -> str:
        return f"SqlStore({self._engine.dialect.name})"

    @classmethod
    def open(cls, url: str, *, run_migrations: bool = True) -> SqlStore:
        engine = make_engine(url)
        if run_migrations:
            migrate(engine)
        return cls(engine)

    def dispose(self) -> None:
        self._engine.dispose()

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
        self, descriptor: ShareSetDescriptor, root_token_hash: bytes, token_id: str
    ) -> None:
        now = time.time()
        with self._engine.begin() as conn:
            conn.execute(
                insert(meta).values(
                    name="share_set", value=json.dumps(descriptor.to_json()), updated_at=now
                )
            )
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

    # --- tokens ---------------------------------------------------------------------------

    def find_token(self, token_hash: bytes) -> tuple[str, Sequence[str]] | None:
        try:
            with self._engine.connect() as conn:
                row = conn.execute(
                    select(tokens.c.id, tokens.c.policies).where(
                        tokens.c.token_hash == token_hash, tokens.c.revoked_at.is_(None)
                    )
                ).first()
        except SQLAlchemyError as exc:
            raise StorageError("metadata store unavailable") from exc
        return None if row is None else (row[0], json.loads(row[1]))

    # --- keys -----------------------------------------------------------------------------

    def get_policy(self, name: str) -> KeyPolicy | None:
        try:
            with self._engine.connect() as conn:
                key = conn.execute(select(transit_keys).where(transit_keys.c.name == name)).first()
                if key is None:
                    return None
                rows = conn.execute(
                    select(key_versions).where(key_versions.c.key_name == name)
                ).all()
        except SQLAlchemyError as exc:
            raise StorageError("metadata store unavailable") from exc
        if key.latest_version == 0:
            return None  # creation still pending: not visible yet
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
        self, name: str, version: int, public_key: bytes | None, wrapped: bytes | None = None
    ) -> None:
        with self._engine.begin() as conn:
            conn.execute(
                update(key_versions)
                .where(key_versions.c.key_name == name, key_versions.c.version == version)
                .values(
                    state=VersionState.ACTIVE.value,
                    public_key=public_key,
                    wrapped_working_key=wrapped,
                )
            )
            conn.execute(
                update(transit_keys)
                .where(transit_keys.c.name == name, transit_keys.c.latest_version < version)
                .values(latest_version=version, updated_at=time.time())
            )

    def update_policy(self, policy: KeyPolicy) -> None:
        with self._engine.begin() as conn:
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

    # --- audit ----------------------------------------------------------------------------

    def append(self, records: Iterable[AuditRecord]) -> None:
        rows = [
            {
                "time": r.time,
                "request_id": r.request_id,
                "node": r.node,
                "record": orjson.dumps(r.to_json(), option=orjson.OPT_SORT_KEYS).decode(),
            }
            for r in records
        ]
        if not rows:
            return
        with self._engine.begin() as conn:
            conn.execute(insert(audit_log), rows)

    def audit_records(self, limit: int = 1000) -> list[dict[str, Any]]:
        with self._engine.connect() as conn:
            rows = conn.execute(
                select(audit_log.c.seq, audit_log.c.record).order_by(audit_log.c.seq).limit(limit)
            ).all()
        return [{"seq": seq, **json.loads(record)} for seq, record in rows]


def _version_row(name: str, version: KeyVersion) -> dict[str, Any]:
    return {
        "key_name": name,
        "version": version.number,
        "handle": version.handle,
        "state": version.state.value,
        "created_at": version.created_at,
        "public_key": version.public_key,
        "wrapped_working_key": version.wrapped_working_key,
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
    )
