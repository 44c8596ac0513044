"""audit log as an RFC 9162 Merkle tree: leaf indexes and hashes, compact range, signed heads

Each record is stored as the canonical JSON (RFC 8785) its leaf hash is taken over, with its
time as integer microseconds (``time_us``): canonical JSON has no floats. ``seq`` becomes the
leaf index, assigned by the writer, so rows already present are re-encoded in ``seq`` order and
renumbered 0, 1, ... (each new number is below the old one, so updating in ascending order never
collides); ``audit_tree`` (one row) gets the size and compact range of the tree they make.

Revision ID: 0005
Revises: 0004
"""

import orjson
import sqlalchemy as sa
from alembic import op

from kms.audit import time_us
from kms.canonical import canonical_json
from kms.errors import InvalidRequestError
from kms.merkle import CompactRange, leaf_hash

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_CHUNK = 5000


def upgrade() -> None:
    op.add_column("audit_log", sa.Column("leaf_hash", sa.LargeBinary(32), nullable=True))
    op.create_table(
        "audit_tree",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("range", sa.LargeBinary, nullable=False),
    )
    op.create_table(
        "audit_heads",
        sa.Column("size", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("root_hash", sa.String(64), nullable=False),
        sa.Column("timestamp_ms", sa.BigInteger, nullable=False),
        sa.Column("jws", sa.Text, nullable=False),
    )
    compact = _index_existing_records(op.get_bind())
    op.get_bind().execute(
        sa.text('INSERT INTO audit_tree (id, size, "range") VALUES (1, :size, :range)'),
        {"size": compact.size, "range": b"".join(compact.hashes)},
    )
    with op.batch_alter_table("audit_log") as batch:
        batch.alter_column("leaf_hash", existing_type=sa.LargeBinary(32), nullable=False)


def _index_existing_records(bind: sa.Connection) -> CompactRange:
    compact = CompactRange()
    last = -1
    while True:
        rows = bind.execute(
            sa.text(
                "SELECT seq, time, record FROM audit_log WHERE seq > :last ORDER BY seq LIMIT :n"
            ),
            {"last": last, "n": _CHUNK},
        ).all()
        if not rows:
            return compact
        updates = []
        for seq, seconds, record in rows:
            data = _canonical_record(orjson.loads(record), seconds)
            leaf = leaf_hash(data)
            compact.append(leaf)
            updates.append(
                {"seq": seq, "record": data.decode(), "index": compact.size - 1, "leaf": leaf}
            )
        for update in updates:  # one by one, ascending: a new number is never still taken
            bind.execute(
                sa.text(
                    "UPDATE audit_log SET record = :record, seq = :index, leaf_hash = :leaf "
                    "WHERE seq = :seq"
                ),
                update,
            )
        last = rows[-1][0]


def _canonical_record(record: dict[str, object], seconds: float) -> bytes:
    """As ``AuditRecord.canonical`` does for new records, from the row's float time."""
    record.pop("time", None)
    record["time_us"] = time_us(seconds)
    try:
        return canonical_json(record)
    except InvalidRequestError as exc:
        record["details"] = {"unencodable_details": str(exc)}
        return canonical_json(record)


def downgrade() -> None:
    with op.batch_alter_table("audit_log") as batch:
        batch.drop_column("leaf_hash")
    op.drop_table("audit_heads")
    op.drop_table("audit_tree")
