"""Alembic migrations of the metadata database (SQLite and PostgreSQL); run by `kassa.db.migrate`."""
