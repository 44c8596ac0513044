"""Tables of the metadata store (SQLAlchemy Core). Key material never appears here in the clear."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
)

metadata = MetaData()

# SQLite gives autoincrement only to INTEGER PRIMARY KEY; PostgreSQL wants a BIGINT identity.
SEQ = BigInteger().with_variant(Integer(), "sqlite")

meta = Table(
    "meta",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("value", Text, nullable=False),
    Column("updated_at", Float, nullable=False),
)

# Bumped in the same transaction as every change to tokens or keys, so that each process can keep
# those rows in memory and still see a change made by another process at its next request.
generation = Table(
    "generation",
    metadata,
    Column("name", String(32), primary_key=True),
    Column("value", BigInteger, nullable=False),
)

tokens = Table(
    "tokens",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("token_hash", LargeBinary(32), nullable=False, unique=True),
    Column("policies", Text, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("revoked_at", Float, nullable=True),
)

transit_keys = Table(
    "transit_keys",
    metadata,
    Column("name", String(128), primary_key=True),
    Column("key_type", String(32), nullable=False),
    Column("classification", String(32), nullable=False),
    Column("residency", String(16), nullable=False),
    Column("latest_version", Integer, nullable=False),
    Column("min_decryption_version", Integer, nullable=False),
    Column("min_encryption_version", Integer, nullable=False),
    Column("deletion_allowed", Boolean, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
)

key_versions = Table(
    "key_versions",
    metadata,
    Column(
        "key_name",
        String(128),
        ForeignKey("transit_keys.name", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("version", Integer, primary_key=True),
    Column("handle", LargeBinary(16), nullable=False, unique=True),
    Column("state", String(16), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("public_key", LargeBinary, nullable=True),
    Column("wrapped_working_key", LargeBinary, nullable=True),
)

audit_log = Table(
    "audit_log",
    metadata,
    Column("seq", SEQ, primary_key=True, autoincrement=True),
    Column("time", Float, nullable=False),
    Column("request_id", String(64), nullable=False),
    Column("node", String(128), nullable=False),
    Column("record", Text, nullable=False),
)
