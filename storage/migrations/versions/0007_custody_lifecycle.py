"""custody lifecycle: share-set members, share checks, one-time challenges, drills

``share_members`` holds, per member of a share set (SLIP-39 identifier and generation), its
share-check commitment (an Ed25519 public key derived from the share, ``kms.share_check``:
nothing from which the share can be computed) and, when known, the principal holding it. Sets
made before this revision have no rows: their members cannot be checked until a rekey.

``share_checks`` keeps each successful check (a drill check-in names its drill and official);
``share_challenges`` the one-time challenges handed out, by their SHA-256, until spent or
expired; ``drills`` each drill as ``kms.drill.Drill.to_json()``. A rekey's pending commit is a
``meta`` row (``rekey_commit``), so no table is needed for it.

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

SEQ = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "share_members",
        sa.Column("set_identifier", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("set_generation", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("member", sa.String(8), primary_key=True),
        sa.Column("commitment", sa.LargeBinary(32), nullable=True),
        sa.Column("holder", sa.String(64), nullable=True),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_table(
        "share_checks",
        sa.Column("id", SEQ, primary_key=True, autoincrement=True),
        sa.Column("set_identifier", sa.Integer, nullable=False),
        sa.Column("set_generation", sa.Integer, nullable=False),
        sa.Column("member", sa.String(8), nullable=False),
        sa.Column("at", sa.Float, nullable=False),
        sa.Column("official", sa.String(64), nullable=True),
        sa.Column("drill_id", sa.String(64), nullable=True),
    )
    op.create_index("ix_share_checks_set", "share_checks", ["set_identifier", "set_generation"])
    op.create_table(
        "share_challenges",
        sa.Column("id", sa.LargeBinary(32), primary_key=True),
        sa.Column("expires_at", sa.Float, nullable=False, index=True),
    )
    op.create_table(
        "drills",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("started_at", sa.Float, nullable=False, index=True),
        sa.Column("body", sa.Text, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("drills")
    op.drop_table("share_challenges")
    op.drop_index("ix_share_checks_set", "share_checks")
    op.drop_table("share_checks")
    op.drop_table("share_members")
