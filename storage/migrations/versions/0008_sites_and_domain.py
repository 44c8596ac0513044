"""sites, sealed values and KEK escrow (issue 6)

``sealed_values`` holds the few secrets a site keeps at rest (``kms.sealed_values``): a transit
site's backend credential sealed under the barrier key, and the security-domain key sealed under
the domain wrapping key. Each is AES-256-GCM with its name in the AAD; a rekey reseals them.

``key_versions.escrow`` is a symmetric KEK version's material wrapped under the security-domain
key (``kms.domain``), written when the version is made; the domain backup carries it to another
site. Versions made before this revision have none and cannot leave their site.

``transit_keys.origin_site`` names, for a verify-only key, the site whose backend holds its
private versions: the domain backup carries signing keys' public versions, which another site
stores without a backend object, to verify (never sign) with.

``sites`` is the site registry (``kms.sites``): name, kind, backend, status, the site's audit
signing public key (to verify its tree heads), and where it is reached.

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "sealed_values",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("purpose", sa.String(16), nullable=False),
        sa.Column("blob", sa.LargeBinary, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    with op.batch_alter_table("key_versions") as batch:
        batch.add_column(sa.Column("escrow", sa.LargeBinary, nullable=True))
    # Plain ALTER TABLE (SQLite 3.35+ drops columns too): a batch copy of transit_keys would
    # drop the table, and with it every key_versions row by ON DELETE CASCADE.
    op.add_column("transit_keys", sa.Column("origin_site", sa.String(64), nullable=True))
    op.create_table(
        "sites",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("backend", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("url", sa.Text, nullable=False, server_default=""),
        sa.Column("audit_public_key", sa.Text, nullable=True),
        sa.Column("registered_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.Column("note", sa.Text, nullable=False, server_default=""),
    )


def downgrade() -> None:
    op.drop_table("sites")
    op.drop_column("transit_keys", "origin_site")
    with op.batch_alter_table("key_versions") as batch:
        batch.drop_column("escrow")
    op.drop_table("sealed_values")
