"""audit journals: how far each worker's local journal is in the log

A worker acknowledges a request once its record is in the worker's local append-only journal
(``storage.audit_journal``) and takes journaled records into the Merkle log in batches. Each
batch's transaction also writes ``audit_journals.ingested``, the journal's byte offset up to
which its records are leaves, so a journal left by a crashed worker is taken in from exactly
where the log stops: no record twice, none lost.

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audit_journals",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("ingested", sa.BigInteger, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("audit_journals")
