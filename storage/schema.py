"""Tables of the metadata store (SQLAlchemy Core). Key material never appears here in the clear."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    ForeignKey,
    Index,
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
    # A verify-only key (migration 0008): the site whose backend holds its private versions;
    # this site has their public keys only, from a domain backup (kms.domain_backup).
    Column("origin_site", String(64), nullable=True),
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
    # The version's material wrapped under the security-domain key (kms.domain); AES only.
    Column("escrow", LargeBinary, nullable=True),
)

# An append-only RFC 9162 Merkle log (migration 0005): ``record`` holds the canonical JSON bytes
# whose hash is leaf ``seq`` of the tree (from 0), kept in ``leaf_hash`` as written (proofs come
# from it, so a record changed later fails its own proof, not its neighbours'). ``seq`` is
# assigned by the writer under the lock on the one ``audit_tree`` row, which holds the tree's
# size and compact range (kms.merkle: the perfect subtrees' roots, 32 bytes each). Being the
# primary key, it is unique without a second index on the hot path.
audit_log = Table(
    "audit_log",
    metadata,
    Column("seq", SEQ, primary_key=True, autoincrement=False),
    Column("time", Float, nullable=False),
    Column("request_id", String(64), nullable=False),
    Column("node", String(128), nullable=False),
    Column("record", Text, nullable=False),
    Column("leaf_hash", LargeBinary(32), nullable=False),
)

audit_tree = Table(
    "audit_tree",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("size", BigInteger, nullable=False),
    Column("range", LargeBinary, nullable=False),
)

# How far each worker's local audit journal (storage.audit_journal) is in the log: the byte
# offset up to which its records are leaves. Written in the same transaction as those leaves,
# so a journal recovered after a crash is taken in from exactly where the log stops.
audit_journals = Table(
    "audit_journals",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("ingested", BigInteger, nullable=False),
)

# Signed tree heads (kms.audit_export.TreeHead with its JWS); one per size.
audit_heads = Table(
    "audit_heads",
    metadata,
    Column("size", BigInteger, primary_key=True, autoincrement=False),
    Column("root_hash", String(64), nullable=False),
    Column("timestamp_ms", BigInteger, nullable=False),
    Column("jws", Text, nullable=False),
)

principals = Table(
    "principals",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("display_name", String(200), nullable=False),
    Column("roles", Text, nullable=False),
    Column("jwk", Text, nullable=False),
    Column("thumbprint", String(64), nullable=False, unique=True),
    Column("created_at", Float, nullable=False),
    Column("created_by", String(64), nullable=False),
    Column("disabled_at", Float, nullable=True),
    Column("tokens_valid_after", Float, nullable=False),
)

issued_tokens = Table(
    "issued_tokens",
    metadata,
    Column("jti", String(64), primary_key=True),
    Column("principal", String(64), nullable=False, index=True),
    Column("roles", Text, nullable=False),
    Column("scope", Text, nullable=True),
    Column("proposal_id", String(64), nullable=True, index=True),
    Column("jkt", String(64), nullable=True),
    Column("issued_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
    Column("revoked_at", Float, nullable=True),
)

# One-time identifiers (assertion and DPoP proof jti): 8 bytes of big-endian expiry second,
# then 24 bytes of their SHA-256. Expiry first keeps inserts at the B-tree's right-hand edge
# and makes the sweep a range delete (migration 0004 measured why).
once_ids = Table(
    "once_ids",
    metadata,
    Column("id", LargeBinary(32), primary_key=True),
    sqlite_with_rowid=False,
)

proposals = Table(
    "proposals",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("kind", String(32), nullable=False),
    Column("requester", String(64), nullable=False),
    Column("payload", Text, nullable=False),
    Column("audience", String(200), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
    Column("state", String(16), nullable=False),
    Column("decided_at", Float, nullable=True),
    Column("uses", Integer, nullable=False),
    Column("max_uses", Integer, nullable=True),
)

approvals = Table(
    "approvals",
    metadata,
    Column(
        "proposal_id",
        String(64),
        ForeignKey("proposals.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("official", String(64), primary_key=True),
    Column("verdict", String(16), nullable=False),
    Column("signed_at", Float, nullable=False),
    Column("signature", Text, nullable=False),
)

emergencies = Table(
    "emergencies",
    metadata,
    Column("proposal_id", String(64), primary_key=True),
    Column("declared_at", Float, nullable=False),
    Column("ends_at", Float, nullable=False),
    Column("ended_at", Float, nullable=True),
    Column("ended_by", String(64), nullable=True),
)

# Access review campaigns (migration 0006): ``body`` is ``kms.review.Campaign.to_json()``; state
# and opened_at are copies for listing. ``version`` rises with every change and each update is
# conditional on the version read, so concurrent decisions are re-applied, never lost.
review_campaigns = Table(
    "review_campaigns",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("state", String(16), nullable=False),
    Column("opened_at", Float, nullable=False, index=True),
    Column("version", Integer, nullable=False),
    Column("body", Text, nullable=False),
)

# Custody lifecycle (migration 0007). Per member of a share set (SLIP-39 identifier and
# generation): its share-check commitment, an Ed25519 public key derived from the share
# (kms.share_check; nothing the share can be computed from), and the principal holding it when
# known. Sets made before 0007 have no rows. A rekey's pending commit is the meta row
# "rekey_commit" (kms.rekey.PendingCommit), its new members written here in the same transaction.
share_members = Table(
    "share_members",
    metadata,
    Column("set_identifier", Integer, primary_key=True, autoincrement=False),
    Column("set_generation", Integer, primary_key=True, autoincrement=False),
    Column("member", String(8), primary_key=True),
    Column("commitment", LargeBinary(32), nullable=True),
    Column("holder", String(64), nullable=True),
    Column("created_at", Float, nullable=False),
)

# Successful share checks; a drill check-in names its drill and the official logged in.
share_checks = Table(
    "share_checks",
    metadata,
    Column("id", SEQ, primary_key=True, autoincrement=True),
    Column("set_identifier", Integer, nullable=False),
    Column("set_generation", Integer, nullable=False),
    Column("member", String(8), nullable=False),
    Column("at", Float, nullable=False),
    Column("official", String(64), nullable=True),
    Column("drill_id", String(64), nullable=True),
    Index("ix_share_checks_set", "set_identifier", "set_generation"),
)

# One-time share-check challenges by their SHA-256, deleted when spent; expired ones are swept.
share_challenges = Table(
    "share_challenges",
    metadata,
    Column("id", LargeBinary(32), primary_key=True),
    Column("expires_at", Float, nullable=False, index=True),
)

# Share-health drills: ``body`` is kms.drill.Drill.to_json().
drills = Table(
    "drills",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("started_at", Float, nullable=False, index=True),
    Column("body", Text, nullable=False),
)

# Secrets kept at rest, each sealed by kms.sealed_values under a key derived from the root keys.
sealed_values = Table(
    "sealed_values",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("purpose", String(16), nullable=False),
    Column("blob", LargeBinary, nullable=False),
    Column("updated_at", Float, nullable=False),
)

# The site registry (kms.sites): every site of the domain as this site knows it.
sites = Table(
    "sites",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("kind", String(16), nullable=False),
    Column("backend", String(16), nullable=False),
    Column("status", String(16), nullable=False),
    Column("url", Text, nullable=False, server_default=""),
    Column("audit_public_key", Text, nullable=True),
    Column("registered_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("note", Text, nullable=False, server_default=""),
)
