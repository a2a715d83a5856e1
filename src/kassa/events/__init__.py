"""Durable event log (SQLite) and decision log (Parquet)."""
