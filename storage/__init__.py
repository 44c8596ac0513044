"""Storage adapters for the metadata ports (SQL via SQLAlchemy Core and Alembic)."""
