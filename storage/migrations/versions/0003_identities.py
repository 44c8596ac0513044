"""identities, issued tokens, one-time ids, proposals with signed approvals, emergencies

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "principals",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("display_name", sa.String(200), nullable=False),
        sa.Column("roles", sa.Text, nullable=False),
        sa.Column("jwk", sa.Text, nullable=False),
        sa.Column("thumbprint", sa.String(64), nullable=False, unique=True),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("created_by", sa.String(64), nullable=False),
        sa.Column("disabled_at", sa.Float, nullable=True),
        sa.Column("tokens_valid_after", sa.Float, nullable=False),
    )
    op.create_table(
        "issued_tokens",
        sa.Column("jti", sa.String(64), primary_key=True),
        sa.Column("principal", sa.String(64), nullable=False, index=True),
        sa.Column("roles", sa.Text, nullable=False),
        sa.Column("scope", sa.Text, nullable=True),
        sa.Column("proposal_id", sa.String(64), nullable=True, index=True),
        sa.Column("jkt", sa.String(64), nullable=True),
        sa.Column("issued_at", sa.Float, nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),
        sa.Column("revoked_at", sa.Float, nullable=True),
    )
    op.create_table(
        "used_ids",
        sa.Column("id_hash", sa.LargeBinary(32), primary_key=True),
        sa.Column("expires_at", sa.Float, nullable=False, index=True),
    )
    op.create_table(
        "proposals",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("requester", sa.String(64), nullable=False),
        sa.Column("payload", sa.Text, nullable=False),
        sa.Column("audience", sa.String(200), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("decided_at", sa.Float, nullable=True),
        sa.Column("uses", sa.Integer, nullable=False),
        sa.Column("max_uses", sa.Integer, nullable=True),
    )
    op.create_table(
        "approvals",
        sa.Column(
            "proposal_id",
            sa.String(64),
            sa.ForeignKey("proposals.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("official", sa.String(64), primary_key=True),
        sa.Column("verdict", sa.String(16), nullable=False),
        sa.Column("signed_at", sa.Float, nullable=False),
        sa.Column("signature", sa.Text, nullable=False),
    )
    op.create_table(
        "emergencies",
        sa.Column("proposal_id", sa.String(64), primary_key=True),
        sa.Column("declared_at", sa.Float, nullable=False),
        sa.Column("ends_at", sa.Float, nullable=False),
        sa.Column("ended_at", sa.Float, nullable=True),
        sa.Column("ended_by", sa.String(64), nullable=True),
    )


def downgrade() -> None:
    for table in (
        "emergencies",
        "approvals",
        "proposals",
        "used_ids",
        "issued_tokens",
        "principals",
    ):
        op.drop_table(table)
