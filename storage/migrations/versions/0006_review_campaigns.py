"""access review campaigns, with a version for optimistic concurrency

A campaign is stored whole as ``kms.review.Campaign.to_json()`` (``body``); ``state`` and
``opened_at`` are copied out of it so that listing by state, newest first, needs no parsing.
``version`` starts at 1 and goes up by one with every stored change: a writer updates only the
version it read (``WHERE version = :read``), so two officers deciding at once never lose a
decision; the one that loses the race reads again and re-applies its decision.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "review_campaigns",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("opened_at", sa.Float, nullable=False, index=True),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("body", sa.Text, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("review_campaigns")
