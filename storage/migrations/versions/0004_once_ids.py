"""one-time ids keyed by expiry then hash, in a table without rowid

A random 32-byte key put every insert on a random page of two B-trees (the key and the expiry
index) and made each request's audit commit dirty pages all over the table. Keying by the
expiry time first keeps inserts at the right-hand edge of one B-tree, and the sweep deletes a
key range.

Revision ID: 0004
Revises: 0003
"""

import math
import struct

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    once_ids = op.create_table(
        "once_ids",
        sa.Column("id", sa.LargeBinary(32), primary_key=True),
        sqlite_with_rowid=False,
    )
    rows = op.get_bind().execute(sa.text("SELECT id_hash, expires_at FROM used_ids")).all()
    op.bulk_insert(
        once_ids,
        [{"id": struct.pack(">Q", math.ceil(exp)) + bytes(h)[:24]} for h, exp in rows],
    )
    op.drop_table("used_ids")


def downgrade() -> None:
    op.create_table(
        "used_ids",
        sa.Column("id_hash", sa.LargeBinary(32), primary_key=True),
        sa.Column("expires_at", sa.Float, nullable=False, index=True),
    )
    op.drop_table("once_ids")
