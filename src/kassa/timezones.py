"""Time-zone names checked against the tz database, for settings and admin writes (the lowest layer, so
configuration and the catalog can both refuse a bad name before it reaches the hot path)."""

from __future__ import annotations

from zoneinfo import ZoneInfo


def timezone_error(name: str) -> str | None:
    """Why ``name`` is not a time zone of the tz database, or None when it is one."""
    try:
        ZoneInfo(name)
    except Exception as exc:  # any error: a directory, a too-long name, a bad key (`kassa.features.request.zone`)
        return f"{name[:64]!r} is not a time zone of the tz database ({type(exc).__name__})"
    return None
